"""The CUDA library's kernels against kogpt_fast.reference (and the Triton ops, where they have the op).

One test per op, parametrized over implementations against one reference. Tolerances come from the reference's
own low-precision error: err(kernel vs fp32 reference) <= 2 * err(reference in dtype vs fp32 reference) + atol.
Data movement (the KV cache write, RoPE on K) is compared exactly. GPU tests are marked `gpu` and skipped without
CUDA; the CPU tests check the fallback and that nothing loads the library on the CPU path.
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kogpt_fast import backends, cuda_lib, cuda_ops, reference
from kogpt_fast.kv_cache import PagedKVCache

HAS_CUDA = torch.cuda.is_available()

_TRITON_OPS = Path(__file__).resolve().parent.parent / "kernels" / "ops.py"
IMPLS = ["cuda"] + (["triton"] if importlib.util.find_spec("triton") and _TRITON_OPS.is_file() else [])
# The GEMV tests below sweep shapes, rows and epilogues on the CUDA library only: on the triton impl each
# combination would compile its own kernel (minutes of the GPU check's time), and tests/test_gemm.py sweeps the
# Triton GEMV itself. Both impls meet at KoGPT-6B's shapes (test_fused_gemms_at_kogpt_6b_shapes).
GEMV_IMPLS = ["cuda"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}  # fp32: exact up to summation order


def ops_for(impl: str, op: str):
    """The implementation's function for a reference op name. On a GPU machine an implementation that cannot run,
    or lacks an op its tests name, is a failure (tests/gpu_requirements.py), not a skip."""
    from gpu_requirements import require_backend

    require_backend(impl, torch.device("cuda"))
    module = cuda_ops if impl == "cuda" else backends.triton_kernels("ops")
    if not hasattr(module, op):
        pytest.fail(f"the {impl} ops module has no {op}")
    return getattr(module, op)


def impl_head_dims(head_dims: list[int]) -> list[tuple[str, int]]:
    """(impl, head_dim) pairs: odd head dims exercise the CUDA kernels' generality; the Triton ones are checked at
    KoGPT's 256 here (tests/test_*_attention.py sweep them), so those pairs are not generated at all."""
    return [(impl, d) for impl in IMPLS for d in head_dims if impl == "cuda" or d == 256]


def assert_close_to_reference(out, ref32, ref_lowp, atol):
    """err(out vs fp32 ref) <= 2 * err(reference in out's dtype vs fp32 ref) + atol (max abs error)."""
    err = (out.float() - ref32.float()).abs().max().item()
    ref_err = (ref_lowp.float() - ref32.float()).abs().max().item()
    assert err <= 2 * ref_err + atol, f"kernel error {err:.3g} vs reference's own {ref_err:.3g} (+{atol})"


# ---- CPU: fallback and lazy loading ----

def test_cpu_tensors_fall_back_to_the_reference():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(cuda_ops.linear(x, w, b), reference.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(cuda_ops.linear_gelu(x, w, b), reference.linear_gelu(x, w, b), rtol=0, atol=0)
    for gelu_start in (0, 7, 24):
        torch.testing.assert_close(cuda_ops.linear_split_gelu(x, w, b, gelu_start),
                                   reference.linear_split_gelu(x, w, b, gelu_start), rtol=0, atol=0)
    r = torch.randn(3, 24)
    for bias in (b, None):
        torch.testing.assert_close(cuda_ops.linear_residual(x, w, bias, r), reference.linear_residual(x, w, bias, r),
                                   rtol=0, atol=0)
    g, beta = torch.randn(40), torch.randn(40)
    torch.testing.assert_close(cuda_ops.layer_norm_linear_split_gelu(x, g, beta, 1e-5, w, b, 7),
                               reference.layer_norm_linear_split_gelu(x, g, beta, 1e-5, w, b, 7), rtol=0, atol=0)
    x2 = torch.randn(3, 50)[:, 5:25]
    w2 = torch.randn(24, 60)
    torch.testing.assert_close(cuda_ops.linear_concat_residual(x, x2, w2, b, r),
                               reference.linear_concat_residual(x, x2, w2, b, r), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation"):
        cuda_ops.linear_split_gelu(x, w, b, 7, "relu")
    assert cuda_ops.rope_table is reference.rope_table


def test_ops_module_has_every_reference_op():
    ops = ("layer_norm", "linear", "linear_gelu", "linear_split_gelu", "layer_norm_linear_split_gelu",
           "linear_residual", "linear_concat_residual", "gelu_new",
           "gelu_pytorch_tanh", "rope_table", "apply_rope", "write_kv_cache", "prefill_attention", "decode_attention")
    assert all(callable(getattr(cuda_ops, n)) for n in ops)


def test_import_and_cpu_ops_do_not_load_the_library():
    code = ("import torch, kogpt_fast\nfrom kogpt_fast import cuda_ops\n"
            "cuda_ops.linear(torch.randn(2, 8), torch.randn(4, 8))\n"
            "print(any('libkogpt_cuda' in l for l in open('/proc/self/maps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_status_never_raises():
    info = cuda_lib.status()
    assert {"library", "present", "loaded", "devices", "device_error", "available"} <= set(info)


# ---- GPU: KV cache write ----

def _loop_write(k, v, k_cache, v_cache, slots):
    """The obviously-correct cache write: a Python loop over slot_mapping."""
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[i]
            v_cache[slot // block_size, slot % block_size] = v[i]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens,block_size", [(1, 8), (13, 16), (37, 8)])
@pytest.mark.parametrize("impl, head_dim", impl_head_dims([256, 64, 48]))
def test_write_kv_cache(impl, dtype, n_tokens, block_size, head_dim):
    device = "cuda"
    torch.manual_seed(n_tokens)
    n_head, num_blocks = 3, 11
    k = torch.randn(n_tokens, n_head, head_dim, device=device).to(dtype)
    v = torch.randn(n_tokens, n_head, head_dim, device=device).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:n_tokens]
    slots[::5] = -1
    k_cache = torch.randn(num_blocks, block_size, n_head, head_dim, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    _loop_write(k, v, k_ref, v_ref, slots)
    ops_for(impl, "write_kv_cache")(k, v, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(256, 64), (64, 64), (80, 32)])
def test_kv_cache_write_with_rope_is_exact(dtype, head_dim, rotary_dim):
    """RoPE on K in the kernel rounds as reference.apply_rope does in the same dtype: equal bits."""
    torch.manual_seed(1)
    n_tokens, n_head, block_size, num_blocks = 19, 4, 8, 5
    k = torch.randn(n_tokens, n_head, head_dim, device="cuda").to(dtype)
    v = torch.randn_like(k)
    positions = torch.randint(0, 2048, (n_tokens,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:n_tokens]
    table = reference.rope_table(2048, rotary_dim, "cuda")
    k_cache = torch.zeros(num_blocks, block_size, n_head, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    _loop_write(reference.apply_rope(k, positions, table, rotary_dim), v, k_ref, v_ref, slots)
    cuda_lib.kv_cache_write(k, v, k_cache, v_cache, slots, positions, table, rotary_dim)
    torch.cuda.synchronize()
    assert torch.equal(v_cache, v_ref)
    assert torch.equal(k_cache, k_ref), (k_cache.float() - k_ref.float()).abs().max()


# ---- GPU: decode attention ----

def _decode_case(batch, block_size, head_dim, dtype, seed=0, n_head=4, rotary_dim=64):
    """A paged cache holding random histories of odd lengths (ending mid-block), and one decode step's inputs."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 5 * block_size, (batch,), generator=g)]
    lengths[0] = 3 * block_size - 1
    cache = PagedKVCache(1, sum(-(-(n + 1) // block_size) for n in lengths) + 2, block_size, n_head, head_dim,
                         torch.float32, "cuda")
    cache.start(lengths)
    prefill = cache.plan(lengths, torch.cat([torch.arange(n) for n in lengths]), is_prefill=True)
    n = sum(lengths)
    history_k = torch.randn(n, n_head, head_dim, generator=g).cuda()
    history_v = torch.randn(n, n_head, head_dim, generator=g).cuda()
    reference.write_kv_cache(history_k, history_v, cache.k[0], cache.v[0], prefill.slot_mapping)
    meta = cache.plan([1] * batch, torch.tensor(lengths), is_prefill=False)
    q, k, v = (torch.randn(batch, n_head, head_dim, generator=g).cuda() for _ in range(3))
    rope = reference.rope_table(2048, min(rotary_dim, head_dim), "cuda")
    return cache, meta, q, k, v, rope, min(rotary_dim, head_dim)


def _run_reference(dtype, cache, meta, q, k, v, rope, rotary_dim):
    k_cache, v_cache = cache.k[0].to(dtype).clone(), cache.v[0].to(dtype).clone()
    out = reference.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), meta, k_cache, v_cache, rope, rotary_dim)
    return out, k_cache, v_cache


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,block_size", [(1, 16), (3, 8), (5, 16)])
@pytest.mark.parametrize("impl, head_dim", impl_head_dims([256, 128, 64]))
def test_decode_attention(impl, dtype, batch, block_size, head_dim):
    case = _decode_case(batch, block_size, head_dim, dtype, seed=batch * 7 + block_size)
    cache, meta, q, k, v, rope, rotary_dim = case
    ref32, _, _ = _run_reference(torch.float32, *case)
    ref_lowp, k_ref, v_ref = _run_reference(dtype, *case)
    k_cache, v_cache = cache.k[0].to(dtype), cache.v[0].to(dtype)
    out = ops_for(impl, "decode_attention")(q.to(dtype), k.to(dtype), v.to(dtype), meta, k_cache, v_cache, rope,
                                            rotary_dim)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to_reference(out, ref32, ref_lowp, ATOL[dtype])
    if impl == "cuda":  # the fused cache write rounds RoPE as the reference does
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("partition_size", [32, 64, 512])
def test_decode_attention_partition_sizes(partition_size):
    """The flash-decoding split and reduction give the same answer whatever the number of splits."""
    dtype = torch.float16
    case = _decode_case(2, 16, 256, dtype, seed=3)
    cache, meta, q, k, v, rope, rotary_dim = case
    ref32, _, _ = _run_reference(torch.float32, *case)
    ref_lowp, _, _ = _run_reference(dtype, *case)
    k_cache, v_cache = cache.k[0].to(dtype), cache.v[0].to(dtype)
    out = cuda_lib.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), k_cache, v_cache, meta.slot_mapping,
                                    meta.positions, rope, rotary_dim, meta.block_tables, meta.seq_lens,
                                    partition_size=partition_size)
    assert_close_to_reference(out, ref32, ref_lowp, ATOL[dtype])


def _column_slices(*tensors, extra=40):
    """[N, H, D] tensors as views into one wider [N, len * H * D + extra] buffer, as the model takes q, k, v from
    the fused q | k | v | fc_in GEMM output: last two dims contiguous, token stride > H * D. Same values."""
    n, h, d = tensors[0].shape
    wide = torch.randn(n, len(tensors) * h * d + extra, device=tensors[0].device).to(tensors[0].dtype)
    views = []
    for i, t in enumerate(tensors):
        wide[:, i * h * d:(i + 1) * h * d] = t.reshape(n, h * d)
        views.append(wide[:, i * h * d:(i + 1) * h * d].view(-1, h, d))
    assert all(t.stride() == (wide.shape[1], d, 1) and torch.equal(t, s) for t, s in zip(views, tensors))
    return views


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, head_dim", impl_head_dims([256, 64]))
def test_write_kv_cache_column_slices(impl, dtype, head_dim):
    """k, v with token stride 2 * H * D + 40: the same cache contents as contiguous k, v (exact)."""
    torch.manual_seed(4)
    n_tokens, n_head, block_size, num_blocks = 37, 3, 8, 11
    k = torch.randn(n_tokens, n_head, head_dim, device="cuda").to(dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:n_tokens]
    slots[::5] = -1
    k_cache = torch.randn(num_blocks, block_size, n_head, head_dim, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    _loop_write(k, v, k_ref, v_ref, slots)
    ks, vs = _column_slices(k, v)
    ops_for(impl, "write_kv_cache")(ks, vs, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    if impl == "cuda":  # with RoPE: the library's strided k read, rotated as the reference rotates
        positions = torch.randint(0, 2048, (n_tokens,), device="cuda")
        table = reference.rope_table(2048, 64, "cuda")
        _loop_write(reference.apply_rope(k, positions, table, 64), v, k_ref, v_ref, slots)
        cuda_lib.kv_cache_write(ks, vs, k_cache, v_cache, slots, positions, table, 64)
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,block_size", [(1, 16), (5, 8)])
@pytest.mark.parametrize("impl, head_dim", impl_head_dims([256, 64]))
def test_decode_attention_column_slices(impl, dtype, batch, block_size, head_dim):
    """q, k, v as views into the fused GEMM's output (token stride 3 * H * D + 40): as test_decode_attention."""
    case = _decode_case(batch, block_size, head_dim, dtype, seed=batch * 11 + block_size)
    cache, meta, q, k, v, rope, rotary_dim = case
    ref32, _, _ = _run_reference(torch.float32, *case)
    ref_lowp, k_ref, v_ref = _run_reference(dtype, *case)
    k_cache, v_cache = cache.k[0].to(dtype), cache.v[0].to(dtype)
    qs, ks, vs = _column_slices(q.to(dtype), k.to(dtype), v.to(dtype))
    out = ops_for(impl, "decode_attention")(qs, ks, vs, meta, k_cache, v_cache, rope, rotary_dim)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close_to_reference(out, ref32, ref_lowp, ATOL[dtype])
    if impl == "cuda":  # the fused cache write rounds RoPE as the reference does
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        # The partition kernel reads q, k, v at their strides: the strides change where it reads, not what it computes.
        k_contig, v_contig = cache.k[0].to(dtype), cache.v[0].to(dtype)
        same = cuda_ops.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), meta, k_contig, v_contig, rope,
                                         rotary_dim)
        assert torch.equal(out, same)


def test_cpu_ops_take_column_slices():
    """On the CPU (the reference's path) q, k, v views into a wider buffer give the contiguous inputs' result."""
    g = torch.Generator().manual_seed(2)
    n_head, head_dim, block_size = 2, 64, 8
    cache = PagedKVCache(1, 8, block_size, n_head, head_dim, torch.float32, "cpu")
    cache.start([5, 3])
    meta = cache.plan([5, 3], torch.cat([torch.arange(5), torch.arange(3)]), is_prefill=True)
    q, k, v = (torch.randn(8, n_head, head_dim, generator=g) for _ in range(3))
    rope = reference.rope_table(64, 32)
    k_cache, v_cache = cache.k[0].clone(), cache.v[0].clone()
    expected = cuda_ops.prefill_attention(q, k, v, meta, k_cache, v_cache, rope, 32)
    qs, ks, vs = _column_slices(q, k, v)
    got = cuda_ops.prefill_attention(qs, ks, vs, meta, cache.k[0], cache.v[0], rope, 32)
    assert torch.equal(got, expected)
    assert torch.equal(cache.k[0], k_cache) and torch.equal(cache.v[0], v_cache)


# ---- GPU: GEMV ----

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", GEMV_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (333, 264), (77, 257)])  # 257: K not a multiple of 8 (scalar path)
@pytest.mark.parametrize("op", ["linear", "linear_bias", "linear_gelu"])
def test_linear(impl, dtype, m, n, k, op):
    torch.manual_seed(m * 1000 + n)
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") / math.sqrt(k)
    b = torch.randn(n, device="cuda")
    args32 = (x, w) if op == "linear" else (x, w, b)
    args = tuple(t.to(dtype) for t in args32)
    ref_op = getattr(reference, "linear_gelu" if op == "linear_gelu" else "linear")
    out = ops_for(impl, "linear_gelu" if op == "linear_gelu" else "linear")(*args)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close_to_reference(out, ref_op(*args32), ref_op(*args), ATOL[dtype])


def _gemm_inputs(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g)
    return [t.cuda() for t in (x, w, b, r)]


def _check_split_gelu(impl, dtype, m, n, k, gelu_start, seed=0):
    x, w, b, _ = _gemm_inputs(m, n, k, seed)
    args = [t.to(dtype) for t in (x, w, b)]
    out = ops_for(impl, "linear_split_gelu")(*args, gelu_start)
    assert out.shape == (m, n) and out.dtype == dtype
    ref32 = reference.linear_split_gelu(x, w, b, gelu_start)
    assert_close_to_reference(out, ref32, reference.linear_split_gelu(*args, gelu_start), ATOL[dtype])
    if gelu_start > 0:  # no GELU left of gelu_start (gelu(y) and y differ by far more than the tolerance there)
        plain = reference.linear(*args)[:, :gelu_start]
        assert_close_to_reference(out[:, :gelu_start], ref32[:, :gelu_start], plain, ATOL[dtype])


def _check_residual(impl, dtype, m, n, k, use_bias=True, seed=0):
    x, w, b, r = _gemm_inputs(m, n, k, seed)
    b = b if use_bias else None
    args = [t.to(dtype) if t is not None else None for t in (x, w, b, r)]
    out = ops_for(impl, "linear_residual")(*args)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close_to_reference(out, reference.linear_residual(x, w, b, r), reference.linear_residual(*args),
                              ATOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", GEMV_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 33])  # 33: cuda_ops falls back (Triton) beyond the GEMV's 16 rows
@pytest.mark.parametrize("n,k", [(333, 264), (77, 257)])  # 257: K not a multiple of 8 (the GEMV's scalar path)
@pytest.mark.parametrize("gelu_start", ["0", "mid", "N"])
def test_linear_split_gelu(impl, dtype, m, n, k, gelu_start):
    """GELU from column 0 (linear_gelu), from a column on no tile or warp boundary, from N (none: linear)."""
    start = {"0": 0, "mid": n // 3 + 1, "N": n}[gelu_start]
    _check_split_gelu(impl, dtype, m, n, k, start, seed=m * 1000 + n + start)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", GEMV_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("n,k", [(136, 520), (77, 257 + 96)])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_residual(impl, dtype, m, n, k, use_bias):
    _check_residual(impl, dtype, m, n, k, use_bias, seed=m * 1000 + n)


def _concat_inputs(m, n, k1, k2, seed, offset):
    """x1 [m, k1]; x2 [m, k2] a column slice starting `offset` elements into a wider buffer (8: 16-byte aligned
    rows in fp16, the vector path; 3: misaligned, the scalar path); fp32 on the device."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(m, k1, generator=g)
    wide = torch.randn(m, offset + k2 + 8, generator=g)
    w = torch.randn(n, k1 + k2, generator=g) / math.sqrt(k1 + k2)
    b = torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g)
    x1, wide, w, b, r = (t.cuda() for t in (x1, wide, w, b, r))
    return x1, wide[:, offset:offset + k2], w, b, r


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", GEMV_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 33])  # 33: cuda_ops falls back (Triton's tiled GEMM)
# (K1, K2, x2's offset): the vector path; K1, K2 not multiples of 8 (scalar); x2's rows misaligned (scalar); one
# piece empty.
@pytest.mark.parametrize("k1,k2,offset", [(256, 520, 8), (40, 257, 8), (256, 520, 3), (0, 96, 8), (96, 0, 8)])
def test_linear_concat_residual(impl, dtype, m, k1, k2, offset):
    x1, x2, w, b, r = _concat_inputs(m, 136, k1, k2, seed=m * 1000 + k1 + offset, offset=offset)
    args = [t.to(dtype) for t in (x1, x2, w, b, r)]
    out = ops_for(impl, "linear_concat_residual")(*args)
    assert out.shape == (m, 136) and out.dtype == dtype
    assert_close_to_reference(out, reference.linear_concat_residual(x1, x2, w, b, r),
                              reference.linear_concat_residual(*args), ATOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_concat_equals_the_concatenation_bitwise(dtype, m):
    """Each lane sums the same k in the same order whichever piece holds it: [x1 | x2] read in place gives the bits
    of the GEMV over the concatenation (KoGPT-6B's out_proj + fc_out, x2 a slice of the fused GEMM's output)."""
    x1, x2, w, b, r = (t.to(dtype) for t in _concat_inputs(m, 4096, 4096, 16384, seed=m, offset=3 * 4096))
    whole = torch.cat([x1, x2], dim=1)
    assert torch.equal(cuda_ops.linear_concat_residual(x1, x2, w, b, r), cuda_ops.linear_residual(whole, w, b, r))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3])  # 3: beyond the prologue's rows, LayerNorm then the GEMV
@pytest.mark.parametrize("n,k", [(333, 264), (77, 257), (3 * 4096 + 16384, 4096)])  # 257: the scalar path
def test_layer_norm_linear_split_gelu(dtype, m, n, k):
    """ln_1 and GPT-J's first fused GEMV in one launch (the GEMV's LayerNorm prologue) against the reference."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = (3.0 * torch.randn(m, k, generator=g) + 0.5).cuda()  # a mean and a spread the LayerNorm must remove
    ln_w, ln_b = (1.0 + 0.2 * torch.randn(k, generator=g)).cuda(), (0.1 * torch.randn(k, generator=g)).cuda()
    w, b = (torch.randn(n, k, generator=g) / math.sqrt(k)).cuda(), torch.randn(n, generator=g).cuda()
    gelu_start = n // 3 + 1
    args32 = (x, ln_w, ln_b, 1e-5, w, b, gelu_start)
    args = tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in args32)
    out = ops_for("cuda", "layer_norm_linear_split_gelu")(*args)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close_to_reference(out, reference.layer_norm_linear_split_gelu(*args32),
                              reference.layer_norm_linear_split_gelu(*args), ATOL[dtype])


# KoGPT-6B: q|k|v|fc_in as one GEMM (N = 3*4096 + 16384, K = 4096, GELU from 3*4096 on) and out_proj|fc_out as
# one GEMM (N = 4096, K = 4096 + 16384) into the residual; M = 1 is batch-1 decode.
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16])
def test_fused_gemms_at_kogpt_6b_shapes(impl, dtype, m):
    _check_split_gelu(impl, dtype, m, 3 * 4096 + 16384, 4096, 3 * 4096, seed=m)
    _check_residual(impl, dtype, m, 4096, 4096 + 16384, seed=m)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gemv_gelu_start_zero_equals_linear_gelu_bitwise():
    """kogpt_gemv's semantics are kept: gelu_start 0 is linear_gelu, gelu_start N is linear, bit for bit."""
    x, w, b, _ = (t.half() for t in _gemm_inputs(3, 200, 512, seed=9))
    gelu = cuda_lib.gemv(x, w, b, activation="gelu_tanh")
    plain = cuda_lib.gemv(x, w, b)
    split = cuda_lib.gemv(x, w, b, activation="gelu_tanh", gelu_start=61)
    assert torch.equal(cuda_lib.gemv(x, w, b, activation="gelu_tanh", gelu_start=0), gelu)
    assert torch.equal(cuda_lib.gemv(x, w, b, activation="gelu_tanh", gelu_start=200), plain)
    assert torch.equal(split[:, :61], plain[:, :61]) and torch.equal(split[:, 61:], gelu[:, 61:])
    assert torch.equal(cuda_ops.linear_split_gelu(x, w, b, 61), split)


# ---- GPU: CUDA graphs, streams, errors ----

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_kernels_replay_in_a_cuda_graph():
    """decode_attention and the GEMV captured in torch.cuda.graph, replayed on new inputs, equal eager runs."""
    dtype = torch.float16
    cache, meta, q, k, v, rope, rotary_dim = _decode_case(2, 16, 256, dtype, seed=5)
    k_cache, v_cache = cache.k[0].to(dtype), cache.v[0].to(dtype)
    w = (torch.randn(300, 2 * 4 * 256, device="cuda") / 32).to(dtype)
    static_q, static_k, static_v = q.to(dtype), k.to(dtype), v.to(dtype)

    def step():
        a = cuda_ops.decode_attention(static_q, static_k, static_v, meta, k_cache, v_cache, rope, rotary_dim)
        return cuda_ops.linear_gelu(a.reshape(1, -1), w, torch.zeros(300, dtype=dtype, device="cuda"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph docs do
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in (static_q, static_k, static_v):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda").to(dtype))
        graph.replay()
        replayed = static_out.clone()
        expected = step()
        torch.cuda.synchronize()
        torch.testing.assert_close(replayed, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_errors_name_the_problem():
    assert cuda_lib.is_available() and cuda_lib.status()["devices"] >= 1
    x, w = torch.randn(17, 64, device="cuda", dtype=torch.float16), torch.randn(8, 64, device="cuda",
                                                                             dtype=torch.float16)
    with pytest.raises(ValueError, match="17 rows"):
        cuda_lib.gemv(x, w)
    with pytest.raises(ValueError, match="dtype"):
        cuda_lib.gemv(x[:2].double(), w.double())
    with pytest.raises(ValueError, match="kogpt_gemv.*activation"):  # refused by the library itself
        cuda_lib._check(cuda_lib._library().kogpt_gemv(1, 1, 8, 64, x.data_ptr(), 64, w.data_ptr(), 64, None, None,
                                                       0, x.data_ptr(), 8, 7, None), "kogpt_gemv")
    with pytest.raises(ValueError, match="gelu_start"):
        cuda_lib.gemv(x[:2], w, activation="gelu_tanh", gelu_start=9)
    with pytest.raises(ValueError, match="kogpt_gemv.*gelu_start"):  # refused by the library itself
        cuda_lib._check(cuda_lib._library().kogpt_gemv_split_gelu(
            1, 1, 8, 64, x.data_ptr(), 64, w.data_ptr(), 64, None, None, 0, x.data_ptr(), 8, 1, 9, None), "kogpt_gemv")
    case = _decode_case(1, 8, 96, torch.float16, n_head=2, rotary_dim=32)
    cache, meta, q, k, v, rope, rotary_dim = case
    with pytest.raises(ValueError, match="head_dim 96"):
        cuda_lib.decode_attention(q.half(), k.half(), v.half(), cache.k[0].half(), cache.v[0].half(),
                                  meta.slot_mapping, meta.positions, rope, rotary_dim, meta.block_tables,
                                  meta.seq_lens)
    # head_dim 96 still works through cuda_ops: it falls back to the reference.
    out = cuda_ops.decode_attention(q.half(), k.half(), v.half(), meta, cache.k[0].half(), cache.v[0].half(), rope,
                                    rotary_dim)
    assert out.shape == q.shape


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_demo_model_greedy_equals_reference_ops(monkeypatch):
    """The demo checkpoint in fp16 through cuda_ops gives the torch backend's greedy tokens on the same GPU."""
    from kogpt_fast import KoGPTForCausalLM

    model = KoGPTForCausalLM.from_pretrained(None, device="cuda", dtype=torch.float16, backend="torch")
    ids = torch.tensor([[0, 5, 17, 42, 9]], device="cuda")
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    monkeypatch.setattr(backends, "get_ops", lambda name, device: cuda_ops)
    got = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)
