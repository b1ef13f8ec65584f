"""LayerNorm over the last dim, optionally fused with the residual add that precedes it.

    x        [..., C]   contiguous activations (fp16 / bf16 / fp32)
    residual [..., C]   optional: normalize s = x + residual (rounded to x's dtype, as torch would) and return s too
    weight, bias [C]
    -> y [..., C] in x's dtype  (and s when residual is given)

One program per row; mean and variance in fp32 (two passes over the row held in registers, as torch's CUDA kernel),
rstd = 1/sqrt(var + eps). Constexprs: HAS_RESIDUAL (fuse the add), BLOCK_C (C rounded up to a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_interpretable, check_same_dtype, check_tensor

MAX_C = 65536  # a row lives in registers


@triton.jit
def _layer_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, sum_ptr,
    C, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    offs = row * C + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / C
    centered = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(y_ptr + offs, y.to(x.dtype), mask=mask)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
):
    """reference.layer_norm(x, weight, bias, eps); with residual, (layer_norm(x + residual), x + residual)."""
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim")
    c = x.shape[-1]
    if c > MAX_C:
        raise ValueError(f"layer_norm rows of {c} elements exceed the kernel's limit of {MAX_C}")
    check_tensor("weight", weight, shape=(c,), device=x.device)
    check_tensor("bias", bias, shape=(c,), device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), device=x.device)
    check_same_dtype(x=x, weight=weight, bias=bias, residual=residual)
    check_interpretable(x.dtype, x.device)
    y = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // c if c else 0
    if rows:
        block = triton.next_power_of_2(c)
        _layer_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, bias, y, summed if summed is not None else y,
            c, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_C=block, num_warps=min(max(block // 512, 1), 8),
        )
    return y if residual is None else (y, summed)
