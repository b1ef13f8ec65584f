"""GPT-J's two fused GEMMs ([q|k|v|gelu(fc_in)] and [a|m] @ [Wo|W_out] + residual) on the torch backend.

The fused path rounds differently from HF's four GEMMs, so it is not the reference path; here it must give the
same logits within fp32 rounding and the same greedy tokens where the reference's top-2 margin is not a near-tie.
"""
from __future__ import annotations

import pytest
import torch

from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer


@pytest.fixture()
def model(tmp_path):
    hf = random_hf_model(seed=5, n_embd=512, n_head=2, rotary_dim=64, n_layer=2, vocab_size=150, n_positions=64)
    hf.save_pretrained(tmp_path)
    return KoGPTForCausalLM.from_pretrained(tmp_path, device="cpu", dtype=torch.float32, backend="torch")


def step_logits(model, ids):
    """Teacher-forced next-token logits at every prefix of ids [1, T] (prefill only), [T, vocab]."""
    return torch.cat([model.next_token_logits(ids[:, : t + 1]) for t in range(ids.shape[1])])


def test_fused_equals_unfused_within_rounding(model):
    ids = torch.randint(2, 150, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20)
    reference_logits = step_logits(model, expected[:, :-1])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    model.fuse_projections = True
    fused_logits = step_logits(model, expected[:, :-1])
    torch.testing.assert_close(fused_logits, reference_logits, rtol=1e-4, atol=1e-4)
    top2 = reference_logits.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(fused_logits.argmax(-1)[clear], reference_logits.argmax(-1)[clear])
    # Each weight is held once: the per-module weights are views into the fused ones, with the same values.
    w_in, _, w_out, _ = model.fused_weights()[0]
    block = model.transformer.h[0]
    assert block.attn.k_proj.weight.data_ptr() == w_in[512:].data_ptr()
    assert block.mlp.fc_out.weight.data_ptr() == w_out[:, 512:].data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fused_demo_greedy_tokens():
    tokenizer = KoGPTTokenizer.from_pretrained()
    model = KoGPTForCausalLM.from_pretrained(device="cpu", backend="torch")
    batch = tokenizer(["국회는", "대통령은", "모든 국민은"], return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=30)
    model.fuse_projections = True
    assert torch.equal(model.generate(**batch, max_new_tokens=30), expected)


def test_moving_a_fused_model_rebuilds_the_fused_weights(model):
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = model.generate(ids, max_new_tokens=6)
    model.fuse_projections = True
    model.generate(ids, max_new_tokens=6)
    model.to(torch.float64).to(torch.float32)  # the per-module weights are new tensors now
    assert torch.equal(model.generate(ids, max_new_tokens=6), expected)
    assert model.fused_weights()[0][0].data_ptr() == model.transformer.h[0].attn.q_proj.weight.data_ptr()


def test_switching_back_gives_each_weight_its_own_memory(model):
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = model.generate(ids, max_new_tokens=6)
    model.fuse_projections = True
    model.generate(ids, max_new_tokens=6)
    assert not model.transformer.h[0].attn.out_proj.weight.is_contiguous()  # a column slice of [Wo | W_out]
    model.fuse_projections = False
    assert torch.equal(model.generate(ids, max_new_tokens=6), expected)
    # Each weight in memory of its own again (not a slice of a fused weight), dense: contiguous, or on the CPU's
    # torch backend in fp32 the transposed view of a contiguous [K, N] copy (model._gemm_layout).
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), f"{name} shares a larger tensor"
        assert p.is_contiguous() or p.t().is_contiguous(), name
