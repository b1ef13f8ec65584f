"""GPT-J rotary position embedding as a Triton device function, shared by the cache write and attention kernels.

GPT-J rotates interleaved pairs (x[2i], x[2i+1]) of the first ROTARY_DIM dims of each head:
    (x, y) -> (x*cos - y*sin, y*cos + x*sin),   angle = position * 10000^(-2i / ROTARY_DIM)
with sin/cos read from the fp32 table of kogpt_fast.reference.rope_table ([n_positions, ROTARY_DIM]: sin in
the first half, cos in the second) and rounded as the reference rounds them: sin/cos cast to the activation
dtype, each product and the sum rounded to it. So a rotated key equals reference.apply_rope bit for bit (on a
GPU with fp32 activations only when FMA contraction is off: see `fp_fusion_ok`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def load_rotated(x_ptrs, d, pos, mask, rope_ptr, ROTARY_DIM: tl.constexpr):
    """Load head vectors and apply RoPE to their first ROTARY_DIM dims; returns them in the pointers' dtype.

    x_ptrs: pointers to the elements (any shape, e.g. [rows, BLOCK_D]), each head's dims contiguous (a pair's
    other element is at x_ptrs +/- 1; the rows may be at any stride); d: each element's dim within its head
    (broadcastable to x_ptrs); pos: each element's rotary position (int64, broadcastable); mask: what to load.
    ROTARY_DIM = 0 loads without rotating.
    """
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if ROTARY_DIM > 0:
        even = (d % 2) == 0
        rotated = mask & (d < ROTARY_DIM)
        # The other element of each pair: x[d+1] for even d, x[d-1] for odd d.
        pair = tl.load(x_ptrs + tl.where(even, 1, -1), mask=rotated, other=0.0)
        angle = pos * ROTARY_DIM + d // 2
        sin = tl.load(rope_ptr + angle, mask=rotated, other=0.0)
        cos = tl.load(rope_ptr + angle + ROTARY_DIM // 2, mask=rotated, other=0.0)
        # x*cos + (-pair)*sin for even dims, x*cos + pair*sin for odd ones, rounded as the reference rounds.
        dtype = x.dtype
        sin = sin.to(dtype).to(tl.float32)
        cos = cos.to(dtype).to(tl.float32)
        pair = pair.to(tl.float32)
        signed_pair = tl.where(even, -pair, pair)
        a = (x.to(tl.float32) * cos).to(dtype)
        b = (signed_pair * sin).to(dtype)
        x = tl.where(rotated, (a.to(tl.float32) + b.to(tl.float32)).to(dtype), x)
    return x


def fp_fusion_ok(dtype: torch.dtype) -> bool:
    """Whether a kernel that rotates `dtype` values may let the compiler fuse multiply-adds into FMAs.

    In fp16/bf16 every product above is rounded to the dtype before the add, so no FMA can form; in fp32 the
    casts are no-ops and an FMA would round x*cos + y*sin once instead of twice, one ulp off the reference.
    """
    return dtype != torch.float32


def check_rope(rope: torch.Tensor, rotary_dim: int, head_dim: int, device: torch.device) -> None:
    """ValueError unless `rope` is a contiguous fp32 [n_positions, rotary_dim] table on `device`."""
    if rotary_dim < 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    if rotary_dim == 0:
        return
    if rope.dim() != 2 or rope.shape[1] != rotary_dim:
        raise ValueError(f"rope table must be [n_positions, rotary_dim={rotary_dim}], got {tuple(rope.shape)}")
    if rope.dtype != torch.float32 or not rope.is_contiguous() or rope.device != device:
        raise ValueError(
            f"rope table must be a contiguous float32 tensor on {device}, got {rope.dtype} on {rope.device}"
            f"{'' if rope.is_contiguous() else ' (not contiguous)'}"
        )


@triton.jit
def _apply_rope_kernel(
    x_ptr, out_ptr, pos_ptr, rope_ptr,
    N, H, D, stride_xt, stride_xh,
    ROTARY_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    in_n = tokens < N
    mask = in_n[:, None] & (d < D)[None, :]
    tokens64 = tokens.to(tl.int64)[:, None]
    pos = tl.load(pos_ptr + tokens, mask=in_n, other=0).to(tl.int64)[:, None]
    x = load_rotated(x_ptr + tokens64 * stride_xt + head * stride_xh + d[None, :], d[None, :], pos, mask, rope_ptr,
                     ROTARY_DIM)
    tl.store(out_ptr + (tokens64 * H + head) * D + d[None, :], x, mask=mask)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """reference.apply_rope: x [N, H, D] (last two dims contiguous, any token stride), positions [N] ->
    a new contiguous [N, H, D], each rotated element bit for bit the reference's (see the module docstring)."""
    from .checks import check_interpretable, check_tensor

    check_tensor("x", x, dim=3, contiguous="rows")
    n, h, d = x.shape
    check_interpretable(x.dtype, x.device)
    check_tensor("positions", positions, shape=(n,), dtypes=(torch.int64, torch.int32), device=x.device)
    check_rope(table, rotary_dim, d, x.device)
    out = torch.empty((n, h, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_t = 4 if x.device.type == "cuda" else 64  # the interpreter's cost is per program
    _apply_rope_kernel[(triton.cdiv(n, block_t), h)](
        x, out, positions, table if rotary_dim else x, n, h, d, x.stride(0), x.stride(1),
        ROTARY_DIM=rotary_dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d),
        enable_fp_fusion=fp_fusion_ok(x.dtype),
    )
    return out
