"""Triton paged decode attention (flash-decoding with a split reduction, RoPE fused, the new K/V into the cache)
against reference.decode_attention.

Output tolerance (flash-attention's convention): the kernel's error against an oracle one precision up (the
reference on fp64 inputs for fp32, on fp32 inputs for fp16/bf16) is at most twice the error of the reference run
in the input dtype, plus a few ulps of slack for the split softmax's different summation order.
The cache contents are compared exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU interpreter
pytest.importorskip("triton", reason="triton is not installed")

from tolerance import UP, assert_within_reference_error  # noqa: E402

from kogpt_fast import backends, reference  # noqa: E402
from kogpt_fast.kv_cache import StepMetadata  # noqa: E402

decode = backends.triton_kernels("decode_attention")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16]  # bfloat16 only on a GPU: the interpreter cannot compute in it


def decode_step(context_lens, n_head, head_dim, block_size, dtype, seed=0):
    """One decode step of sequences whose contexts (the new token included) are context_lens long.

    Their pages are shuffled through a pool filled with random values, so a position read past a context or
    through a wrong page shows up in the output.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    q, k, v = (torch.randn(batch, n_head, head_dim, generator=g).to(dtype) for _ in range(3))
    pages = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    for n, count in zip(context_lens, pages):
        table, order = order[:count], order[count:]
        tables.append(table + [0] * (max(pages) - count))
        slots.append(table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    positions = torch.tensor([n - 1 + 2 * b for b, n in enumerate(context_lens)])  # left padding shifts them
    meta = StepMetadata(
        positions=positions.to(DEVICE), slot_mapping=torch.tensor(slots, device=DEVICE),
        cu_seqlens=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        last_token=torch.arange(batch, device=DEVICE), max_seqlen=1, is_prefill=False,
    )
    cache = torch.randn(2, num_blocks, block_size, n_head, head_dim, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, k, v)], meta, [c.to(DEVICE) for c in cache]


def column_slices(q, k, v, extra=40):
    """q, k, v as views into one wider [B, 3 * H * D + extra] buffer (as the model takes them from the fused
    q | k | v | fc_in GEMM output): last two dims contiguous, token stride > H * D. Same values."""
    n, h, d = q.shape
    wide = torch.randn(n, 3 * h * d + extra, generator=torch.Generator().manual_seed(7)).to(q.dtype).to(q.device)
    views = []
    for i, t in enumerate((q, k, v)):
        wide[:, i * h * d:(i + 1) * h * d] = t.reshape(n, h * d)
        views.append(wide[:, i * h * d:(i + 1) * h * d].view(-1, h, d))
    assert all(t.stride() == (wide.shape[1], d, 1) for t in views)
    return views


def check(context_lens, n_head, head_dim, rotary_dim, block_size, dtype, num_splits=None, seed=0, strided=False):
    (q, k, v), meta, (k_cache, v_cache) = decode_step(context_lens, n_head, head_dim, block_size, dtype, seed)
    if strided:
        q, k, v = column_slices(q, k, v)
    rope = reference.rope_table(2048 + 2 * len(context_lens), rotary_dim).to(DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference.decode_attention(q, k, v, meta, expected_k, expected_v, rope, rotary_dim)
    up = UP[dtype]
    oracle = reference.decode_attention(
        q.to(up), k.to(up), v.to(up), meta, k_cache.to(up), v_cache.to(up), rope, rotary_dim
    )
    got = decode.decode_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim, num_splits=num_splits)
    assert got.is_contiguous()
    assert torch.equal(v_cache, expected_v), "values in the cache differ from the reference"
    assert torch.equal(k_cache, expected_k), "rotated keys in the cache differ from the reference"
    assert_within_reference_error(got, oracle, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 1000], ids=lambda s: f"splits{s}")
def test_decode_kogpt_heads(num_splits, block_size, dtype):
    """Contexts of 1, 7, 33 and 130 tokens (ending mid-block) in one batch; one split, several, more splits than
    context chunks (the empty ones must weigh nothing)."""
    check([1, 7, 33, 130], 2, 256, 64, block_size, dtype, num_splits, seed=block_size)


@pytest.mark.parametrize("context_len", [1, 7, 33, 130])
def test_decode_batch_1(context_len):
    check([context_len], 2, 256, 64, 16, torch.float32, num_splits=2)


@pytest.mark.parametrize(
    "head_dim, rotary_dim", [(32, 16), (80, 80), (64, 2)], ids=["d32_rot16", "d80_full_rotary", "d64_rot2"]
)
def test_decode_other_geometries(head_dim, rotary_dim):
    check([5, 17, 1, 40, 9, 64], 3, head_dim, rotary_dim, 8, torch.float32, num_splits=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_column_slices_of_a_wider_buffer(dtype):
    """q, k, v with token stride 3 * H * D + 40 (the fused GEMM's output viewed per head)."""
    check([1, 7, 33, 130], 2, 256, 64, 8, dtype, num_splits=3, seed=13, strided=True)


def test_decode_column_slices_other_geometry():
    check([5, 17, 1, 40], 3, 80, 80, 8, torch.float32, num_splits=2, seed=14, strided=True)


def test_plan_splits():
    cpu = torch.device("cpu")
    assert decode.plan_splits(1, 2, 130, 16, cpu, num_splits=3) == (3, 48)  # 9 chunks of 16 -> 3 splits of 3
    assert decode.plan_splits(1, 2, 130, 16, cpu, num_splits=1000) == (9, 16)  # at most one split per chunk
    assert decode.plan_splits(64, 16, 2048, 32, cpu) == (1, 2048)  # enough programs without splitting
    splits, split_len = decode.plan_splits(1, 16, 2048, 32, cpu, num_splits=17)
    assert split_len % 32 == 0 and splits * split_len >= 2048 > (splits - 1) * split_len


def test_bad_inputs_raise_value_errors():
    (q, k, v), meta, (k_cache, v_cache) = decode_step([3, 9], 2, 32, 8, torch.float32)
    rope = reference.rope_table(64, 16).to(DEVICE)
    with pytest.raises(ValueError, match="v must have shape"):
        decode.decode_attention(q, k, v[:1].contiguous(), meta, k_cache, v_cache, rope, 16)
    with pytest.raises(ValueError, match="meta.positions must have shape"):
        decode.decode_attention(q[:1].contiguous(), k[:1].contiguous(), v[:1].contiguous(), meta, k_cache,
                                v_cache, rope, 16)
    with pytest.raises(ValueError, match="dtypes differ"):
        decode.decode_attention(q, k, v, meta, k_cache.half(), v_cache, rope, 16)
    with pytest.raises(ValueError, match="v must be contiguous in its last two dims"):
        decode.decode_attention(q, k, v.transpose(0, 1).contiguous().transpose(0, 1), meta, k_cache, v_cache,
                                rope, 16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_decode_kogpt_6b_shapes(batch, dtype):
    """Contexts up to 2048 (n_positions), most ending mid-block."""
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 2049, (batch,), generator=g).tolist()
    lens[0] = 2048
    check(lens, 16, 256, 64, 16, dtype, seed=batch)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 7])
def test_decode_column_slices_on_gpu(batch, dtype):
    """KoGPT-6B heads as views into the fused GEMM's output (token stride 3d + 40), contexts up to 2048."""
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 2049, (batch,), generator=g).tolist()
    lens[0] = 2048
    check(lens, 16, 256, 64, 16, dtype, seed=batch, strided=True)


@pytest.mark.gpu
@needs_cuda
def test_decode_batch_256_on_gpu():
    g = torch.Generator().manual_seed(0)
    check(torch.randint(1, 300, (256,), generator=g).tolist(), 16, 256, 64, 16, torch.float16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [None, 1, 64])
def test_decode_fp32_on_gpu(num_splits):
    check([1, 7, 33, 2048], 16, 256, 64, 16, torch.float32, num_splits)
