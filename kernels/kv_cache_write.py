"""Store new keys (RoPE applied) and values into one layer's paged KV cache, by slot.

    k, v          [N, H, D]                          new tokens, before RoPE (last two dims contiguous, any
                                                     token stride)
    k_cache/v_cache [num_blocks, block_size, H, D]   the layer's pools (slot = block * block_size + offset)
    slot_mapping  [N] int64/int32                    each token's slot; -1 skips the token
    positions     [N] int64                          rotary positions (only with rotary_dim > 0)
    rope          [n_positions, rotary_dim] fp32     kogpt_fast.reference.rope_table

The result equals reference.write_kv_cache(reference.apply_rope(k, ...), v, ...) exactly. The attention kernels
do the same store themselves; this standalone kernel is the simplest place to test it.

Constexprs: ROTARY_DIM (0: store k as given), BLOCK_T (tokens per program), BLOCK_D (head_dim rounded up to a
power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_interpretable, check_same_dtype, check_tensor
from .rope import check_rope, fp_fusion_ok, load_rotated


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, rope_ptr,
    N, H, D,
    stride_kt, stride_kh, stride_vt, stride_vh,  # token and head strides of k, v
    ROTARY_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    in_n = tokens < N
    slot = tl.load(slot_ptr + tokens, mask=in_n, other=-1).to(tl.int64)
    mask = (slot[:, None] >= 0) & (d < D)[None, :]  # [BLOCK_T, BLOCK_D]
    tokens64 = tokens.to(tl.int64)[:, None]
    k_src = tokens64 * stride_kt + head * stride_kh + d[None, :]
    v_src = tokens64 * stride_vt + head * stride_vh + d[None, :]
    dst = (slot[:, None] * H + head) * D + d[None, :]
    if ROTARY_DIM > 0:
        pos = tl.load(pos_ptr + tokens, mask=in_n, other=0).to(tl.int64)[:, None]
    else:
        pos = 0
    k = load_rotated(k_ptr + k_src, d[None, :], pos, mask, rope_ptr, ROTARY_DIM)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + v_src, mask=mask), mask=mask)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor | None = None,
    rope: torch.Tensor | None = None,
    rotary_dim: int = 0,
) -> None:
    """k_cache/v_cache[slot_mapping[n]] = rope(k[n]), v[n] (see the module docstring for shapes)."""
    check_tensor("k", k, dim=3, contiguous="rows")
    n_tokens, n_head, head_dim = k.shape
    check_tensor("v", v, shape=tuple(k.shape), device=k.device, contiguous="rows")
    check_tensor("k_cache", k_cache, shape=(None, None, n_head, head_dim), device=k.device)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), device=k.device)
    check_same_dtype(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    check_interpretable(k.dtype, k.device)
    check_tensor("slot_mapping", slot_mapping, shape=(n_tokens,), dtypes=(torch.int64, torch.int32), device=k.device)
    if rotary_dim:
        if positions is None or rope is None:
            raise ValueError("rotary_dim > 0 needs positions and rope")
        check_tensor("positions", positions, shape=(n_tokens,), dtypes=(torch.int64, torch.int32), device=k.device)
        check_rope(rope, rotary_dim, head_dim, k.device)
    if n_tokens == 0:
        return
    block_t = 4 if k.device.type == "cuda" else 64  # the interpreter's cost is per program
    _write_kv_cache_kernel[(triton.cdiv(n_tokens, block_t), n_head)](
        k, v, k_cache, v_cache, slot_mapping,
        positions if rotary_dim else slot_mapping, rope if rotary_dim else k,  # unused when not rotating
        n_tokens, n_head, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROTARY_DIM=rotary_dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim),
        enable_fp_fusion=fp_fusion_ok(k.dtype),
    )
