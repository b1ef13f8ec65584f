"""Triton LayerNorm (optionally fused with the residual add) against reference.layer_norm.

Tolerance (flash-attention's convention): the kernel's error against an oracle one precision up (fp64 for fp32
inputs, fp32 for fp16/bf16) is at most twice the error of the reference op run in the input dtype, plus a few ulps
of slack for a different summation order.
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

layer_norm = backends.triton_kernels("layer_norm")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check(rows, width, dtype, with_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * 3 + 1).to(dtype).to(DEVICE)
    residual = torch.randn(rows, width, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(width, generator=g)).to(dtype).to(DEVICE)
    bias = (0.1 * torch.randn(width, generator=g)).to(dtype).to(DEVICE)
    eps = 1e-5
    if with_residual:
        y, summed = layer_norm.layer_norm(x, weight, bias, eps, residual=residual)
        assert torch.equal(summed, x + residual)
        x = x + residual  # what the reference normalizes
    else:
        y = layer_norm.layer_norm(x, weight, bias, eps)
    assert y.dtype == dtype and y.shape == x.shape
    up = UP[dtype]
    oracle = reference.layer_norm(x.to(up), weight.to(up), bias.to(up), eps)
    assert_within_reference_error(y, oracle, reference.layer_norm(x, weight, bias, eps), dtype)


DTYPES = [torch.float32, torch.float16]  # bfloat16 only on a GPU: the interpreter cannot round to it


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 130])
@pytest.mark.parametrize("width", [80, 512, 1000])
def test_layer_norm(rows, width, dtype):
    check(rows, width, dtype, with_residual=False, seed=rows + width)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 33])
def test_layer_norm_fused_residual(rows, dtype):
    check(rows, 512, dtype, with_residual=True, seed=rows)


def test_leading_dims_are_kept():
    x = torch.randn(2, 3, 64, device=DEVICE)
    w, b = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    y = layer_norm.layer_norm(x, w, b, 1e-5)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y, reference.layer_norm(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_errors():
    x = torch.randn(4, 64, device=DEVICE)
    w, b = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm.layer_norm(x, w[:32], b, 1e-5)
    with pytest.raises(ValueError, match="x must be contiguous"):
        layer_norm.layer_norm(torch.randn(64, 4, device=DEVICE).t(), w[:4], b[:4], 1e-5)
    with pytest.raises(ValueError, match="dtypes differ"):
        layer_norm.layer_norm(x, w.half(), b, 1e-5)
    with pytest.raises(ValueError, match="residual must have shape"):
        layer_norm.layer_norm(x, w, b, 1e-5, residual=x[:2])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 64, 2048])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_kogpt_6b_shapes(rows, dtype, with_residual):
    check(rows, 4096, dtype, with_residual)
