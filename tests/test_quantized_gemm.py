"""The GEMM ops with int8 / fp8 weights (kogpt_fast.quant.QuantizedWeight) on the Triton kernels (the GEMV and the
tiled GEMM; on the CPU under the interpreter) and the CUDA GEMV (GPU only), against the reference.

One check for every implementation and epilogue: the oracle is the reference op one precision up over the exactly
dequantized weight (data * scale in fp64), and the kernel's error is held to twice the reference's own error in the
kernel's dtype (the reference dequantizes to that dtype, then runs the dense op) plus a few ulps (tests/tolerance.py).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU interpreter
pytest.importorskip("triton", reason="triton is not installed")

from tolerance import UP, assert_within_reference_error  # noqa: E402

from kogpt_fast import backends, cuda_lib, cuda_ops, quant, reference  # noqa: E402
from kogpt_fast.quant import QuantizedWeight  # noqa: E402

gemm = backends.triton_kernels("gemm")
ops = backends.triton_kernels("ops")
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
SCHEMES = list(quant.SCHEMES)
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter computes in neither bf16
# Triton's kernels: config="gemv" and "gemm" force each (under the interpreter every M takes the tiled one otherwise)
TRITON = ["gemv", "gemm"]


def case(m, n, k1, k2=0, dtype=torch.float16, scheme="int8", seed=0, ln=False):
    """Inputs of one GEMM: x [m, k1], x2 [m, k2] (or None), ln params, a QuantizedWeight [n, k1 + k2] whose scales
    are in dtype, bias, residual."""
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(m, k1, generator=g) + (0.5 if ln else 0.0)
    x2 = torch.randn(m, k2, generator=g) if k2 else None
    ln_params = (1.0 + 0.2 * torch.randn(k1, generator=g), 0.1 * torch.randn(k1, generator=g)) if ln else None
    weight = torch.randn(n, k1 + k2, generator=g) * torch.logspace(-1, 0.5, n)[:, None] / (k1 + k2) ** 0.5
    bias, residual = 0.5 * torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    on = [None if t is None else t.to(dtype).to(DEVICE) for t in (x, x2, bias, residual)]
    qw = quant.quantize(weight.to(DEVICE), scheme, dtype)
    ln_params = None if ln_params is None else tuple(t.to(dtype).to(DEVICE) for t in ln_params)
    return on[0], on[1], ln_params, qw, on[2], on[3]


def reference_out(x, x2, ln_params, weight, bias, residual, gelu_start):
    """layer_norm (optional) -> [x | x2] -> linear -> GELU from gelu_start (None: none) -> + residual."""
    h = x if ln_params is None else reference.layer_norm(x, *ln_params, 1e-5)
    if x2 is not None:
        h = torch.cat([h, x2], dim=-1)
    y = reference.linear(h, weight, bias)
    if gelu_start is not None:
        y = torch.cat([y[:, :gelu_start], reference.gelu_new(y[:, gelu_start:])], dim=-1)
    return y if residual is None else y + residual


def run(impl, x, x2, ln_params, qw, bias, residual, gelu_start):
    activation = None if gelu_start is None else "gelu_tanh"
    ln = None if ln_params is None else (*ln_params, 1e-5)
    if impl == "cuda":
        return cuda_lib.gemv(x, qw, bias, residual, activation or "none", gelu_start=gelu_start or 0, x2=x2, ln=ln)
    return gemm.gemm(x, qw, bias, residual=residual, activation=activation, config=impl,
                     gelu_start=gelu_start or 0, x2=x2, ln=ln)


def check(impl, m, n, k1, k2=0, dtype=torch.float16, scheme="int8", use_bias=True, gelu_start=None,
          use_residual=False, ln=False, seed=0):
    x, x2, ln_params, qw, bias, residual = case(m, n, k1, k2, dtype, scheme, seed, ln)
    bias = bias if use_bias else None
    residual = residual if use_residual else None
    got = run(impl, x, x2, ln_params, qw, bias, residual, gelu_start)
    assert got.dtype == dtype and got.shape == (m, n)
    up = UP[dtype]
    exact = (qw.data.double() * qw.scale.double()[:, None]).to(up)  # the dequantized weight, no rounding
    oracle = reference_out(*(None if t is None else t.to(up) for t in (x, x2)),
                           None if ln_params is None else tuple(t.to(up) for t in ln_params), exact,
                           *(None if t is None else t.to(up) for t in (bias, residual)), gelu_start)
    assert_within_reference_error(got, oracle, reference_out(x, x2, ln_params, qw, bias, residual, gelu_start),
                                  dtype)
    return got


# N = 37 (not a multiple of any BLOCK_N), K = 2100: a partial second K step of 2048 (the quantized GEMV's default),
# gelu_start 19 inside a tile. Each epilogue and input form of GPT-J's ops: (k2, use_bias, gelu_start, residual, ln).
EPILOGUES = {
    "linear": (0, False, None, False, False),
    "bias_split_gelu": (0, True, 19, False, False),  # q | k | v | gelu(fc_in)
    "concat_residual": (1000, True, None, True, False),  # out_proj + fc_out over [a | gelu(fc_in)]
    "ln_split_gelu": (0, True, 19, False, True),  # ln_1 inside the first fused GEMM
}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("impl, m", [("gemv", 1), ("gemv", 3), ("gemm", 5)])
def test_triton_quantized_gemm(impl, m, epilogue, scheme, dtype):
    k2, use_bias, gelu_start, use_residual, ln = EPILOGUES[epilogue]
    check(impl, m, 37, 1100 if k2 else 2100, k2, dtype, scheme, use_bias, gelu_start, use_residual, ln, seed=m)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("config", [gemm.GemvConfig(4, 128), gemm.GemmConfig(16, 16, 32, group_m=1)],
                         ids=["gemv_4x128", "gemm_16x16x32"])
def test_triton_quantized_small_tiles(config, scheme):
    """Many K steps, partial row and column tiles, both pieces of x."""
    check(config, 9, 37, 40, 100, torch.float16, scheme, gelu_start=5, use_residual=True, seed=11)


@pytest.mark.parametrize("config", TRITON)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_decoding_is_exact(scheme, config):
    """Every int8 / E4M3 code decodes to its value: a weight with one code a row (K = 1, scale 1) times x = 1 gives
    the codes back exactly, in fp32."""
    if scheme == "int8":
        codes = torch.arange(-128, 128, dtype=torch.int8)
    else:
        codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
        codes = codes[~codes.float().isnan()]  # 0x7f and 0xff: E4M3's NaNs, never written by the quantizer
    qw = QuantizedWeight(codes[:, None].to(DEVICE), torch.ones(codes.numel(), device=DEVICE))
    got = gemm.gemm(torch.ones(1, 1, device=DEVICE), qw, config=config)
    assert torch.equal(got[0], codes.float().to(DEVICE))


def test_ops_take_quantized_weights():
    """The triton backend's ops pass QuantizedWeights through (the model's calls), same as the reference within
    fp32 rounding; fp8 too (the refusal of fp8 on the CPU is the model's: kogpt_fast.quant.check_runnable)."""
    for scheme in SCHEMES:
        x, x2, _, qw, bias, residual = case(4, 24, 32, 16, torch.float32, scheme)
        q1 = quant.quantize(torch.randn(24, 32, device=DEVICE), scheme, torch.float32)
        pairs = [
            (ops.linear(x, q1, bias), reference.linear(x, q1, bias)),
            (ops.linear_gelu(x, q1, bias), reference.linear_gelu(x, q1, bias)),
            (ops.linear_split_gelu(x, q1, bias, 7), reference.linear_split_gelu(x, q1, bias, 7)),
            (ops.linear_residual(x, q1, bias, residual), reference.linear_residual(x, q1, bias, residual)),
            (ops.linear_concat_residual(x, x2, qw, bias, residual),
             reference.linear_concat_residual(x, x2, qw, bias, residual)),
        ]
        for got, expected in pairs:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_quantized_weights_raise_value_errors():
    x, _, _, qw, bias, _ = case(2, 24, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtypes differ: x torch.float16, weight torch.float32"):
        gemm.gemm(x, QuantizedWeight(qw.data, qw.scale.float()), bias)
    wide = QuantizedWeight(torch.zeros(24, 64, dtype=torch.int8, device=DEVICE)[:, ::2], qw.scale)
    with pytest.raises(ValueError, match="weight data must be contiguous"):
        gemm.gemm(x, wide, bias)
    with pytest.raises(ValueError, match="in_features 32"):
        gemm.gemm(x[:, :16].contiguous(), qw)


def test_quantized_gemv_tiles():
    """The default tiles read the same bytes a K step as fp16's (2048 one-byte weights), and the tuner has its own
    candidates for them."""
    assert gemm.pick_gemv_config(1, 12288, 4096, torch.float16, weight_bytes=1) == gemm.GemvConfig(8, 2048, 4)
    assert gemm.pick_gemv_config(1, 12288, 4096, torch.float16) == gemm.GemvConfig(8, 1024, 4)
    assert all(c.block_k >= 1024 for c in gemm.GEMV_CANDIDATES_QUANTIZED)
    for candidate in gemm.GEMV_CANDIDATES_QUANTIZED:
        check(candidate, 2, 37, 2100, scheme="int8", use_bias=True, gelu_start=5, use_residual=True, seed=3)


# ---- the CUDA GEMV (GPU only) ----

def cuda_ready():
    if not cuda_lib.is_available():
        pytest.fail(f"the CUDA library is not usable: {cuda_lib.status()}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("k", [2112, 2100])  # 2100: not a multiple of 16 (the scalar path)
def test_cuda_quantized_gemv(k, m, epilogue, scheme, dtype):
    cuda_ready()
    k2, use_bias, gelu_start, use_residual, ln = EPILOGUES[epilogue]
    if ln and m > cuda_lib.GEMV_LN_MAX_M:
        pytest.skip("the LayerNorm prologue takes 1 or 2 rows")  # cuda_ops falls back for more (tested below)
    k1, k2 = (k - 48, 48) if k2 else (k, 0)
    check("cuda", m, 333, k1, k2, dtype, scheme, use_bias, gelu_start, use_residual, ln, seed=m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("impl, m, dtype", [("cuda", 1, torch.float16), ("cuda", 1, torch.bfloat16),
                                            ("gemv", 1, torch.float16), ("gemm", 64, torch.float16)],
                         ids=["cuda-fp16", "cuda-bf16", "triton_gemv-fp16", "triton_gemm_m64-fp16"])
@pytest.mark.parametrize("shape", ["fused_in", "fused_out", "lm_head"])
def test_quantized_gemm_at_kogpt_6b_shapes(shape, impl, m, dtype, scheme):
    """GPT-J's two fused GEMMs and the lm_head at KoGPT-6B's size: the decode GEMVs (M = 1) and the tiled GEMM of a
    prefill (M = 64)."""
    if impl == "cuda":
        cuda_ready()
    n, k1, k2, use_bias, gelu_start, use_residual, ln = {
        "fused_in": (3 * 4096 + 16384, 4096, 0, True, 3 * 4096, False, True),
        "fused_out": (4096, 4096, 16384, True, None, True, False),
        "lm_head": (64512, 4096, 0, True, None, False, False),
    }[shape]
    check(impl, m, n, k1, k2, dtype, scheme, use_bias, gelu_start, use_residual, ln)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_ops_route_quantized_weights(scheme):
    """cuda_ops: the GEMV for 1..16 rows in fp16/bf16; fp32 activations and more rows fall back to Triton."""
    cuda_ready()
    for m, dtype in ((1, torch.float16), (4, torch.bfloat16), (33, torch.float16), (2, torch.float32)):
        x, x2, ln_params, qw, bias, residual = case(m, 96, 64, 32, dtype, scheme)
        got = cuda_ops.linear_concat_residual(x, x2, qw, bias, residual)
        up = UP[dtype]
        exact = (qw.data.double() * qw.scale.double()[:, None]).to(up)
        oracle = reference.linear_concat_residual(x.to(up), x2.to(up), exact, bias.to(up), residual.to(up))
        assert_within_reference_error(got, oracle, reference.linear_concat_residual(x, x2, qw, bias, residual), dtype)


def test_cuda_ops_send_cpu_quantized_weights_to_the_reference():
    x = torch.randn(1, 32)
    qw = quant.quantize(torch.randn(8, 32), "int8", torch.float32)
    assert torch.equal(cuda_ops.linear(x, qw), reference.linear(x, qw))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):  # checked before the library is touched
        cuda_lib.gemv(x, qw)


# ---- the model on the triton backend ----

@pytest.fixture(scope="module")
def int8_demo_fp16():
    from kogpt_fast import KoGPTForCausalLM

    return KoGPTForCausalLM.from_pretrained(None, device=DEVICE, dtype=torch.float16, backend="torch", quantize="int8")


def test_quantized_demo_on_triton_fused_fp16(int8_demo_fp16):
    """The fast path (fp16, GPT-J's fused GEMMs, ln_1 inside the first) with int8 weights: logits at every position
    within twice the torch backend's fp16 error of the same weights run in fp32."""
    from kogpt_fast.quality import token_logits

    ids = torch.tensor([523, 1851, 900, 17, 1002, 44, 260, 1500, 7, 311, 2000, 12])
    oracle = copy.deepcopy(int8_demo_fp16).to(torch.float32)  # the scales are exact in fp32; the data as it is
    triton_model = copy.deepcopy(int8_demo_fp16)
    triton_model.backend_name = "triton"
    assert triton_model.fused() and isinstance(triton_model.fused_weights()[0][0], QuantizedWeight)
    got = token_logits(triton_model, ids)
    assert_within_reference_error(got, token_logits(oracle, ids), token_logits(int8_demo_fp16, ids), torch.float16)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_demo_on_triton_fp32_gives_the_reference_tokens(scheme):
    from kogpt_fast import KoGPTForCausalLM

    reference_model = KoGPTForCausalLM.from_pretrained(None, device=DEVICE, dtype=torch.float32, backend="torch",
                                                       quantize=scheme)
    if scheme == "fp8" and not (HAS_CUDA and torch.cuda.get_device_capability() >= quant.FP8_MIN_CAPABILITY):
        with pytest.raises(backends.BackendUnavailable, match="fp8 weights"):  # the loader refuses it here ...
            KoGPTForCausalLM.from_pretrained(None, device=DEVICE, backend="triton", quantize=scheme)
        triton_model = copy.deepcopy(reference_model)  # ... while the kernels decode E4M3 anywhere: test them
        triton_model.backend_name = "triton"
    else:
        triton_model = KoGPTForCausalLM.from_pretrained(None, device=DEVICE, dtype=torch.float32, backend="triton",
                                                        quantize=scheme)
    ids = torch.tensor([[523, 1851]], device=DEVICE)
    assert torch.equal(triton_model.generate(ids, max_new_tokens=3), reference_model.generate(ids, max_new_tokens=3))
