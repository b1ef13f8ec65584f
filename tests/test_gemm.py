"""Triton GEMM with fused epilogues (bias, GELU tanh, residual) against reference.linear / linear_gelu, and GPT-J's
fused GEMMs against reference.linear_split_gelu (GELU from column gelu_start on) / linear_residual.

Tolerance (flash-attention's convention): the kernel's error against an oracle one precision up (fp64 for fp32
inputs, fp32 for fp16/bf16) is at most twice the error of the reference op run in the input dtype, plus a few ulps
of slack for a different summation order. fp32 inputs go through tl.dot with IEEE precision (no TF32).
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

gemm = backends.triton_kernels("gemm")
ops = backends.triton_kernels("ops")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16]  # bfloat16 only on a GPU: the interpreter cannot compute in it
# Small tiles, so that small shapes still span several row / column tiles and K steps (and a partial last one).
SMALL_TILES = {
    "default": None,
    "skinny_16x16x32": gemm.GemmConfig(16, 16, 32, group_m=1),
    "tiled_32x32x32_grouped": gemm.GemmConfig(32, 32, 32, group_m=2),
}


def inputs(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5  # outputs of order 1
    bias = 0.5 * torch.randn(n, generator=g)
    residual = torch.randn(m, n, generator=g)
    return [t.to(dtype).to(DEVICE) for t in (x, weight, bias, residual)]


def reference_gemm(x, weight, bias, residual, activation):
    if activation:
        out = reference.linear_gelu(x, weight, bias, "gelu_new")
    else:
        out = reference.linear(x, weight, bias)
    return out if residual is None else out + residual


def check(m, n, k, dtype, use_bias=True, activation="gelu_tanh", use_residual=False, config=None, seed=0):
    x, weight, bias, residual = inputs(m, n, k, dtype, seed)
    bias = bias if use_bias else None
    residual = residual if use_residual else None
    got = gemm.gemm(x, weight, bias, residual=residual, activation=activation, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    up = UP[dtype]
    oracle = reference_gemm(*(t.to(up) if t is not None else None for t in (x, weight, bias, residual)), activation)
    assert_within_reference_error(got, oracle, reference_gemm(x, weight, bias, residual, activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", sorted(SMALL_TILES))
@pytest.mark.parametrize("m", [1, 7, 33, 130])
def test_gemm_bias_gelu_shapes(m, config, dtype):
    """fc_in's path (bias + GELU) over odd shapes: N and K not multiples of any tile."""
    check(m, 72, 80, dtype, config=SMALL_TILES[config], seed=m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "use_bias, activation, use_residual",
    [(False, None, False), (True, None, False), (False, None, True), (True, None, True), (True, "gelu_tanh", True)],
    ids=["plain", "bias", "residual", "bias_residual", "bias_gelu_residual"],
)
def test_gemm_epilogues(use_bias, activation, use_residual, dtype):
    check(9, 200, 136, dtype, use_bias, activation, use_residual, config=SMALL_TILES["tiled_32x32x32_grouped"])


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_ops_linear_and_linear_gelu(activation):
    x, weight, bias, _ = inputs(5, 96, 64, torch.float32)
    torch.testing.assert_close(ops.linear(x, weight), reference.linear(x, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ops.linear_gelu(x, weight, bias, activation), reference.linear_gelu(x, weight, bias, activation),
        rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(ValueError, match="activation"):
        ops.linear_gelu(x, weight, bias, "relu")


def test_leading_dims_are_flattened():
    x, weight, bias, _ = inputs(6, 40, 32, torch.float32)
    got = gemm.gemm(x.view(2, 3, 32), weight, bias)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, reference.linear(x, weight, bias).view(2, 3, 40), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_errors():
    x, weight, bias, residual = inputs(4, 40, 32, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        gemm.gemm(x[:, :16].contiguous(), weight)
    with pytest.raises(ValueError, match="x must be contiguous"):
        gemm.gemm(torch.randn(32, 4, device=DEVICE).t(), weight)
    with pytest.raises(ValueError, match="dtypes differ"):
        gemm.gemm(x.half(), weight)
    with pytest.raises(ValueError, match="bias must have shape"):
        gemm.gemm(x, weight, bias[:3])
    with pytest.raises(ValueError, match="residual must have shape"):
        gemm.gemm(x, weight, residual=residual[:, :3])
    with pytest.raises(ValueError, match="activation"):
        gemm.gemm(x, weight, activation="relu")


# ---- GPT-J's fused GEMMs: q|k|v|gelu(fc_in) with GELU from a column on, out_proj+fc_out into the residual ----

def check_split_gelu(m, n, k, gelu_start, dtype, config=None, seed=0, use_bias=True, via_ops=False):
    x, weight, bias, _ = inputs(m, n, k, dtype, seed)
    bias = bias if use_bias else None
    if via_ops:
        got = ops.linear_split_gelu(x, weight, bias, gelu_start)
    else:
        got = gemm.gemm(x, weight, bias, activation="gelu_tanh", config=config, gelu_start=gelu_start)
    assert got.dtype == dtype and got.shape == (m, n)
    up = UP[dtype]
    oracle = reference.linear_split_gelu(x.to(up), weight.to(up), None if bias is None else bias.to(up), gelu_start)
    assert_within_reference_error(got, oracle, reference.linear_split_gelu(x, weight, bias, gelu_start), dtype)
    # The columns left of gelu_start are the plain GEMM's: GELU there would be off by far more than the tolerance.
    if 0 < gelu_start:
        plain = reference.linear(x.to(up), weight.to(up), None if bias is None else bias.to(up))[:, :gelu_start]
        assert_within_reference_error(got[:, :gelu_start], plain, reference.linear(x, weight, bias)[:, :gelu_start],
                                      dtype)


def check_residual(m, n, k, dtype, config=None, seed=0, use_bias=True, via_ops=False):
    x, weight, bias, residual = inputs(m, n, k, dtype, seed)
    bias = bias if use_bias else None
    if via_ops:
        got = ops.linear_residual(x, weight, bias, residual)
    else:
        got = gemm.gemm(x, weight, bias, residual=residual, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    up = UP[dtype]
    oracle = reference.linear_residual(x.to(up), weight.to(up), None if bias is None else bias.to(up), residual.to(up))
    assert_within_reference_error(got, oracle, reference.linear_residual(x, weight, bias, residual), dtype)


# gelu_start for N = 200: 0 (all columns: linear_gelu), 48 (a multiple of 16 but not of 32), 77 (no tile's edge),
# 192 (inside the last, partial tile of width 32), 200 = N (no GELU: linear).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", sorted(SMALL_TILES))
@pytest.mark.parametrize("gelu_start", [0, 48, 77, 192, 200])
def test_gemm_split_gelu(gelu_start, config, dtype):
    check_split_gelu(9, 200, 136, gelu_start, dtype, config=SMALL_TILES[config], seed=gelu_start)


@pytest.mark.parametrize("m, gelu_start", [(1, 37), (33, 3 * 24), (130, 1)])
def test_gemm_split_gelu_shapes(m, gelu_start):
    """GPT-J's layout at toy size: n_embd 24 (q|k|v = 72 columns) + n_inner 96 = N 168; K odd."""
    check_split_gelu(m, 168, 57, gelu_start, torch.float32, config=SMALL_TILES["tiled_32x32x32_grouped"], seed=m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", sorted(SMALL_TILES))
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
def test_gemm_residual_concatenated_k(use_bias, m, config, dtype):
    """out_proj + fc_out as one GEMM: K = d + d_ff (40 + 136 here: not a multiple of any K tile)."""
    check_residual(m, 72, 40 + 136, dtype, config=SMALL_TILES[config], seed=m, use_bias=use_bias)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("gelu_start", [0, 37, 96])
def test_ops_linear_split_gelu(gelu_start, activation):
    x, weight, bias, _ = inputs(5, 96, 64, torch.float32, seed=gelu_start)
    torch.testing.assert_close(
        ops.linear_split_gelu(x, weight, bias, gelu_start, activation),
        reference.linear_split_gelu(x, weight, bias, gelu_start, activation), rtol=1e-5, atol=1e-5,
    )
    check_split_gelu(5, 96, 64, gelu_start, torch.float32, seed=gelu_start, via_ops=True)
    with pytest.raises(ValueError, match="activation"):
        ops.linear_split_gelu(x, weight, bias, gelu_start, "relu")


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
def test_ops_linear_residual(use_bias):
    x, weight, bias, residual = inputs(5, 96, 64, torch.float32)
    bias = bias if use_bias else None
    torch.testing.assert_close(ops.linear_residual(x, weight, bias, residual),
                               reference.linear_residual(x, weight, bias, residual), rtol=1e-5, atol=1e-5)
    check_residual(5, 96, 64, torch.float32, use_bias=use_bias, via_ops=True)
    # A residual that is a view (rows of a wider buffer) is read as the reference reads it.
    wide = torch.randn(5, 2 * 96, device=DEVICE)
    torch.testing.assert_close(ops.linear_residual(x, weight, bias, wide[:, ::2]),
                               reference.linear_residual(x, weight, bias, wide[:, ::2]), rtol=1e-5, atol=1e-5)
    # Other dtypes and broadcast shapes of the residual follow torch's rules, as the reference's `+` does.
    for other in (residual.double(), residual[:1]):
        expected = reference.linear_residual(x, weight, bias, other)
        got = ops.linear_residual(x, weight, bias, other)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_gelu_start_raises_value_errors():
    x, weight, bias, _ = inputs(4, 40, 32, torch.float32)
    for bad in (-1, 41):
        with pytest.raises(ValueError, match="gelu_start must be in"):
            gemm.gemm(x, weight, bias, activation="gelu_tanh", gelu_start=bad)
    for bad in (1.5, None, True):
        with pytest.raises(ValueError, match="gelu_start must be an integer"):
            ops.linear_split_gelu(x, weight, bias, bad)


# KoGPT-6B's projections (N, K): q/k/v/out_proj, the fused qkv, fc_in, fc_out, and an lm_head slice.
KOGPT_SHAPES = {"attn": (4096, 4096), "qkv": (12288, 4096), "fc_in": (16384, 4096), "fc_out": (4096, 16384),
                "lm_head_slice": (8064, 4096)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 7, 16, 64, 2048])
@pytest.mark.parametrize("shape", sorted(KOGPT_SHAPES))
def test_gemm_kogpt_6b_shapes(shape, m, dtype):
    n, k = KOGPT_SHAPES[shape]
    gelu = "gelu_tanh" if shape == "fc_in" else None
    check(m, n, k, dtype, use_bias=shape in ("fc_in", "fc_out", "lm_head_slice"), activation=gelu,
          use_residual=shape == "fc_out")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 64, 300])
def test_gemm_fp32_ieee_on_gpu(m):
    check(m, 4096, 4096, torch.float32, activation="gelu_tanh")


# GPT-J's fused GEMMs at KoGPT-6B's sizes: q|k|v|fc_in (N = 3*4096 + 16384, GELU from 3*4096 on) over d = 4096, and
# out_proj|fc_out (K = 4096 + 16384) into the residual.
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 7, 16, 64, 2048])
def test_gemm_fused_kogpt_6b_shapes(m, dtype):
    check_split_gelu(m, 3 * 4096 + 16384, 4096, 3 * 4096, dtype, seed=m)
    check_residual(m, 4096, 4096 + 16384, dtype, seed=m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("gelu_start", [0, 77, 4096])
@pytest.mark.parametrize("m", [1, 300])
def test_gemm_fused_fp16_odd_shapes_on_gpu(m, gelu_start):
    check_split_gelu(m, 4096, 1000, gelu_start, torch.float16, seed=gelu_start)
    check_residual(m, 1000, 4096 + 40, torch.float16, seed=m, use_bias=gelu_start > 0)


# ---- The decode GEMV (M <= 16): gemm() sends it M <= 16 on CUDA; config="gemv" forces it under the interpreter ----

def check_gemv(m, n, k, dtype, use_bias=True, gelu_start=None, use_residual=False, config="gemv", seed=0):
    """Any epilogue combination: bias, GELU from gelu_start on (None: no activation), residual."""
    x, weight, bias, residual = inputs(m, n, k, dtype, seed)
    bias = bias if use_bias else None
    residual = residual if use_residual else None
    activation = None if gelu_start is None else "gelu_tanh"
    got = gemm.gemm(x, weight, bias, residual=residual, activation=activation, config=config,
                    gelu_start=gelu_start or 0)
    assert got.dtype == dtype and got.shape == (m, n)

    def ref(x, weight, bias, residual):
        if activation is None:
            y = reference.linear(x, weight, bias)
        else:
            y = reference.linear_split_gelu(x, weight, bias, gelu_start)
        return y if residual is None else y + residual

    up = UP[dtype]
    oracle = ref(*(t.to(up) if t is not None else None for t in (x, weight, bias, residual)))
    assert_within_reference_error(got, oracle, ref(x, weight, bias, residual), dtype)


# N = 37 (not a multiple of BLOCK_N 4 or 8), K = 1100: two K steps of 1024 for fp16 (three of 512 for fp32), the
# last partial. gelu_start 19: inside a BLOCK_N tile; 37 = N: no GELU column.
GEMV_EPILOGUES = {  # (use_bias, gelu_start, use_residual)
    "plain": (False, None, False),
    "bias": (True, None, False),
    "residual": (False, None, True),
    "bias_gelu_all": (True, 0, False),
    "gelu_mid": (False, 19, False),
    "bias_gelu_mid_residual": (True, 19, True),
    "bias_gelu_none_residual": (True, 37, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", list(GEMV_EPILOGUES))
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_epilogues(m, epilogue, dtype):
    use_bias, gelu_start, use_residual = GEMV_EPILOGUES[epilogue]
    check_gemv(m, 37, 1100, dtype, use_bias, gelu_start, use_residual, seed=m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_n, block_k", [(4, 128), (8, 256)])
@pytest.mark.parametrize("m", [2, 9])
def test_gemv_explicit_tiles(m, block_n, block_k, dtype):
    """Many K steps (1100 / 128: 9, the last partial) and both BLOCK_N, at M not a power of 2."""
    check_gemv(m, 37, 1100, dtype, gelu_start=5, use_residual=True, config=gemm.GemvConfig(block_n, block_k),
               seed=block_k)


def test_gemv_dispatch_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert gemm.use_gemv(1, cuda) and gemm.use_gemv(16, cuda)
    assert not gemm.use_gemv(17, cuda) and not gemm.use_gemv(1, cpu)
    # DESIGN.md's tiles: K step 1024 (512 for fp32), 4 warps, 4 rows a program for the 4096-row weights at M <= 2.
    assert gemm.pick_gemv_config(1, 4096, 4096, torch.float16) == gemm.GemvConfig(4, 1024, 4)
    assert gemm.pick_gemv_config(1, 12288, 4096, torch.bfloat16) == gemm.GemvConfig(8, 1024, 4)
    assert gemm.pick_gemv_config(16, 4096, 16384, torch.float16) == gemm.GemvConfig(8, 1024, 4)
    assert gemm.pick_gemv_config(1, 4096, 4096, torch.float32).block_k == 512


def test_gemv_compiles_one_kernel_per_power_of_two_rows(monkeypatch):
    """M = 1..16 launch the GEMV with ROWS in {1, 2, 4, 8, 16} (M itself a runtime argument): a new prompt length
    or batch size does not compile a new kernel; the padded rows are masked (the results are checked above)."""
    launched = []
    kernel = gemm._gemv_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["M"], kwargs["ROWS"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gemm, "_gemv_kernel", Recorder())
    for m in (1, 2, 3, 5, 9, 16):
        x, weight, bias, _ = inputs(m, 8, 16, torch.float32)
        gemm.gemm(x, weight, bias, config="gemv")
    assert launched == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (16, 16)]


def test_gemv_leading_dims_and_bad_config():
    x, weight, bias, _ = inputs(6, 40, 32, torch.float32)
    got = gemm.gemm(x.view(2, 3, 32), weight, bias, config="gemv")
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, reference.linear(x, weight, bias).view(2, 3, 40), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemm.gemm(torch.randn(17, 32, device=DEVICE), weight, config="gemv")
    with pytest.raises(ValueError, match="config must be"):
        gemm.gemm(x, weight, config="fast")


# KoGPT-6B's decode GEMVs at M = 1 (N, K, bias, gelu_start, residual): the five projections at full size (lm_head
# with the whole 64512 vocab) and GPT-J's two fused GEMMs. M = 1 on CUDA dispatches to the GEMV (config None).
GEMV_DECODE_SHAPES = {
    "qkv": (12288, 4096, False, None, False),
    "out_proj": (4096, 4096, False, None, False),
    "fc_in": (16384, 4096, True, 0, False),
    "fc_out": (4096, 16384, True, None, True),
    "lm_head": (64512, 4096, True, None, False),
    "fused_qkv_fc_in": (3 * 4096 + 16384, 4096, True, 3 * 4096, False),
    "fused_out_fc_out": (4096, 4096 + 16384, True, None, True),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(GEMV_DECODE_SHAPES))
def test_gemv_kogpt_6b_decode_shapes(shape, dtype):
    n, k, use_bias, gelu_start, use_residual = GEMV_DECODE_SHAPES[shape]
    assert gemm.use_gemv(1, DEVICE)
    check_gemv(1, n, k, dtype, use_bias, gelu_start, use_residual, config=None, seed=n + k)


# ---- Two inputs: [x | x2] @ W^T read in place (GPT-J's [attention | gelu(fc_in)] before out_proj + fc_out) ----

def concat_inputs(m, n, k1, k2, dtype, seed=0):
    """x1 [m, k1] contiguous; x2 [m, k2] a column slice of a wider buffer (its row stride is not k2), as the
    fc_in columns of the first fused GEMM's output are."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(m, k1, generator=g)
    wide = torch.randn(m, 3 + k2 + 5, generator=g)
    weight = torch.randn(n, k1 + k2, generator=g) / (k1 + k2) ** 0.5
    bias = 0.5 * torch.randn(n, generator=g)
    residual = torch.randn(m, n, generator=g)
    x1, wide, weight, bias, residual = (t.to(dtype).to(DEVICE) for t in (x1, wide, weight, bias, residual))
    return x1, wide[:, 3:3 + k2], weight, bias, residual


def check_concat(m, n, k1, k2, dtype, config=None, seed=0, use_bias=True, via_ops=False):
    x1, x2, weight, bias, residual = concat_inputs(m, n, k1, k2, dtype, seed)
    assert m == 1 or k2 == 0 or not x2.is_contiguous()
    bias = bias if use_bias else None
    if via_ops:
        got = ops.linear_concat_residual(x1, x2, weight, bias, residual)
    else:
        got = gemm.gemm(x1, weight, bias, residual=residual, config=config, x2=x2)
    assert got.dtype == dtype and got.shape == (m, n)
    up = UP[dtype]
    oracle = reference.linear_concat_residual(x1.to(up), x2.to(up), weight.to(up),
                                              None if bias is None else bias.to(up), residual.to(up))
    assert_within_reference_error(got, oracle, reference.linear_concat_residual(x1, x2, weight, bias, residual),
                                  dtype)
    return got


CONCAT_CONFIGS = {  # kernel tiles; the GEMV for M <= 16 only
    "gemv_default": "gemv",
    "gemv_4x32": gemm.GemvConfig(4, 32),
    "gemm_default": "gemm",
    "gemm_16x16x32": gemm.GemmConfig(16, 16, 32, group_m=1),
}


# K1 = 40 (not a multiple of any K step: one step reads the end of x1 only), 64 (a multiple of 32), 0 (x2 only);
# K2 = 100 (a partial last step), 0 (x1 only).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k1, k2", [(40, 100), (64, 100), (0, 100), (40, 0)])
@pytest.mark.parametrize("m, config", [(m, c) for m in (1, 5, 33) for c in CONCAT_CONFIGS
                                       if m <= gemm.GEMV_MAX_M or not c.startswith("gemv")])  # GEMV: M <= 16
def test_gemm_concatenated_inputs(m, config, k1, k2, dtype):
    check_concat(m, 37, k1, k2, dtype, config=CONCAT_CONFIGS[config], seed=m + k1)


@pytest.mark.parametrize("config", [gemm.GemvConfig(4, 32), gemm.GemmConfig(16, 16, 32, group_m=1)],
                         ids=["gemv", "gemm"])
def test_concatenated_inputs_equal_the_concatenation_bitwise(config):
    """With K1 a multiple of the K step, the two inputs are summed in the same order as their concatenation: the
    same bits, in fp32 and fp16 (so the model's output does not depend on the concatenation being gone)."""
    for dtype in DTYPES:
        x1, x2, weight, bias, residual = concat_inputs(3, 37, 64, 100, dtype, seed=7)
        got = gemm.gemm(x1, weight, bias, residual=residual, config=config, x2=x2)
        whole = gemm.gemm(torch.cat([x1, x2], dim=1), weight, bias, residual=residual, config=config)
        assert torch.equal(got, whole), dtype


def test_ops_linear_concat_residual():
    check_concat(5, 96, 24, 72, torch.float32, via_ops=True)
    check_concat(5, 96, 24, 72, torch.float32, via_ops=True, use_bias=False)
    x1, x2, weight, bias, residual = concat_inputs(5, 96, 24, 72, torch.float32)
    # A residual of another dtype or a broadcast shape follows torch's rules, as the reference's `+` does.
    for other in (residual.double(), residual[:1]):
        expected = reference.linear_concat_residual(x1, x2, weight, bias, other)
        got = ops.linear_concat_residual(x1, x2, weight, bias, other)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_concatenated_inputs_bad_shapes_raise_value_errors():
    x1, x2, weight, bias, residual = concat_inputs(4, 40, 24, 40, torch.float32)
    with pytest.raises(ValueError, match="add up to weight's in_features 64"):
        gemm.gemm(x1, weight, x2=x2[:, :30])
    with pytest.raises(ValueError, match="share their leading dims"):
        gemm.gemm(x1, weight, x2=x2[:3])
    with pytest.raises(ValueError, match="dtypes differ"):
        gemm.gemm(x1, weight, x2=x2.half())
    with pytest.raises(ValueError, match="x2 must be contiguous, or 2-D with contiguous rows"):
        gemm.gemm(x1, weight, x2=torch.randn(40, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="x must be contiguous, or 2-D with contiguous rows"):
        gemm.gemm(torch.randn(2, 4, 24, device=DEVICE)[:, ::2], weight, x2=torch.randn(2, 2, 40, device=DEVICE))


def test_strided_rows_of_x():
    """x itself may be a column slice (any row stride): read in place, as the reference reads it."""
    wide = torch.randn(6, 50, device=DEVICE)
    _, weight, bias, _ = inputs(6, 40, 32, torch.float32)
    for config in ("gemv", "gemm"):
        torch.testing.assert_close(gemm.gemm(wide[:, 9:41], weight, bias, config=config),
                                   reference.linear(wide[:, 9:41], weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 7, 16, 64, 2048])
def test_gemm_concatenated_kogpt_6b_shape(m, dtype):
    """out_proj + fc_out at KoGPT-6B's size, reading [a | gelu(fc_in)] in place: K = 4096 + 16384, x2 a slice of a
    [m, 3 * 4096 + 16384 + 8] buffer. Both kernels (the GEMV at m <= 16, the tiled GEMM above)."""
    out = check_concat(m, 4096, 4096, 16384, dtype, seed=m)
    x1, x2, weight, bias, residual = concat_inputs(m, 4096, 4096, 16384, dtype, seed=m)
    torch.testing.assert_close(out, gemm.gemm(torch.cat([x1, x2], 1), weight, bias, residual=residual),
                               rtol=0, atol=0)


# ---- The GEMV tuner: the fastest candidate tile on the card, once per shape and epilogue ----

def test_tuner_picks_the_fastest_candidate_once(monkeypatch):
    monkeypatch.setattr(gemm, "_tuned", {})
    a, b, c = gemm.GemvConfig(4, 1024), gemm.GemvConfig(8, 1024), gemm.GemvConfig(8, 512)
    ran, timed = [], []

    def run(cfg):
        if cfg is c:
            raise RuntimeError("out of resources")  # a tile that cannot run is skipped
        ran.append(cfg)

    def bench(fn):
        fn()
        timed.append(ran[-1])
        return {a: 2.0, b: 1.5}[ran[-1]]

    key = (("M", 1), ("N", 4096))
    assert gemm.tune_gemv(key, (a, b, c), run, bench) == b
    assert timed == [a, b]
    assert gemm.tune_gemv(key, (a, b, c), run, lambda fn: pytest.fail("tuned twice")) == b
    assert gemm.tuned_configs() == {"M=1 N=4096": repr(b)}
    with pytest.raises(RuntimeError, match="no GEMV candidate ran"):
        gemm.tune_gemv((("M", 2),), (c,), run, bench)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("candidate", gemm.GEMV_CANDIDATES, ids=repr)
def test_every_tuner_candidate_is_correct(candidate, dtype):
    """Whichever tile the tuner keeps computes the same op: each candidate on the epilogues the model uses."""
    check_gemv(3, 37, 1100, dtype, True, 19, True, config=candidate, seed=candidate.block_n)
    check_concat(2, 37, 40, 100, dtype, config=candidate, seed=candidate.block_k)


def test_tuning_is_off_on_the_cpu_and_when_disabled(monkeypatch):
    """The CPU interpreter never tunes (it measures nothing useful); KOGPT_GEMV_TUNE=0 turns tuning off."""
    monkeypatch.setattr(gemm, "_tuned", {})
    monkeypatch.setenv("KOGPT_GEMV_TUNE", "1")
    assert gemm.tuning_enabled()
    x, weight, _, _ = inputs(1, 64, 32, torch.float32)
    gemm.gemm(x.cpu(), weight.cpu(), config="gemv")
    assert gemm.tuned_configs() == {}
    monkeypatch.setenv("KOGPT_GEMV_TUNE", "0")
    assert not gemm.tuning_enabled()


@pytest.mark.gpu
@needs_cuda
def test_tuner_at_kogpt_6b_decode_shapes(monkeypatch):
    """The two fused GEMVs and the lm_head at M = 1, tuned on this card: the kept tile gives a correct result, the
    choice is recorded, and a second call (and a CUDA-graph capture) reuses it without timing anything."""
    monkeypatch.setenv("KOGPT_GEMV_TUNE", "1")
    monkeypatch.setattr(gemm, "_tuned", {})
    d, ff = 4096, 16384
    check_split_gelu(1, 3 * d + ff, d, 3 * d, torch.float16, seed=1)
    check_concat(1, d, d, ff, torch.float16, seed=2)
    check(1, 64512, d, torch.float16, activation=None)
    assert len(gemm.tuned_configs()) == 3, gemm.tuned_configs()
    monkeypatch.setattr(gemm, "tune_gemv", lambda key, *a: gemm._tuned[key])  # a miss would raise KeyError
    check_concat(1, d, d, ff, torch.float16, seed=3)
    # A shape first seen during a capture is not tuned there: the default tiles are used.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    check(1, 4096, 4096, torch.float16, activation=None)
    assert len(gemm.tuned_configs()) == 3


# ---- LayerNorm inside the GEMV (the decode step's ln_1 + first fused GEMM, one kernel) ----

def ln_inputs(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(m, k, generator=g) + 0.5  # a mean and a spread the normalisation must remove
    ln_w = 1.0 + 0.2 * torch.randn(k, generator=g)
    ln_b = 0.1 * torch.randn(k, generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = 0.5 * torch.randn(n, generator=g)
    return [t.to(dtype).to(DEVICE) for t in (x, ln_w, ln_b, weight, bias)]


def check_ln(m, n, k, gelu_start, dtype, config=None, seed=0, via_ops=False):
    x, ln_w, ln_b, weight, bias = ln_inputs(m, n, k, dtype, seed)
    eps = 1e-5
    if via_ops:
        got = ops.layer_norm_linear_split_gelu(x, ln_w, ln_b, eps, weight, bias, gelu_start)
    else:
        got = gemm.gemm(x, weight, bias, activation="gelu_tanh", config=config, gelu_start=gelu_start,
                        ln=(ln_w, ln_b, eps))
    assert got.dtype == dtype and got.shape == (m, n)
    up = UP[dtype]
    oracle = reference.layer_norm_linear_split_gelu(*(t.to(up) for t in (x, ln_w, ln_b)), eps, weight.to(up),
                                                    bias.to(up), gelu_start)
    assert_within_reference_error(
        got, oracle, reference.layer_norm_linear_split_gelu(x, ln_w, ln_b, eps, weight, bias, gelu_start), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["gemv", gemm.GemvConfig(4, 128), "gemm"], ids=["gemv", "gemv_4x128", "gemm"])
@pytest.mark.parametrize("m", [1, 2, 16])  # 16: beyond LN_IN_GEMV_MAX_M, a LayerNorm kernel first
def test_layer_norm_inside_the_gemm(m, config, dtype):
    """K = 300: several K steps of 128 (the last partial) for the statistics and the products."""
    check_ln(m, 37, 300, 19, dtype, config=config, seed=m)


@pytest.mark.parametrize("m", [3, 16])
def test_layer_norm_inside_the_gemv_for_every_row_count(m, monkeypatch):
    """The GEMV's LayerNorm prologue is written for any ROWS; used only up to LN_IN_GEMV_MAX_M, checked at all."""
    monkeypatch.setattr(gemm, "LN_IN_GEMV_MAX_M", gemm.GEMV_MAX_M)
    check_ln(m, 37, 300, 19, torch.float16, config=gemm.GemvConfig(8, 128), seed=m)


def test_layer_norm_linear_split_gelu_op():
    check_ln(5, 96, 64, 37, torch.float32, via_ops=True)
    check_ln(40, 96, 64, 37, torch.float32, via_ops=True)  # M > 16 on the GPU: LayerNorm kernel, tiled GEMM
    x, ln_w, ln_b, weight, bias = ln_inputs(2, 40, 32, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        ops.layer_norm_linear_split_gelu(x, ln_w, ln_b, 1e-5, weight, bias, 3, "relu")
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        gemm.gemm(x, weight, ln=(ln_w[:3], ln_b, 1e-5))
    with pytest.raises(ValueError, match="cannot be combined"):
        gemm.gemm(x[:, :16], weight, x2=x[:, 16:], ln=(ln_w, ln_b, 1e-5))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_layer_norm_inside_the_gemm_at_kogpt_6b_shape(m, dtype):
    check_ln(m, 3 * 4096 + 16384, 4096, 3 * 4096, dtype, seed=m)


def test_decode_sized_ln_gemv_launches_no_layer_norm_kernel(monkeypatch):
    """M <= LN_IN_GEMV_MAX_M: the GEMV normalises by itself (the LayerNorm kernel is not called); beyond: it is."""
    layer_norm_module = backends.triton_kernels("layer_norm")
    calls = []
    original = layer_norm_module.layer_norm
    monkeypatch.setattr(layer_norm_module, "layer_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    check_ln(gemm.LN_IN_GEMV_MAX_M, 37, 300, 19, torch.float32, config="gemv")
    assert calls == []
    check_ln(gemm.LN_IN_GEMV_MAX_M + 1, 37, 300, 19, torch.float32, config="gemv")
    assert calls == [1]
