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
