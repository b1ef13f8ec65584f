"""The kernel tests' accuracy bar (flash-attention's convention): a kernel's error against an oracle one precision
up is at most twice the error of the torch reference run in the kernel's dtype, plus a few ulps of slack."""
from __future__ import annotations

import torch

# The oracle's dtype: the reference on fp64 inputs for fp32 kernels, on fp32 inputs for fp16/bf16 ones.
UP = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ~ a few ulps at magnitude 1


def assert_within_reference_error(got, oracle, ref_in_dtype, dtype):
    """|got - oracle| <= 2 * |reference in dtype - oracle| + ATOL scaled to the outputs' magnitude."""
    err = (got.double() - oracle.double()).abs().max().item()
    ref_err = (ref_in_dtype.double() - oracle.double()).abs().max().item()
    atol = ATOL[dtype] * max(1.0, oracle.abs().max().item())
    assert err <= 2 * ref_err + atol, f"error {err:.3g} > 2 * reference error {ref_err:.3g} + {atol:.3g}"
