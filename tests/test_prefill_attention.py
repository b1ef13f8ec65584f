"""Triton prefill attention (causal varlen flash attention, RoPE fused, K/V into the paged cache) against
reference.prefill_attention.

Output tolerance (flash-attention's convention): the kernel's error against an oracle one precision up (the
reference on fp64 inputs for fp32, on fp32 inputs for fp16/bf16) is at most twice the error of the reference run
in the input dtype, plus a few ulps of slack for the online softmax's different summation order.
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

prefill = backends.triton_kernels("prefill_attention")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16]  # bfloat16 only on a GPU: the interpreter cannot compute in it


def packed_prefill(lens, n_head, head_dim, block_size, dtype, seed=0):
    """q, k, v of sequences `lens` packed along N; their pages are shuffled through the pool."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q, k, v = (torch.randn(n, n_head, head_dim, generator=g).to(dtype) for _ in range(3))
    pages = [-(-length // block_size) for length in lens]
    order = torch.randperm(sum(pages) + 2, generator=g).tolist()
    tables, slots = [], []
    for length, count in zip(lens, pages):
        table, order = order[:count], order[count:]
        tables.append(table + [0] * (max(pages) - count))
        slots += [table[t // block_size] * block_size + t % block_size for t in range(length)]
    positions = torch.cat([torch.arange(length) + 3 * b for b, length in enumerate(lens)])  # not always from 0
    cu = torch.tensor([0] + lens).cumsum(0)
    meta = StepMetadata(
        positions=positions.to(DEVICE), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        cu_seqlens=cu.to(torch.int32).to(DEVICE), block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE), last_token=(cu[1:] - 1).to(DEVICE),
        max_seqlen=max(lens), is_prefill=True,
    )
    cache = torch.randn(2, sum(pages) + 2, block_size, n_head, head_dim, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, k, v)], meta, [c.to(DEVICE) for c in cache]


def column_slices(q, k, v, extra=40):
    """q, k, v as views into one wider [N, 3 * H * D + extra] buffer (as the model takes them from the fused
    q | k | v | fc_in GEMM output): last two dims contiguous, token stride > H * D. Same values."""
    n, h, d = q.shape
    wide = torch.randn(n, 3 * h * d + extra, generator=torch.Generator().manual_seed(7)).to(q.dtype).to(q.device)
    views = []
    for i, t in enumerate((q, k, v)):
        wide[:, i * h * d:(i + 1) * h * d] = t.reshape(n, h * d)
        views.append(wide[:, i * h * d:(i + 1) * h * d].view(-1, h, d))
    assert all(t.stride() == (wide.shape[1], d, 1) for t in views)
    return views


def check(lens, n_head, head_dim, rotary_dim, block_size, dtype, config=None, seed=0, strided=False, op=None):
    """op: the implementation under test (default the Triton kernel with `config`)."""
    (q, k, v), meta, (k_cache, v_cache) = packed_prefill(lens, n_head, head_dim, block_size, dtype, seed)
    if strided:
        q, k, v = column_slices(q, k, v)
    rope = reference.rope_table(2048 + 3 * len(lens), rotary_dim).to(DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference.prefill_attention(q, k, v, meta, expected_k, expected_v, rope, rotary_dim)
    up = UP[dtype]
    oracle = reference.prefill_attention(
        q.to(up), k.to(up), v.to(up), meta, k_cache.to(up), v_cache.to(up), rope, rotary_dim
    )
    if op is None:
        got = prefill.prefill_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim, config=config)
    else:
        got = op(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)
    assert got.is_contiguous()
    assert torch.equal(v_cache, expected_v), "values in the cache differ from the reference"
    assert torch.equal(k_cache, expected_k), "rotated keys in the cache differ from the reference"
    assert_within_reference_error(got, oracle, expected, dtype)


SMALL_TILES = prefill.AttentionConfig(16, 16)  # many query tiles and key steps even at small lengths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens", [[1], [7], [33], [130], [1, 7, 33, 130]], ids=lambda lens: "+".join(map(str, lens)))
def test_prefill_kogpt_heads(lens, dtype):
    """KoGPT's head geometry: head_dim 256, rotary_dim 64; one sequence and a packed batch of four."""
    check(lens, 2, 256, 64, 8, dtype, seed=len(lens) + lens[0])


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize(
    "head_dim, rotary_dim", [(32, 16), (80, 80), (64, 2)], ids=["d32_rot16", "d80_full_rotary", "d64_rot2"]
)
def test_prefill_other_geometries_small_tiles(head_dim, rotary_dim, block_size):
    check([7, 1, 33, 19], 3, head_dim, rotary_dim, block_size, torch.float32, config=SMALL_TILES, seed=block_size)


def test_prefill_small_tiles_fp16():
    check([130, 5], 2, 256, 64, 16, torch.float16, config=SMALL_TILES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_column_slices_of_a_wider_buffer(dtype):
    """q, k, v with token stride 3 * H * D + 40 (the fused GEMM's output viewed per head), packed sequences."""
    check([7, 1, 33], 2, 256, 64, 8, dtype, config=SMALL_TILES, seed=11, strided=True)


def test_prefill_column_slices_other_geometry():
    check([5, 19], 3, 80, 80, 16, torch.float32, config=SMALL_TILES, seed=12, strided=True)


# kogpt_fast.torch_prefill's attention (model.prefill_path = "torch"): RoPE and the cache write on the Triton
# kernels, the attention on torch's SDPA, sequence by sequence; the same checks.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "column_slices"])
def test_torch_prefill_attention(strided, dtype):
    from kogpt_fast import torch_prefill

    check([1, 7, 33, 130], 2, 256, 64, 8, dtype, seed=21, strided=strided, op=torch_prefill.prefill_attention)
    check([5, 19], 3, 80, 80, 16, dtype, seed=22, strided=strided, op=torch_prefill.prefill_attention)


def test_ops_module_runs_the_kernel():
    ops = backends.triton_kernels("ops")
    assert ops.prefill_attention is prefill.prefill_attention


def test_bad_inputs_raise_value_errors():
    (q, k, v), meta, (k_cache, v_cache) = packed_prefill([3, 2], 2, 32, 8, torch.float32)
    rope = reference.rope_table(64, 16).to(DEVICE)
    with pytest.raises(ValueError, match="k must have shape"):
        prefill.prefill_attention(q, k[:, :1].contiguous(), v, meta, k_cache, v_cache, rope, 16)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        prefill.prefill_attention(q, k, v, meta, k_cache[..., :16].contiguous(), v_cache, rope, 16)
    with pytest.raises(ValueError, match="rope table"):
        prefill.prefill_attention(q, k, v, meta, k_cache, v_cache, rope.double(), 16)
    with pytest.raises(ValueError, match="k must be contiguous in its last two dims"):
        prefill.prefill_attention(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, meta, k_cache, v_cache,
                                  rope, 16)
    with pytest.raises(ValueError, match="q must be contiguous in its last two dims"):
        prefill.prefill_attention(torch.zeros(5, 2, 64, device=DEVICE)[..., ::2], k, v, meta, k_cache, v_cache,
                                  rope, 16)
    with pytest.raises(ValueError, match="head_dim 512 exceeds"):
        big = torch.zeros(5, 1, 512, device=DEVICE)
        prefill.prefill_attention(big, big, big, meta, torch.zeros(4, 8, 1, 512, device=DEVICE),
                                  torch.zeros(4, 8, 1, 512, device=DEVICE), rope, 16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lens", [[2048], [1, 7, 130, 2048], [512] * 8], ids=["2048", "mixed", "8x512"])
def test_prefill_kogpt_6b_shapes(lens, dtype):
    check(lens, 16, 256, 64, 16, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_prefill_column_slices_on_gpu(dtype):
    """KoGPT-6B heads as views into the fused GEMM's output (token stride 3d + 40)."""
    check([1, 7, 130, 600], 16, 256, 64, 16, dtype, strided=True)


@pytest.mark.gpu
@needs_cuda
def test_prefill_fp32_on_gpu():
    check([1, 7, 33, 300], 4, 256, 64, 16, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_prefill_attention_kogpt_6b_shape(dtype):
    from kogpt_fast import torch_prefill

    check([2047], 16, 256, 64, 16, dtype, seed=23, strided=True, op=torch_prefill.prefill_attention)
