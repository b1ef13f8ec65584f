"""The paged KV cache: allocator, slot mapping against a slow reference, exhaustion, block reuse."""
from __future__ import annotations

import pytest
import torch

from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM, KVCacheExhausted
from kogpt_fast.kv_cache import BlockAllocator, PagedKVCache


def test_allocator_allocates_frees_and_reuses():
    a = BlockAllocator(4)
    first = a.allocate(3)
    assert sorted(first) == [0, 1, 2] and a.num_free == 1
    with pytest.raises(KVCacheExhausted, match="2 more blocks needed, 1 free of a capacity of 4 blocks"):
        a.allocate(2)
    a.free(first[:2])
    assert sorted(a.allocate(3)) == sorted(first[:2] + [3])
    with pytest.raises(ValueError, match="not allocated"):
        a.free([first[0], first[0]])


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_plan_slots_match_a_slow_reference(block_size):
    cache = PagedKVCache(1, 64, block_size, 1, 4, torch.float32, "cpu")
    cache.start([5, 1, 7])
    prefill = cache.plan([5, 1, 7], torch.zeros(13, dtype=torch.long), is_prefill=True)
    steps = [cache.plan([1, 1, 1], torch.zeros(3, dtype=torch.long), is_prefill=False) for _ in range(4)]
    # Slow reference: token t of sequence b lives in tables[b][t // block_size] at offset t % block_size.
    expected, lengths = [], [0, 0, 0]
    for new in ([5, 1, 7], *[[1, 1, 1]] * 4):
        slots = []
        for b, n in enumerate(new):
            for t in range(lengths[b], lengths[b] + n):
                slots.append(cache.tables[b][t // block_size] * block_size + t % block_size)
            lengths[b] += n
        expected.append(slots)
    assert [m.slot_mapping.tolist() for m in [prefill, *steps]] == expected
    assert prefill.cu_seqlens.tolist() == [0, 5, 6, 13] and prefill.last_token.tolist() == [4, 5, 12]
    assert steps[-1].seq_lens.tolist() == [9, 5, 11]
    all_slots = sum(expected, [])
    assert len(set(all_slots)) == len(all_slots)  # no two tokens share a slot
    for b in range(3):
        assert steps[-1].block_tables[b, : len(cache.tables[b])].tolist() == cache.tables[b]
    cache.release()
    assert cache.allocator.num_free == 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = random_hf_model(seed=2, n_embd=64, n_head=2, rotary_dim=16, n_layer=1, vocab_size=50, n_positions=128)
    path = tmp_path_factory.mktemp("kv")
    hf.save_pretrained(path)
    return KoGPTForCausalLM.from_pretrained(path, device="cpu", backend="torch")


def test_exhaustion_names_the_capacity_and_the_model_recovers(model):
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    expected = model.generate(ids, max_new_tokens=40, min_new_tokens=40)  # no early eos
    assert expected.shape == (1, 48)
    model.max_cache_tokens = 32
    try:
        with pytest.raises(KVCacheExhausted, match="capacity of 2 blocks"):
            model.generate(ids, max_new_tokens=40, min_new_tokens=40)  # runs out while decoding
        with pytest.raises(KVCacheExhausted, match=r"capacity of 2 blocks \(32 tokens\)"):
            model.generate(ids.repeat(5, 1), max_new_tokens=2)  # the prompts alone do not fit
        assert model.kv_cache.allocator.num_free == 2  # everything was given back
        fits = model.generate(ids, max_new_tokens=20, min_new_tokens=20)  # 28 tokens fit in 32
        assert torch.equal(fits, expected[:, :28])
    finally:
        model.max_cache_tokens = None
    assert torch.equal(model.generate(ids, max_new_tokens=40, min_new_tokens=40), expected)


def test_blocks_are_reused_across_requests(model):
    ids = torch.tensor([[3, 4, 5]])
    model.generate(ids.repeat(4, 1), max_new_tokens=30, min_new_tokens=30)
    pool = model.kv_cache
    for n in (1, 7, 30):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n)
        assert model.kv_cache is pool and pool.allocator.num_free == pool.num_blocks


def test_each_sequence_gets_one_run_of_blocks_request_after_request():
    """start() on an empty pool allocates each sequence's blocks (for its capacity) as one run, request after
    request: the torch backend's decode attention then reads a sequence's context in place instead of gathering."""
    cache = PagedKVCache(1, 64, 4, 1, 8, torch.float32, "cpu")
    for lengths, capacity in (([5, 9, 1], [12, 9, 30]), ([7, 7], [20, 3]), ([3, 40, 2], [3, 41, 9])):
        cache.start(lengths, capacity)
        for table, n, c in zip(cache.tables, lengths, capacity):
            assert len(table) == cache.blocks_for(max(n, c))
            assert table == list(range(table[0], table[0] + len(table))), cache.tables
        cache.release()
    assert cache.allocator.num_free == 64
