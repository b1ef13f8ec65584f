"""Weight-only quantization (kogpt_fast.quant): the numbers, the QuantizedWeight type, the reference ops, the model.

The quantizer's contract is checked against its definition (per-row scales from amax, nothing clipped, int8 within
half a step, E4M3 within half an ulp of E4M3); the reference ops must equal the dense op on the dequantized weight
bit for bit; a quantized model must hold what resident_bytes says and run fused and unfused.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kogpt_fast import KoGPTForCausalLM, quant, reference
from kogpt_fast.backends import BackendUnavailable
from kogpt_fast.quant import QuantizedLinear, QuantizedWeight

SCHEMES = list(quant.SCHEMES)
SCALE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_weight(n=37, k=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]  # rows from 1e-3 to 10 in magnitude
    w[3] = 0.0  # a zero row
    w[5, 7] = 40.0  # a row dominated by one outlier
    return w


def exact(qw: QuantizedWeight) -> torch.Tensor:
    """The dequantized weight with no rounding at all (fp64)."""
    return qw.data.double() * qw.scale.double()[:, None]


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_follows_its_definition(scheme, scale_dtype):
    w = random_weight()
    qw = quant.quantize(w, scheme, scale_dtype)
    assert qw.data.dtype == quant.STORAGE_DTYPES[scheme] and qw.scale.dtype == scale_dtype
    assert qw.shape == w.shape and qw.dtype == scale_dtype and qw.scheme == scheme
    qmax = quant.QMAX[scheme]
    amax = w.abs().amax(dim=1).double()
    scale = qw.scale.double()
    nonzero = amax > 0
    # scale: amax / qmax rounded to its dtype, nearest or one ulp up, so that nothing is clipped (an ulp: relative,
    # or the smallest subnormal's for fp16 scales of small rows)
    finfo = torch.finfo(scale_dtype)
    assert (amax[nonzero] <= scale[nonzero] * qmax).all()
    ulp = torch.maximum(amax / qmax * 2 * finfo.eps, torch.full_like(amax, 2 * finfo.tiny * finfo.eps))
    assert (scale[nonzero] <= (amax / qmax + ulp)[nonzero]).all()
    assert (scale[~nonzero] == 1).all() and (qw.data[3].float() == 0).all()
    err = (exact(qw) - w.double()).abs()
    if scheme == "int8":
        assert qw.data.abs().max() <= 127
        assert (err <= scale[:, None] / 2 + 1e-12).all()  # round to nearest: half a step
        assert torch.equal(qw.data, torch.round(w.double() / scale[:, None]).to(torch.int8))
    else:
        ratio = w.double() / scale[:, None]
        assert ratio.abs().max() <= 448
        e4m3 = ratio.float().to(torch.float8_e4m3fn).double()  # the nearest E4M3 value
        assert torch.equal(qw.data.double(), e4m3)
        # half an ulp of E4M3 (3 mantissa bits) relative, or half its smallest subnormal step (2**-9) absolute
        assert (err <= torch.maximum(ratio.abs() * 2**-4, torch.full_like(ratio, 2**-10)) * scale[:, None]).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_joint_quantization_shares_scales_along_k(scheme):
    a, b = random_weight(20, 30, seed=1), random_weight(20, 50, seed=2) * 3
    qa, qb = quant.quantize_joint([a, b], scheme, torch.float16)
    assert torch.equal(qa.scale, qb.scale)
    whole = quant.quantize(torch.cat([a, b], dim=1), scheme, torch.float16)  # the fused weight, quantized whole
    assert torch.equal(whole.scale, qa.scale) and torch.equal(torch.cat([qa.data, qb.data], dim=1), whole.data)
    # rows are independent: quantizing stacked weights is quantizing each
    stacked = quant.quantize(torch.cat([a, 2 * a]), scheme, torch.float16)
    assert torch.equal(stacked.data[:20], quant.quantize(a, scheme, torch.float16).data)


def test_quantize_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        quant.quantize(torch.randn(4, 4), "int4")
    with pytest.raises(ValueError, match="not supported"):
        quant.check_scheme(True)
    bad = torch.randn(4, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize(bad, "int8")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quant.quantize(torch.randn(4), "int8")
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        QuantizedWeight(torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="scale \\[N\\]"):
        QuantizedWeight(torch.zeros(2, 2, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_weight_joins_and_slices_as_the_model_needs(scheme):
    q1, q2 = (quant.quantize(random_weight(8, 16, seed=s), scheme) for s in (3, 4))
    rows = torch.cat([q1, q2])  # dim 0: data and scales joined (the fused q|k|v|fc_in weight)
    assert isinstance(rows, QuantizedWeight) and rows.shape == (16, 16)
    assert torch.equal(rows.dequantize(), torch.cat([q1.dequantize(), q2.dequantize()]))
    assert torch.equal(rows[8:].dequantize(), q2.dequantize())
    a, b = quant.quantize_joint([random_weight(8, 16, seed=5), random_weight(8, 24, seed=6)], scheme)
    cols = torch.cat([a, b], dim=1)  # dim 1: pieces that share scales (the fused out_proj|fc_out weight)
    assert torch.equal(cols[:, 16:].dequantize(), b.dequantize()) and not cols[:, 16:].is_contiguous()
    assert cols[:, 16:].contiguous().clone().is_contiguous()
    with pytest.raises(ValueError, match="different per-row scales"):
        torch.cat([q1, q2], dim=1)
    with pytest.raises(TypeError, match="does not take a QuantizedWeight"):
        torch.nn.functional.linear(torch.randn(2, 16), q1)


@pytest.mark.parametrize("dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_reference_ops_dequantize_then_run_the_dense_op(scheme, dtype):
    """The reference's semantics, bit for bit: W' = (data.float() * scale.float()).to(x.dtype), then the dense op."""
    g = torch.Generator().manual_seed(7)
    x, x2 = torch.randn(5, 24, generator=g).to(dtype), torch.randn(5, 40, generator=g).to(dtype)
    ln_w, ln_b = torch.randn(24, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
    bias, residual = torch.randn(30, generator=g).to(dtype), torch.randn(5, 30, generator=g).to(dtype)
    qw = quant.quantize(torch.randn(30, 24, generator=g), scheme, dtype)
    w = (qw.data.float() * qw.scale.float()[:, None]).to(dtype)
    qcat = quant.quantize(torch.randn(30, 64, generator=g), scheme, dtype)
    wcat = qcat.dequantize(dtype)
    pairs = [
        (reference.linear(x, qw, bias), reference.linear(x, w, bias)),
        (reference.linear_gelu(x, qw, bias), reference.linear_gelu(x, w, bias)),
        (reference.linear_split_gelu(x, qw, bias, 7), reference.linear_split_gelu(x, w, bias, 7)),
        (reference.layer_norm_linear_split_gelu(x, ln_w, ln_b, 1e-5, qw, bias, 7),
         reference.layer_norm_linear_split_gelu(x, ln_w, ln_b, 1e-5, w, bias, 7)),
        (reference.linear_residual(x, qw, bias, residual), reference.linear_residual(x, w, bias, residual)),
        (reference.linear_concat_residual(x, x2, qcat, bias, residual),
         reference.linear_concat_residual(x, x2, wcat, bias, residual)),
    ]
    for got, expected in pairs:
        assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_linear_state_and_dtype_moves(scheme):
    layer = QuantizedLinear(16, 8, bias=True, scheme=scheme, dtype=torch.float32)
    qw = quant.quantize(random_weight(8, 16), scheme)
    layer.weight = qw
    assert isinstance(layer.weight, QuantizedWeight) and torch.equal(layer.weight.dequantize(), qw.dequantize())
    assert list(layer.state_dict()) == ["weight", "weight_scale", "bias"]
    half = copy.deepcopy(layer).to(torch.float16)  # scales and bias follow the dtype; the data never does
    assert half.weight.scale.dtype == torch.float16 and half.bias.dtype == torch.float16
    assert torch.equal(half.weight.data.view(torch.uint8), qw.data.view(torch.uint8))
    other = "fp8" if scheme == "int8" else "int8"
    with pytest.raises(ValueError, match=f"holds {scheme} weights"):
        layer.weight = quant.quantize(random_weight(8, 16), other)


# ---- the model ----

@pytest.fixture(scope="module")
def demo():
    return KoGPTForCausalLM.from_pretrained(None, device="cpu", backend="torch")


PROMPT = torch.tensor([[523, 1851]])  # "국회는" (the demo's prompt with the widest top-2 margins)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_demo_holds_what_resident_bytes_says(scheme, demo):
    model = quant.quantize_model(copy.deepcopy(demo), scheme)
    assert quant.model_scheme(model) == scheme and quant.model_scheme(demo) is None
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == quant.resident_bytes(model.config, scheme, torch.float32)["total"]
    dense = sum(p.numel() * p.element_size() for p in demo.parameters())
    assert dense == quant.resident_bytes(demo.config, None, torch.float32)["total"]
    assert isinstance(model.transformer.h[0].attn.q_proj.weight, QuantizedWeight)
    assert isinstance(model.lm_head.weight, QuantizedWeight) and not isinstance(model.transformer.wte, QuantizedLinear)
    # out_proj and fc_out were quantized together (one scale a row over both)
    block = model.transformer.h[1]
    assert torch.equal(block.attn.out_proj.weight.scale, block.mlp.fc_out.weight.scale)
    with pytest.raises(ValueError, match="quantized already"):
        quant.quantize_model(model, scheme)


def test_resident_size_of_kogpt_6b():
    """The README's table: KoGPT-6B's weights per scheme, from its shapes."""
    from kogpt_fast.config import GPTJConfig

    kogpt = GPTJConfig()  # the defaults are KoGPT-6B's
    gb = {name: quant.resident_bytes(kogpt, scheme, dtype)["total"] / 1e9
          for name, scheme, dtype in (("fp32", None, torch.float32), ("fp16", None, torch.float16),
                                      ("int8", "int8", torch.float16), ("fp8", "fp8", torch.float16))}
    assert round(gb["fp32"] * 1e9) == 4 * 6_166_502_400  # the model card's parameter count
    assert round(gb["fp16"], 2) == 12.33 and round(gb["int8"], 2) == 6.43 and gb["fp8"] == gb["int8"]
    read = {scheme: quant.resident_bytes(kogpt, scheme, torch.float16)["read_per_token"] / 1e9
            for scheme in (None, "int8")}
    assert round(read[None], 2) == 11.80 and round(read["int8"], 2) == 5.91  # the embedding table is not read


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_and_unfused_quantized_demo_agree(scheme, demo):
    """The fused GEMMs over the quantized fused weights compute what the four unfused GEMMs compute."""
    model = quant.quantize_model(copy.deepcopy(demo), scheme)
    unfused = model.generate(PROMPT, max_new_tokens=8)
    model.fuse_projections = True
    fused = model.generate(PROMPT, max_new_tokens=8)
    assert isinstance(model.fused_weights()[0][0], QuantizedWeight)
    assert torch.equal(fused, unfused)
    model.fuse_projections = False  # and back: each module its own contiguous quantized weight again
    assert torch.equal(model.generate(PROMPT, max_new_tokens=8), unfused)
    assert model.transformer.h[0].attn.out_proj.weight.is_contiguous()


def test_int8_demo_keeps_fp32_greedy_tokens(demo):
    """A sanity bar, not the quality measure (tests/test_quality.py): "국회는" has top-2 margins of 0.15 or more."""
    model = quant.quantize_model(copy.deepcopy(demo), "int8")
    assert torch.equal(model.generate(PROMPT, max_new_tokens=24), demo.generate(PROMPT, max_new_tokens=24))


def test_fp8_is_refused_where_it_cannot_run(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert quant.unavailable_reason("fp8", "torch", cpu) is None  # the dequantizing reference runs anywhere
    assert quant.unavailable_reason("int8", "triton", cpu) is None
    assert "not on cpu" in quant.unavailable_reason("fp8", "triton", cpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    reason = quant.unavailable_reason("fp8", "cuda", gpu)
    assert "8.9+" in reason and "A100 is 8.0" in reason and "int8" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert quant.unavailable_reason("fp8", "cuda", gpu) is None
    with pytest.raises(BackendUnavailable, match="fp8"):
        quant.check_runnable("fp8", "triton", cpu)


def test_readme_states_the_computed_sizes():
    """README.md's table of KoGPT-6B's resident size per scheme is what resident_bytes computes."""
    import re
    from pathlib import Path

    from kogpt_fast.config import GPTJConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {"fp32": (None, torch.float32), "fp16 / bf16": (None, torch.float16),
            "int8 (fp16 scales)": ("int8", torch.float16), "fp8 (fp16 scales)": ("fp8", torch.float16)}
    for label, (scheme, dtype) in rows.items():
        found = re.search(rf"^\| {re.escape(label)} \| ([\d.]+) GB \| ([\d.]+) GB \|$", readme, re.M)
        assert found, label
        sizes = quant.resident_bytes(GPTJConfig(), scheme, dtype)
        assert (float(found.group(1)), float(found.group(2))) == (round(sizes["total"] / 1e9, 2),
                                                                    round(sizes["read_per_token"] / 1e9, 2)), label
