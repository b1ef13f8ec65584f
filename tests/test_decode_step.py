"""DecodeStep's bookkeeping on the CPU (the CUDA graph itself is tested on a GPU in test_triton_model.py).

Before a decode step is captured as a CUDA graph it runs warm-up steps (kernels compile, libraries allocate).
Those steps must write only where nothing is read: the request's own blocks are reserved for exactly the tokens it
will feed, so a warm-up at the next positions would resolve its slot through the block table's zero padding
(block 0: the first sequence's first tokens) or past the table's end. And a decode step (with its graph) is built
over the model's weights at that moment: once they change (model.to(), new tensors loaded, fusion switched), the
model must build a new one.
"""
from __future__ import annotations

import pytest
import torch

from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = random_hf_model(seed=11, n_positions=32, n_embd=64, n_head=2, rotary_dim=16)
    path = tmp_path_factory.mktemp("decode_step")
    hf.save_pretrained(path)
    ours = KoGPTForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    ours.kv_block_size = BLOCK
    return ours


def decode_after_prefill(model, prompt: list[int], warm_up: bool):
    """generate(max_new_tokens=2)'s bookkeeping: prefill, blocks for every fed token, one decode step (warmed up
    first, as before a capture, if asked). -> (pool before the warm-up, pool after it, the decode step's logits)."""
    ids = torch.tensor([prompt])
    n = len(prompt)
    cache = model.cache_for([n + 2])
    try:
        logits = model._prefill(cache, ids, torch.ones_like(ids), [n])
        cache.reserve(0, n + 1)  # generate(): the prompt and the one token fed back
        step = model.decode_step(cache)
        before = cache.k.clone(), cache.v.clone()
        if warm_up:
            step._warm_up()
        after = cache.k.clone(), cache.v.clone()
        return before, after, step(logits.argmax(-1)).clone(), cache.num_blocks
    finally:
        cache.release()


@pytest.mark.parametrize("prompt_len", [BLOCK - 1, 2 * BLOCK - 1, 31], ids=["next-block", "two-blocks", "last"])
def test_warm_up_writes_nothing_a_request_reads(model, prompt_len):
    """prompt_len + 1 a multiple of the block size: the second warm-up position falls in an unreserved block
    (before the fix, block 0 via the table's padding); 31 = n_positions - 1: past the table's end."""
    prompt = torch.randint(2, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(5))
    (k0, v0), (k1, v1), warmed, blocks = decode_after_prefill(model, prompt.tolist(), warm_up=True)
    assert torch.equal(k0[:, :blocks], k1[:, :blocks]) and torch.equal(v0[:, :blocks], v1[:, :blocks]), (
        "the warm-up wrote into the allocator's blocks"
    )
    _, _, cold, _ = decode_after_prefill(model, prompt.tolist(), warm_up=False)
    assert torch.equal(warmed, cold), "the step after the warm-up gives other logits than without it"


def test_a_decode_step_is_rebuilt_when_its_weights_change(model):
    """The step (and, on a GPU, its graph) is reused while the weights stay put, and rebuilt after anything that
    gives them new memory: switching the fused GEMMs on or off, model.to(), loading new tensors."""
    ids = torch.tensor([[5, 6, 7]])

    def step_for_a_request():
        cache = model.cache_for([6])
        try:
            model._prefill(cache, ids, torch.ones_like(ids), [3])
            cache.reserve(0, 5)
            return model.decode_step(cache)
        finally:
            cache.release()

    first = step_for_a_request()
    assert step_for_a_request() is first, "an unchanged model rebuilt its decode step"
    changes = {
        "fused on": lambda: setattr(model, "fuse_projections", True),
        "fused off": lambda: setattr(model, "fuse_projections", False),
        "to fp16 and back": lambda: model.to(torch.float16).to(torch.float32),
        "new tensors loaded": lambda: model.load_state_dict(
            {k: v.clone() for k, v in model.state_dict().items()}, assign=True),
    }
    try:
        previous = first
        for name, change in changes.items():
            change()
            step = step_for_a_request()
            assert step is not previous, f"the decode step survived: {name}"
            assert step_for_a_request() is step, f"rebuilt twice after: {name}"
            previous = step
    finally:
        model.fuse_projections = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_are_recaptured_after_the_fusion_changes():
    """On a GPU in fp16 (graphs on): unfusing frees the fused weights the first graph replays; the model must
    capture a new graph, and give the same tokens as a model that never fused."""
    path_model = KoGPTForCausalLM.from_pretrained(None, device="cuda", dtype=torch.float16, backend="triton")
    reference = KoGPTForCausalLM.from_pretrained(None, device="cuda", dtype=torch.float16, backend="triton")
    ids = torch.tensor([[5, 6, 7, 8]], device="cuda")
    path_model.generate(ids, max_new_tokens=8)
    first = path_model._decode_steps[1]
    assert first.graph is not None and path_model.fused()
    path_model.fuse_projections = reference.fuse_projections = False
    got = path_model.generate(ids, max_new_tokens=8)
    assert path_model._decode_steps[1] is not first and path_model._decode_steps[1].graph is not None
    assert torch.equal(got, reference.generate(ids, max_new_tokens=8))
