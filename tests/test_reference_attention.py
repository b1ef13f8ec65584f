"""reference.decode_attention (the oracle and the CPU path) against an obviously-correct loop: each sequence's
context gathered position by position through its block table, then softmax(q k^T / sqrt(D)) v in fp64. Contexts
whose blocks are consecutive in the pool (read in place) and shuffled ones (gathered) both."""
from __future__ import annotations

import math

import pytest
import torch

from kogpt_fast import reference
from kogpt_fast.kv_cache import StepMetadata


def slow_decode_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim):
    q = reference.apply_rope(q, meta.positions, rope, rotary_dim).double()
    k = reference.apply_rope(k, meta.positions, rope, rotary_dim)
    bs = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(meta.seq_lens.tolist()):
        table = meta.block_tables[b].tolist()
        keys = torch.stack([k_cache[table[t // bs], t % bs] for t in range(n - 1)] + [k[b]]).double()  # [n, H, D]
        values = torch.stack([v_cache[table[t // bs], t % bs] for t in range(n - 1)] + [v[b]]).double()
        scores = torch.einsum("hd,nhd->hn", q[b], keys) / math.sqrt(q.shape[-1])
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values)
    return out


@pytest.mark.parametrize("consecutive", [True, False], ids=["in-place", "gathered"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_attention_reads_each_context_through_its_table(consecutive, block_size):
    g = torch.Generator().manual_seed(block_size)
    lens, n_head, head_dim, rotary_dim = [1, 5, 16, 37], 3, 32, 16
    pages = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages) + 5
    order = list(range(num_blocks)) if consecutive else torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    for n, count in zip(lens, pages):
        table, order = order[:count], order[count:]
        tables.append(table + [0] * (max(pages) + 3 - count))  # padded wider than any context, as DecodeStep's
        slots.append(table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    batch = len(lens)
    meta = StepMetadata(positions=torch.tensor(lens) - 1, slot_mapping=torch.tensor(slots),
                        cu_seqlens=torch.arange(batch + 1, dtype=torch.int32),
                        block_tables=torch.tensor(tables, dtype=torch.int32),
                        seq_lens=torch.tensor(lens, dtype=torch.int32), last_token=torch.arange(batch), max_seqlen=1,
                        is_prefill=False)
    q, k, v = (torch.randn(batch, n_head, head_dim, generator=g) for _ in range(3))
    k_cache, v_cache = (torch.randn(num_blocks, block_size, n_head, head_dim, generator=g) for _ in range(2))
    rope = reference.rope_table(64, rotary_dim)
    expected = slow_decode_attention(q, k, v, meta, k_cache.clone(), v_cache.clone(), rope, rotary_dim)
    got = reference.decode_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # the new token's rotated k and its v were stored at its slot
    flat_k, flat_v = k_cache.view(-1, n_head, head_dim), v_cache.view(-1, n_head, head_dim)
    assert torch.equal(flat_k[slots], reference.apply_rope(k, meta.positions, rope, rotary_dim))
    assert torch.equal(flat_v[slots], v)
