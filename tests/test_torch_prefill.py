"""kogpt_fast.torch_prefill's GEMMs (the prefill on torch's matmul) against kogpt_fast.reference, op by op. Its
attention is checked with the Triton kernel's in tests/test_prefill_attention.py.

Tolerance: the error against the reference one precision up is at most twice the reference's own error in the
input dtype plus a few ulps (tests/tolerance.py). On a GPU the same checks run on cuBLAS, at KoGPT-6B's prefill
shapes too.
"""
from __future__ import annotations

import pytest
import torch

from kogpt_fast import reference, torch_prefill
from tolerance import UP, assert_within_reference_error

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16]


def tensors(device, dtype, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) / (s[-1] ** 0.5 if len(s) == 2 and i == 1 else 1)).to(device, dtype)
            for i, s in enumerate(shapes)]


def check(op: str, args: list, dtype, *extra):
    """op(*args, *extra) on torch_prefill against the reference in dtype and one precision up."""
    got = getattr(torch_prefill, op)(*args, *extra)
    up = [a.to(UP[dtype]) if isinstance(a, torch.Tensor) else a for a in args]
    oracle = getattr(reference, op)(*up, *extra)
    assert got.dtype == dtype and got.shape == oracle.shape
    assert_within_reference_error(got, oracle, getattr(reference, op)(*args, *extra), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 130])
def test_ops_against_the_reference(m, dtype, device):
    n, k = 72, 88
    x, w, b, r = tensors(device, dtype, (m, k), (n, k), (n,), (m, n), seed=m)
    check("linear", [x, w, b], dtype)
    check("linear", [x, w], dtype)
    check("linear_gelu", [x, w, b], dtype, "gelu_new")
    check("linear_gelu", [x, w, b], dtype, "gelu_pytorch_tanh")
    for gelu_start in (0, 37, n):
        check("linear_split_gelu", [x, w, b], dtype, gelu_start)
    check("linear_residual", [x, w, b, r], dtype)
    check("linear_residual", [x, w, None, r], dtype)
    g, beta = tensors(device, dtype, (k,), (k,), seed=m + 1)
    check("layer_norm_linear_split_gelu", [x, g, beta, 1e-5, w, b], dtype, 37)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k1, k2", [(40, 100), (0, 64), (64, 0)])
def test_concat_residual_reads_both_pieces(k1, k2, dtype, device):
    m, n = 9, 56
    x1, wide, w, b, r = tensors(device, dtype, (m, k1), (m, k2 + 30), (n, k1 + k2), (n,), (m, n), seed=k1 + k2)
    x2 = wide[:, 30:]  # a column slice, as the fc_in columns of the fused GEMM's output are
    check("linear_concat_residual", [x1, x2, w, b, r], dtype)
    check("linear_concat_residual", [x1, x2, w, None, r], dtype)


def test_split_gelu_leaves_the_columns_before_gelu_start_alone():
    x, w, b = tensors("cpu", torch.float32, (5, 24), (40, 24), (40,))
    torch.testing.assert_close(torch_prefill.linear_split_gelu(x, w, b, 17)[:, :17], reference.linear(x, w, b)[:, :17],
                               rtol=0, atol=0)


def test_other_residuals_follow_the_references_rules():
    """A residual of another dtype or a broadcast shape is added as the reference's `+` adds it."""
    x, w, b, r = tensors("cpu", torch.float32, (5, 24), (40, 24), (40,), (5, 40))
    x2 = torch.randn(5, 8)
    w2 = torch.randn(40, 32)
    for other in (r.double(), r[:1]):
        for op, args in (("linear_residual", [x, w, b, other]), ("linear_concat_residual", [x, x2, w2, b, other])):
            expected = getattr(reference, op)(*args)
            got = getattr(torch_prefill, op)(*args)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_activation_raises():
    x, w, b = tensors("cpu", torch.float32, (2, 8), (4, 8), (4,))
    for op, extra in (("linear_gelu", ()), ("linear_split_gelu", (2,))):
        with pytest.raises(ValueError, match="activation 'relu'"):
            getattr(torch_prefill, op)(x, w, b, *extra, "relu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kogpt_6b_prefill_shapes_on_cublas(dtype):
    """GPT-J's fused GEMMs at KoGPT-6B's size for a 300-token prefill, [a | m] read in place."""
    d, ff, m = 4096, 16384, 300
    x, w_in, b_in = tensors("cuda", dtype, (m, d), (3 * d + ff, d), (3 * d + ff,), seed=1)
    check("linear_split_gelu", [x, w_in, b_in], dtype, 3 * d)
    a, y, w_out, b_out, r = tensors("cuda", dtype, (m, d), (m, 3 * d + ff), (d, d + ff), (d,), (m, d), seed=2)
    check("linear_concat_residual", [a, y[:, 3 * d:], w_out, b_out, r], dtype)
