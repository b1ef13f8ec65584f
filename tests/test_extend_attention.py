"""Extend attention (new tokens over their sequence's cached context, causal among themselves, RoPE fused, K/V into
the paged cache): the reference against prefill and decode attention and a dense fp64 oracle, and the Triton kernel
against the reference.

Output tolerance (flash-attention's convention): the kernel's error against an oracle one precision up (the
reference on fp64 inputs for fp32, on fp32 inputs for fp16/bf16) is at most twice the error of the reference run in
the input dtype, plus a few ulps of slack for the online softmax's summation order. The cache is compared exactly.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU interpreter

from tolerance import UP, assert_within_reference_error  # noqa: E402

from kogpt_fast import reference  # noqa: E402
from kogpt_fast.kv_cache import StepMetadata, build_step_metadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16]  # bfloat16 only on a GPU: the interpreter cannot compute in it


def extend_step(cached, new, n_head, head_dim, block_size, dtype, seed=0, spare_blocks=3):
    """One step of sequences with cached[b] tokens in the pool and new[b] new ones, packed along N.

    Their pages are shuffled through a pool filled with random values (the cached tokens' K/V are whatever the pool
    holds), so a position read past a context or through a wrong page shows up in the output.
    """
    g = torch.Generator().manual_seed(seed)
    n = sum(new)
    q, k, v = (torch.randn(n, n_head, head_dim, generator=g).to(dtype) for _ in range(3))
    pages = [-(-(c + t) // block_size) for c, t in zip(cached, new)]
    num_blocks = sum(pages) + spare_blocks
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for count in pages:
        tables.append(order[:count])
        order = order[count:]
    positions = torch.cat([torch.arange(c, c + t) + 2 * b for b, (c, t) in enumerate(zip(cached, new))])
    meta = build_step_metadata(tables, cached, new, positions, block_size, DEVICE)
    cache = torch.randn(2, num_blocks, block_size, n_head, head_dim, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, k, v)], meta, [c.to(DEVICE) for c in cache]


def rope_for(rotary_dim):
    return reference.rope_table(2048 + 64, rotary_dim).to(DEVICE)


def dense_oracle(q, k, v, meta, k_cache, v_cache, rope, rotary_dim):
    """Obviously correct, in fp64: per sequence, the cached keys gathered token by token through the block table,
    the new ones rotated and appended, one softmax over everything each query may see."""
    q, k = apply_rope_ref(q, meta, rope, rotary_dim), apply_rope_ref(k, meta, rope, rotary_dim)
    bs = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    bounds, lens = meta.cu_seqlens.tolist(), meta.seq_lens.tolist()
    for b in range(len(bounds) - 1):
        start, end = bounds[b], bounds[b + 1]
        cached = lens[b] - (end - start)
        table = meta.block_tables[b].tolist()
        past_k = [k_cache[table[t // bs], t % bs] for t in range(cached)]
        past_v = [v_cache[table[t // bs], t % bs] for t in range(cached)]
        keys = torch.stack(past_k + list(k[start:end])).double()  # [L, H, D]
        values = torch.stack(past_v + list(v[start:end])).double()
        for i in range(end - start):
            seen = cached + i + 1
            scores = torch.einsum("hd,lhd->hl", q[start + i].double(), keys[:seen]) / math.sqrt(q.shape[-1])
            out[start + i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values[:seen])
    return out


def apply_rope_ref(x, meta, rope, rotary_dim):
    return reference.apply_rope(x, meta.positions, rope, rotary_dim)


def test_reference_equals_a_dense_oracle():
    (q, k, v), meta, (k_cache, v_cache) = extend_step([0, 5, 17, 1], [3, 1, 9, 4], 2, 32, 4, torch.float64)
    rope = rope_for(16)
    pool_k, pool_v = k_cache.clone(), v_cache.clone()
    expected = dense_oracle(q, k, v, meta, pool_k, pool_v, rope, 16)
    got = reference.extend_attention(q, k, v, meta, k_cache, v_cache, rope, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the reference's scores are fp32 (as HF's)
    # The new tokens' rotated K and V are in the cache at their slots; nothing else changed.
    slots = meta.slot_mapping
    flat = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
    torch.testing.assert_close(flat(k_cache)[slots], apply_rope_ref(k, meta, rope, 16), rtol=0, atol=0)
    assert torch.equal(flat(v_cache)[slots], v)
    others = torch.ones(flat(k_cache).shape[0], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(flat(k_cache)[others], flat(pool_k)[others])


def test_reference_with_nothing_cached_is_prefill():
    (q, k, v), meta, (k_cache, v_cache) = extend_step([0, 0, 0], [7, 1, 20], 2, 64, 8, torch.float32, seed=1)
    rope = rope_for(64)
    assert not meta.has_context
    prefill_k, prefill_v = k_cache.clone(), v_cache.clone()
    expected = reference.prefill_attention(q, k, v, meta, prefill_k, prefill_v, rope, 64)
    got = reference.extend_attention(q, k, v, meta, k_cache, v_cache, rope, 64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(k_cache, prefill_k) and torch.equal(v_cache, prefill_v)


def test_reference_with_one_new_token_is_decode():
    (q, k, v), meta, (k_cache, v_cache) = extend_step([4, 0, 33, 16], [1, 1, 1, 1], 2, 64, 8, torch.float32, seed=2)
    rope = rope_for(64)
    decode_k, decode_v = k_cache.clone(), v_cache.clone()
    expected = reference.decode_attention(q, k, v, meta, decode_k, decode_v, rope, 64)
    got = reference.extend_attention(q, k, v, meta, k_cache, v_cache, rope, 64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(k_cache, decode_k) and torch.equal(v_cache, decode_v)


def test_reference_chunks_equal_one_prefill():
    """A prompt prefilled in one go, or as chunks each extending the cache of the ones before: same outputs."""
    g = torch.Generator().manual_seed(3)
    length, bs, h, d = 45, 8, 2, 64
    q, k, v = (torch.randn(length, h, d, generator=g) for _ in range(3))
    rope = rope_for(32)
    table = torch.randperm(12, generator=g)[:6].tolist()
    pools = [torch.zeros(12, bs, h, d) for _ in range(4)]
    whole = build_step_metadata([table], [0], [length], torch.arange(length), bs, "cpu")
    expected = reference.prefill_attention(q, k, v, whole, pools[0], pools[1], rope, 32)
    got = []
    for start, end in [(0, 10), (10, 11), (11, 40), (40, 45)]:
        meta = build_step_metadata([table], [start], [end - start], torch.arange(start, end), bs, "cpu")
        got.append(reference.extend_attention(q[start:end], k[start:end], v[start:end], meta, pools[2], pools[3],
                                              rope, 32))
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(pools[2], pools[0]) and torch.equal(pools[3], pools[1])


# ---- the Triton kernel against the reference ----

@pytest.fixture(scope="module")
def extend():
    pytest.importorskip("triton", reason="triton is not installed")
    from kogpt_fast import backends

    return backends.triton_kernels("extend_attention")


def check(op, cached, new, n_head, head_dim, rotary_dim, block_size, dtype, seed=0, strided=False, **kw):
    (q, k, v), meta, (k_cache, v_cache) = extend_step(cached, new, n_head, head_dim, block_size, dtype, seed)
    if strided:
        q, k, v = column_slices(q, k, v)
    rope = rope_for(rotary_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference.extend_attention(q, k, v, meta, expected_k, expected_v, rope, rotary_dim)
    up = UP[dtype]
    oracle = reference.extend_attention(q.to(up), k.to(up), v.to(up), meta, k_cache.to(up), v_cache.to(up), rope,
                                        rotary_dim)
    got = op(q, k, v, meta, k_cache, v_cache, rope, rotary_dim, **kw)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(v_cache, expected_v), "values in the cache differ from the reference"
    assert torch.equal(k_cache, expected_k), "rotated keys in the cache differ from the reference"
    assert_within_reference_error(got, oracle, expected, dtype)


def column_slices(q, k, v, extra=40):
    """q, k, v as views into one wider [N, 3 * H * D + extra] buffer (the fused q | k | v | fc_in GEMM output viewed
    per head): last two dims contiguous, token stride > H * D. Same values."""
    n, h, d = q.shape
    wide = torch.randn(n, 3 * h * d + extra, generator=torch.Generator().manual_seed(7)).to(q.dtype).to(q.device)
    views = []
    for i, t in enumerate((q, k, v)):
        wide[:, i * h * d:(i + 1) * h * d] = t.reshape(n, h * d)
        views.append(wide[:, i * h * d:(i + 1) * h * d].view(-1, h, d))
    return views


# A mixed step as the engine makes it: decode rows (1 new token over a context), a chunk in the middle of a long
# prompt, a fresh prompt, a prefix-cache hit ending on a block boundary.
MIXED = ([9, 40, 0, 16, 1], [1, 23, 7, 5, 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_kogpt_heads(extend, dtype):
    """KoGPT's head geometry: head_dim 256, rotary_dim 64."""
    check(extend.extend_attention, *MIXED, 2, 256, 64, 8, dtype, seed=4)


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize(
    "head_dim, rotary_dim", [(32, 16), (80, 80), (64, 2)], ids=["d32_rot16", "d80_full_rotary", "d64_rot2"]
)
def test_kernel_other_geometries_small_tiles(extend, head_dim, rotary_dim, block_size):
    check(extend.extend_attention, [3, 0, 21, 50], [7, 1, 19, 2], 3, head_dim, rotary_dim, block_size,
          torch.float32, seed=block_size, config=extend.AttentionConfig(16, 16))


def test_kernel_prefill_and_decode_shapes(extend):
    check(extend.extend_attention, [0, 0], [33, 2], 2, 64, 64, 8, torch.float32, seed=5)  # nothing cached
    check(extend.extend_attention, [0, 7, 64, 130], [1, 1, 1, 1], 2, 64, 64, 16, torch.float32, seed=6)  # decode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_column_slices_of_a_wider_buffer(extend, dtype):
    check(extend.extend_attention, *MIXED, 2, 256, 64, 8, dtype, seed=8, strided=True)


def test_kernel_skips_uncached_tokens(extend):
    """A new token with slot -1 is attended to but not stored (the reference's rule)."""
    (q, k, v), meta, (k_cache, v_cache) = extend_step([5, 2], [3, 4], 2, 32, 4, torch.float32, seed=9)
    meta.slot_mapping[[1, 5]] = -1
    rope = rope_for(16)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference.extend_attention(q, k, v, meta, expected_k, expected_v, rope, 16)
    got = extend.extend_attention(q, k, v, meta, k_cache, v_cache, rope, 16)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ops_modules_run_the_kernel(extend):
    from kogpt_fast import backends, cuda_ops

    assert backends.triton_kernels("ops").extend_attention is extend.extend_attention
    assert cuda_ops.extend_attention.__doc__ and "Triton" in cuda_ops.extend_attention.__doc__


def test_bad_inputs_raise_value_errors(extend):
    (q, k, v), meta, (k_cache, v_cache) = extend_step([3, 2], [2, 3], 2, 32, 8, torch.float32)
    rope = rope_for(16)
    with pytest.raises(ValueError, match="k must have shape"):
        extend.extend_attention(q, k[:, :1].contiguous(), v, meta, k_cache, v_cache, rope, 16)
    with pytest.raises(ValueError, match="meta.seq_lens must have shape"):
        bad = StepMetadata(**{**meta.__dict__, "seq_lens": meta.seq_lens[:1]})
        extend.extend_attention(q, k, v, bad, k_cache, v_cache, rope, 16)
    with pytest.raises(ValueError, match="dtypes differ"):
        extend.extend_attention(q, k, v, meta, k_cache.half(), v_cache, rope, 16)
    with pytest.raises(ValueError, match="head_dim 512 exceeds"):
        big = torch.zeros(5, 1, 512, device=DEVICE)
        extend.extend_attention(big, big, big, meta, torch.zeros(4, 8, 1, 512, device=DEVICE),
                                torch.zeros(4, 8, 1, 512, device=DEVICE), rope, 16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "cached, new",
    [([1500], [548]), ([0, 7, 130, 2000, 64], [2048, 1, 1, 48, 512]), ([1024] * 8, [128] * 8), ([300] * 64, [1] * 64)],
    ids=["chunk", "mixed", "8x128_over_1024", "decode64"],
)
def test_kernel_kogpt_6b_shapes(extend, cached, new, dtype):
    check(extend.extend_attention, cached, new, 16, 256, 64, 16, dtype, seed=len(new))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_kernel_column_slices_on_gpu(extend, dtype):
    check(extend.extend_attention, [0, 33, 700, 1], [130, 600, 5, 1], 16, 256, 64, 16, dtype, strided=True)
