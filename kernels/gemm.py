"""GEMM with fp32 accumulation and a fused epilogue: out = act([x | x2] @ weight^T + bias) + residual.

    x        [M, K]   activations, contiguous (leading dims are flattened into M), or 2-D with contiguous rows at
                      any row stride (a column slice of a wider buffer)
    x2       [M, K2]  optional: x [M, K1] and x2 [M, K2] together are the GEMM's input [x | x2] (K = K1 + K2), each
                      read in place, so that GPT-J's [attention | gelu(fc_in)] needs no concatenation
    weight   [N, K]   torch Linear layout (out_features, in_features), contiguous; or a kogpt_fast.quant
                      QuantizedWeight: int8 / fp8 (E4M3) data [N, K], contiguous, and scale [N] in x's dtype
    bias     [N]      optional
    residual [M, N]   optional, added after the activation (GPT-J: out_proj / fc_out into the residual stream)
    -> out   [M, N]   in x's dtype, rounded once from the fp32 accumulator

The activation applies to output columns >= gelu_start only (a runtime argument, 0 by default: every column).
GPT-J's fused input projection uses it: weight = [Wq; Wk; Wv; W_in] gives q | k | v | gelu(fc_in) in one GEMM with
gelu_start = 3 * n_embd. Its fused output projection is the residual epilogue over K = n_embd + n_inner.

Quantized weights (W_FORMAT 1: int8, 2: fp8 E4M3) are read as bytes and decoded in registers to fp16 holding their
exact values (_decode_weight), the products and sums run as for dense weights, and the row's scale multiplies the
fp32 accumulator before the epilogue: out = epilogue(scale[n] * sum_k q[n, k] * x[m, k]), one rounding at the store.

Constexprs: W_FORMAT (0: a dense weight in x's dtype; 1, 2: quantized, as above), HAS_X2 / HAS_BIAS / HAS_RESIDUAL
(which inputs exist), GELU (tanh-approximated GELU, gelu_new, on the
columns from gelu_start on; GELU=False means no column),
DOT_PRECISION ("ieee" for fp32 inputs: exact fp32 products for the tests; TF32 would round them),
BLOCK_M / BLOCK_N / BLOCK_K / GROUP_M (tiling; GROUP_M groups row tiles so neighbouring programs share weights in L2).
The GEMV's constexprs: the same epilogue flags, ROWS (= M, unrolled), BLOCK_M / BLOCK_N / BLOCK_K.

Two kernels. On CUDA, M <= 16 (decode) goes to _gemv_kernel: a GEMV, bound by reading the weight once, so each
program owns BLOCK_N = 4-8 weight rows and streams them along K in steps of 1024 (fp16/bf16; 512 for fp32), with
fp32 broadcast-multiply-and-sum (no tl.dot, which needs 16 rows) and the same epilogue. For large weights the
tiles are measured on the card at the first call (GEMV_CANDIDATES, tune_gemv). Larger M goes to the tiled
_gemm_kernel. Under the CPU interpreter every M takes the tiled kernel with large tiles (its cost is per program);
config="gemv" (or a GemvConfig) forces the GEMV there so that the tests run it, config="gemm" forces the tiled one.
"""
from __future__ import annotations

import logging
import math
import operator
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kogpt_fast.quant import QuantizedWeight

from .checks import check_interpretable, check_same_dtype, check_tensor, dot_precision

logger = logging.getLogger(__name__)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


class GemvConfig(NamedTuple):
    block_n: int  # weight rows (output columns) per program
    block_k: int  # K step
    num_warps: int = 4


GEMV_MAX_M = 16  # rows of x the GEMV handles (one weight tile per K step serves them all)
# Rows the GEMV normalises itself (gemm(ln=...)): each program reads x's rows twice more for their statistics, 2 x M x
# K elements from L2 a program against its BLOCK_N x K of weights from HBM. Beyond 2 rows that L2 traffic outgrows
# what one LayerNorm kernel costs; larger M runs the LayerNorm kernel first.
LN_IN_GEMV_MAX_M = 2


def use_gemv(m: int, device: torch.device) -> bool:
    """gemm()'s dispatch with config None: the GEMV for decode-sized M on CUDA, the tiled GEMM otherwise (and
    always under the CPU interpreter, where the GEMV's many small programs would be slow; config="gemv" forces it)."""
    return device.type == "cuda" and m <= GEMV_MAX_M


def pick_gemv_config(m: int, n: int, k: int, dtype: torch.dtype, weight_bytes: int | None = None) -> GemvConfig:
    """DESIGN.md's measured GEMV (H100, M=1): one program per 4-8 rows, BK=1024, 4 warps, 2.17 / 1.58 / 2.34 /
    2.27 / 2.90 TB/s at qkv / out / fc_in / fc_out / lm_head, each a little ahead of cuBLAS. 4 warps: per K step a
    program reads BLOCK_N x 1024 x 2 bytes = 8-16 KB of weight, 4-8 16-byte loads per thread issued together, in
    about 40 registers at M = 1 (sm_90, offline compile), so many programs stay resident per SM.
    BLOCK_N = 8 by default; 4 for N < 8192 at M <= 2 (out_proj / fc_out, N = 4096: 1024 programs instead of 512
    on 132 SMs, twice the resident warps to hide each step's cross-warp reduction; these 4096-row shapes are where
    DESIGN.md measured the lost bandwidth). At larger M each program re-reads the x rows (M/BLOCK_N of the weight
    traffic, from L1/L2), so M > 2 keeps 8. fp32: BLOCK_K 512, the same bytes per step; one-byte (quantized)
    weights: BLOCK_K 2048, the same bytes per step again (weight_bytes: the weight's element size, default x's).
    The same config under the interpreter, so that the CPU tests run the tiles the GPU runs."""
    weight_bytes = weight_bytes or dtype.itemsize
    block_k = {4: 512, 2: 1024, 1: 2048}[weight_bytes]
    block_n = 4 if n < 8192 and m <= 2 else 8
    return GemvConfig(block_n, block_k, num_warps=4)


# The GEMV tiles gemm() measures on the card, for weights of at least TUNE_MIN_WEIGHTS elements (4096 x 1024 and
# up: every KoGPT-6B projection), at the first call with each shape and epilogue: DESIGN.md's measured design
# (4-8 rows a program, K steps of 1024) and its neighbours. The fastest by triton.testing.do_bench (L2 flushed
# before each run, as the weights arrive from HBM in the model) is kept for the process. KOGPT_GEMV_TUNE=0 keeps
# pick_gemv_config's choice; no tuning while a CUDA graph is being captured (the decode step warms up first).
GEMV_CANDIDATES = (
    GemvConfig(4, 1024, 4), GemvConfig(8, 1024, 4), GemvConfig(8, 512, 4), GemvConfig(16, 1024, 8),
)
# For one-byte (int8 / fp8) weights: the same bytes per K step at twice the elements, and the dense tiles.
GEMV_CANDIDATES_QUANTIZED = tuple(c._replace(block_k=2 * c.block_k) for c in GEMV_CANDIDATES)
TUNE_MIN_WEIGHTS = 1 << 22
_tuned: dict[tuple, GemvConfig] = {}


def tuning_enabled() -> bool:
    return os.environ.get("KOGPT_GEMV_TUNE", "1") != "0"


def tuned_configs() -> dict[str, str]:
    """What the tuner chose so far, for the benchmark's record: {"M=1 N=.. K=.. float16 ...": "GemvConfig(...)"}."""
    return {" ".join(f"{k}={v}" for k, v in key): repr(cfg) for key, cfg in _tuned.items()}


def tune_gemv(key: tuple, candidates, run, bench=None) -> GemvConfig:
    """The fastest of candidates for this key (cached): run(config) launches the GEMV, bench(fn) times it in ms.
    A candidate that fails to compile or launch is skipped (with at least one left)."""
    if key in _tuned:
        return _tuned[key]
    if bench is None:
        def bench(fn):
            return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median")
    timings = []
    for cfg in candidates:
        try:
            timings.append((bench(lambda cfg=cfg: run(cfg)), cfg))
        except Exception as e:  # a tile this card cannot run: the others decide
            timings.append((float("inf"), cfg))
            logger.debug("GEMV candidate %s failed for %s: %s", cfg, key, e)
    best_ms, best = min(timings, key=lambda t: t[0])
    if best_ms == float("inf"):
        raise RuntimeError(f"no GEMV candidate ran for {key}")
    _tuned[key] = best
    logger.debug("GEMV %s: %s (%.1f us)", key, best, best_ms * 1e3)
    return best


def pick_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The tiled kernel's tiles. On CUDA, M <= 16 reaches it only through config="gemm" (gemm() sends it to the
    GEMV); its skinny config is kept for that comparison."""
    if device.type != "cuda":  # the interpreter: few, large programs (its cost is per program and per op)
        def fit(size, cap):
            return min(cap, max(16, triton.next_power_of_2(size)))

        return GemmConfig(fit(m, 64), fit(n, 1024), fit(k, 512), num_stages=1)
    wide = dtype == torch.float32  # 4-byte elements: half the K step for the same shared memory
    if m <= 16:
        return GemmConfig(16, 16, 128 if wide else 256, group_m=1, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(64, 64, 32 if wide else 64, num_warps=4, num_stages=4)
    return GemmConfig(128, 128, 32 if wide else 64, num_warps=8, num_stages=3)


@triton.jit
def gelu_tanh(y):
    """0.5*y*(1 + tanh(sqrt(2/pi)*(y + 0.044715*y^3))) in fp32; tanh via exp (tl's tanh is a libdevice call)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    t = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow
    tanh_abs = (1.0 - t) / (1.0 + t)
    tanh = tl.where(u < 0, -tanh_abs, tanh_abs)
    return 0.5 * y * (1.0 + tanh)


W_DENSE, W_INT8, W_FP8 = 0, 1, 2  # the W_FORMAT constexpr
# E4M3 bytes decode to value / 2**8 in fp16 (_decode_weight): the factor goes into the scale, once a row.
FP8_DECODE_FACTOR = tl.constexpr(256.0)


@triton.jit
def _decode_weight(w, W_FORMAT: tl.constexpr):
    """A weight tile as loaded -> its values: dense weights as they are; int8 and E4M3 bytes as fp16 by integer
    operations only (exact, no int-to-float conversion instruction, which runs at a quarter of the FMA rate):
    - int8 v: the fp16 with bits 0x6400 + (v + 128) is 1024 + v + 128 (fp16 holds every integer up to 2048), so
      subtracting 1152 leaves v;
    - E4M3 byte s eeee mmm: the fp16 with bits s 0eeee mmm0000000 has E4M3's mantissa, and its exponent field
      e is read with fp16's bias 15 instead of E4M3's 7 (subnormals included): it is the value / 2**8
      (FP8_DECODE_FACTOR, applied with the scale)."""
    if W_FORMAT == 1:
        return (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    elif W_FORMAT == 2:
        b = w.to(tl.uint16)
        return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
    else:
        return w


@triton.jit
def _scale_rows(acc, scale_ptr, rn, in_n, W_FORMAT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] times each column's (weight row's) scale, for quantized weights."""
    if W_FORMAT != 0:
        scale = tl.load(scale_ptr + rn, mask=in_n, other=0.0).to(tl.float32)
        if W_FORMAT == 2:
            scale = scale * FP8_DECODE_FACTOR
        acc = acc * scale[None, :]
    return acc


@triton.jit
def _gemm_k_range(acc, x_ptr, stride_x, w_ptr, rm, rn, M, N, K, k_len, w_col0,
                  DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, W_FORMAT: tl.constexpr):
    """acc += x[rm, :k_len] @ weight[rn, w_col0:w_col0 + k_len]^T (x's rows stride_x apart, weight's K apart)."""
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + w_col0 + rk[:, None]  # [BLOCK_K, BLOCK_N]: weight^T
    for k0 in range(0, k_len, BLOCK_K):
        in_k = rk + k0 < k_len
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=in_k[:, None] & (rn[None, :] < N), other=0.0)
        b = _decode_weight(b, W_FORMAT).to(a.dtype)  # exact: quantized values are exact in fp16, bf16, fp32
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr, x2_ptr, w_ptr, scale_ptr, bias_ptr, residual_ptr, out_ptr,
    M, N, K, K1, stride_x, stride_x2, gelu_start,
    W_FORMAT: tl.constexpr, HAS_X2: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Program id -> (row tile, column tile), GROUP_M row tiles at a time.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    tile_n = (pid % (GROUP_M * tiles_n)) // group_m

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # x's columns 0..K1-1, then (HAS_X2) x2's as the weight's columns K1..K-1: [x | x2] is never materialised.
    acc = _gemm_k_range(acc, x_ptr, stride_x, w_ptr, rm, rn, M, N, K, K1, 0, DOT_PRECISION, BLOCK_K, W_FORMAT)
    if HAS_X2:
        acc = _gemm_k_range(acc, x2_ptr, stride_x2, w_ptr, rm, rn, M, N, K, K - K1, K1, DOT_PRECISION, BLOCK_K,
                            W_FORMAT)
    acc = _scale_rows(acc, scale_ptr, rn, rn < N, W_FORMAT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = tl.where(rn[None, :] >= gelu_start, gelu_tanh(acc), acc)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    out_offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _row_stats(x_ptr, stride_x, rm, M, K, eps, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, rstd) [BLOCK_M] of x's first M <= ROWS rows over K, in fp32 with _layer_norm_kernel's formula: the mean,
    then the mean of the squared deviations (two passes over the row, from L1/L2), rstd = 1 / sqrt(var + eps). Not
    its bits: the sums run in K steps, so a normalised element may differ from the LayerNorm kernel's by an ulp."""
    rk = tl.arange(0, BLOCK_K)
    means = tl.zeros([BLOCK_M], tl.float32)
    rstds = tl.zeros([BLOCK_M], tl.float32)
    for m in tl.static_range(ROWS):
        total = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            total += tl.load(x_ptr + m * stride_x + k0 + rk, mask=(k0 + rk < K) & (m < M), other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / K
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            in_k = (k0 + rk < K) & (m < M)
            xm = tl.load(x_ptr + m * stride_x + k0 + rk, mask=in_k, other=0.0).to(tl.float32)
            centered = tl.where(in_k, xm - mean, 0.0)
            squares += centered * centered
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        means = tl.where(rm == m, mean, means)
        rstds = tl.where(rm == m, rstd, rstds)
    return means, rstds


@triton.jit
def _gemv_k_range(acc, x_ptr, stride_x, w_ptr, rn, in_n, rm, M, K, k_len, w_col0,
                  ln_w_ptr, ln_b_ptr, means, rstds,
                  HAS_LN: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, W_FORMAT: tl.constexpr):
    """acc[m, :] += x[m, :k_len] . weight[rn, w_col0:w_col0 + k_len] for m < M <= ROWS (x's rows stride_x apart).
    With HAS_LN, x's rows are LayerNorm'd first: (x - mean) * rstd * ln_w + ln_b, rounded to x's dtype, as
    _layer_norm_kernel writes them."""
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + w_col0 + rk[None, :]  # [BLOCK_N, BLOCK_K]
    for k0 in range(0, k_len, BLOCK_K):
        in_k = rk + k0 < k_len
        # Streamed once: evict first, so that x (re-read by every program) stays cached.
        w = tl.load(w_ptrs, mask=in_n[:, None] & in_k[None, :], other=0.0, eviction_policy="evict_first")
        w = _decode_weight(w, W_FORMAT).to(tl.float32)
        if HAS_LN:
            gain = tl.load(ln_w_ptr + k0 + rk, mask=in_k, other=0.0).to(tl.float32)
            shift = tl.load(ln_b_ptr + k0 + rk, mask=in_k, other=0.0).to(tl.float32)
        for m in tl.static_range(ROWS):
            xm = tl.load(x_ptr + m * stride_x + k0 + rk, mask=in_k & (m < M), other=0.0)
            if HAS_LN:
                mean = tl.sum(tl.where(rm == m, means, 0.0), axis=0)
                rstd = tl.sum(tl.where(rm == m, rstds, 0.0), axis=0)
                h = tl.where(in_k, xm.to(tl.float32) - mean, 0.0) * rstd * gain + shift
                xm = h.to(xm.dtype)
            part = tl.sum(w * xm.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
            acc = tl.where(rm[:, None] == m, acc + part[None, :], acc)
        w_ptrs += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, x2_ptr, w_ptr, scale_ptr, bias_ptr, residual_ptr, out_ptr, ln_w_ptr, ln_b_ptr,
    M, N, K, K1, stride_x, stride_x2, gelu_start, eps,
    W_FORMAT: tl.constexpr, HAS_X2: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[:M, cols] for the BLOCK_N columns of this program. ROWS (= BLOCK_M) is M rounded up to a power of two
    (1, 2, 4, 8, 16; unrolled, rows from M on masked off) and M a runtime argument that Triton does not specialise
    on: the 16 decode-sized M values compile 5 kernels per epilogue, not 16 (each compile takes seconds on a cold
    cache: a first request with a new short prompt, or a new batch size, would wait for it).
    The weight tile [BLOCK_N, BLOCK_K] is read once per K step (the traffic that matters) and serves every row of x;
    products and sums in fp32, one rounding at the store. With HAS_X2, x2 supplies the weight's columns K1..K-1.
    With HAS_LN (no x2), x's rows are LayerNorm'd on the fly: each program computes their mean and rstd itself,
    which spares the decode step a LayerNorm kernel (and its launch) before the GEMV."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    in_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LN:
        means, rstds = _row_stats(x_ptr, stride_x, rm, M, K1, eps, ROWS, BLOCK_M, BLOCK_K)
    else:
        means = tl.zeros([BLOCK_M], tl.float32)
        rstds = means
    acc = _gemv_k_range(acc, x_ptr, stride_x, w_ptr, rn, in_n, rm, M, K, K1, 0, ln_w_ptr, ln_b_ptr, means, rstds,
                        HAS_LN, ROWS, BLOCK_K, W_FORMAT)
    if HAS_X2:
        acc = _gemv_k_range(acc, x2_ptr, stride_x2, w_ptr, rn, in_n, rm, M, K, K - K1, K1, ln_w_ptr, ln_b_ptr, means,
                            rstds, False, ROWS, BLOCK_K, W_FORMAT)
    acc = _scale_rows(acc, scale_ptr, rn, in_n, W_FORMAT)

    # The tiled kernel's epilogue, on the [BLOCK_M, BLOCK_N] tile.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = tl.where(rn[None, :] >= gelu_start, gelu_tanh(acc), acc)
    out_mask = (rm[:, None] < M) & in_n[None, :]
    out_offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


ACTIVATIONS = (None, "gelu_tanh")
WEIGHT_FORMAT_NAMES = {W_DENSE: "dense", W_INT8: "int8", W_FP8: "fp8"}


def _weight_operands(weight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(the tensor the kernel reads as weight, the scales or None, W_FORMAT): a dense weight as it is; a
    QuantizedWeight's data (E4M3 as its bytes, which the kernels decode themselves) and scales."""
    if not isinstance(weight, QuantizedWeight):
        check_tensor("weight", weight, dim=2, device=device)
        return weight, None, W_DENSE
    check_tensor("weight data", weight.data, dim=2, dtypes=(torch.int8, torch.float8_e4m3fn), device=device)
    check_tensor("weight scale", weight.scale, shape=(weight.shape[0],), device=device)
    if weight.scheme == "fp8":
        return weight.data.view(torch.uint8), weight.scale, W_FP8
    return weight.data, weight.scale, W_INT8


def check_column_start(name: str, start, n: int) -> int:
    """start as an int in [0, n] (a Python or numpy integer, or a 0-dim integer tensor), else a ValueError."""
    try:
        if isinstance(start, bool):
            raise TypeError
        value = operator.index(start)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(start).__name__}") from None
    if not 0 <= value <= n:
        raise ValueError(f"{name} must be in [0, {n}] (weight's out_features), got {value}")
    return value


def _rows(name: str, t: torch.Tensor, k: int) -> tuple[int, int]:
    """(rows, row stride) of t seen as [rows, k]: any contiguous tensor ending in k, or a 2-D one with unit column
    stride and any row stride (e.g. a column slice of a wider activation)."""
    if t.dim() == 0 or t.shape[-1] != k:
        raise ValueError(f"{name} {tuple(t.shape)} must end in {k}")
    if t.is_contiguous():
        return math.prod(t.shape[:-1]), k
    if t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1):
        return t.shape[0], t.stride(0)
    raise ValueError(f"{name} must be contiguous, or 2-D with contiguous rows (shape {tuple(t.shape)}, "
                     f"strides {t.stride()})")


def gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    config: GemmConfig | GemvConfig | str | None = None,
    gelu_start: int = 0,
    x2: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """act([x | x2] @ weight^T + bias) + residual, shapes in the module docstring.

    x: contiguous, or 2-D with contiguous rows at any row stride. x2 (optional, the same rules and leading shape
    as x) continues x along K: x [.., K1] and x2 [.., K - K1] are read in place, never concatenated.
    ln = (ln_weight [K], ln_bias [K], eps) (without x2): the GEMM's input is layer_norm(x) (kernels/layer_norm.py's
    formula, rounded to x's dtype; see _row_stats); the GEMV computes it on the fly for M <= LN_IN_GEMV_MAX_M, otherwise a
    LayerNorm kernel runs first.
    config: None picks the kernel (use_gemv) and its tiles by shape; "gemv" / "gemm" force the GEMV (M <= 16 only)
    / the tiled kernel with tiles picked by shape; a GemvConfig / GemmConfig forces that kernel with those tiles.
    The activation applies to the output columns gelu_start..N-1 only (0 <= gelu_start <= N; N: none).
    weight: a dense tensor, or a QuantizedWeight (int8 / fp8 data [N, K] contiguous, scale [N] in x's dtype).
    """
    check_tensor("x", x, contiguous=False)
    weight, scale, w_format = _weight_operands(weight, x.device)
    n, k = weight.shape
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dim, got a 0-dim tensor (weight {tuple(weight.shape)})")
    k1 = x.shape[-1]
    if x2 is None:
        if k1 != k:
            raise ValueError(f"x {tuple(x.shape)} must end in weight's in_features {k} (weight {tuple(weight.shape)})")
    else:
        check_tensor("x2", x2, device=x.device, contiguous=False)
        if x2.shape[:-1] != x.shape[:-1] or x2.dim() == 0 or k1 + x2.shape[-1] != k:
            raise ValueError(f"x {tuple(x.shape)} and x2 {tuple(x2.shape)} must share their leading dims and their "
                             f"last dims must add up to weight's in_features {k} (weight {tuple(weight.shape)})")
    if ln is not None:
        if x2 is not None:
            raise ValueError("ln (a LayerNorm of x) and x2 cannot be combined")
        if not (isinstance(ln, tuple) and len(ln) == 3):
            raise ValueError("ln must be a tuple (ln_weight, ln_bias, eps)")
        check_tensor("ln_weight", ln[0], shape=(k,), device=x.device)
        check_tensor("ln_bias", ln[1], shape=(k,), device=x.device)
        check_same_dtype(x=x, ln_weight=ln[0], ln_bias=ln[1])
    m, stride_x = _rows("x", x, k1)
    stride_x2 = _rows("x2", x2, x2.shape[-1])[1] if x2 is not None else 0
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), device=x.device)
    out_shape = (*x.shape[:-1], n)
    if residual is not None:
        check_tensor("residual", residual, shape=out_shape, device=x.device)
    check_same_dtype(x=x, x2=x2, weight=weight if scale is None else scale, bias=bias, residual=residual)
    check_interpretable(x.dtype, x.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if k == 0:
        raise ValueError(f"weight {tuple(weight.shape)} has in_features 0")
    gelu_start = check_column_start("gelu_start", gelu_start, n)
    if not (config is None or config in ("gemv", "gemm") or isinstance(config, (GemmConfig, GemvConfig))):
        raise ValueError(f'config must be None, "gemv", "gemm", a GemvConfig or a GemmConfig, got {config!r}')
    gemv = config == "gemv" or isinstance(config, GemvConfig) or (config is None and use_gemv(m, x.device))
    if gemv and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV handles at most {GEMV_MAX_M} rows of x, got {m}")
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if ln is not None and (not gemv or m > LN_IN_GEMV_MAX_M):  # the GEMM reads a LayerNorm'd copy
        from .layer_norm import layer_norm

        x = layer_norm(x if x.is_contiguous() else x.contiguous(), ln[0], ln[1], ln[2])
        stride_x, ln = k, None
    has_x2 = x2 is not None and k1 < k
    args = dict(
        x_ptr=x, x2_ptr=x2 if has_x2 else x, w_ptr=weight, scale_ptr=scale if scale is not None else x,
        bias_ptr=bias if bias is not None else x, residual_ptr=residual if residual is not None else x, out_ptr=out,
        K=k, K1=k1 if has_x2 else k, stride_x=stride_x, stride_x2=stride_x2 if has_x2 else 0, gelu_start=gelu_start,
        W_FORMAT=w_format, HAS_X2=has_x2, HAS_BIAS=bias is not None, GELU=activation == "gelu_tanh" and gelu_start < n,
        HAS_RESIDUAL=residual is not None,
    )
    if gemv:
        def run(gcfg: GemvConfig) -> None:
            rows = triton.next_power_of_2(m)
            _gemv_kernel[(triton.cdiv(n, gcfg.block_n),)](
                M=m, N=n, **args, ln_w_ptr=ln[0] if ln else x, ln_b_ptr=ln[1] if ln else x,
                eps=float(ln[2]) if ln else 0.0, HAS_LN=ln is not None,
                ROWS=rows, BLOCK_M=rows, BLOCK_N=gcfg.block_n, BLOCK_K=gcfg.block_k,
                num_warps=gcfg.num_warps,
            )

        gcfg = config if isinstance(config, GemvConfig) else None
        if config is None and x.device.type == "cuda" and n * k >= TUNE_MIN_WEIGHTS and tuning_enabled():
            flags = (("b", args["HAS_BIAS"]), ("g", args["GELU"]), ("r", args["HAS_RESIDUAL"]), ("2", has_x2),
                     ("n", ln is not None))
            epilogue = "".join(f for f, on in flags if on) or "-"
            key = (("device", str(x.device)), ("M", m), ("N", n), ("K", k),
                   ("dtype", str(x.dtype).removeprefix("torch.")), ("epilogue", epilogue),
                   ("weight", WEIGHT_FORMAT_NAMES[w_format]))
            if key in _tuned or not torch.cuda.is_current_stream_capturing():
                gcfg = tune_gemv(key, GEMV_CANDIDATES_QUANTIZED if w_format else GEMV_CANDIDATES, run)
        run(gcfg or pick_gemv_config(m, n, k, x.dtype, weight.element_size()))
        return out
    cfg = config if isinstance(config, GemmConfig) else pick_config(m, n, k, x.dtype, x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gemm_kernel[grid](
        M=m, N=n, **args, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
