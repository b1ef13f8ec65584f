"""Causal flash attention over variable-length sequences packed into one launch, RoPE fused, K/V into the paged cache.

    q, k, v        [N, H, D]   the step's new tokens before RoPE, sequences one after another; each contiguous in
                               its last two dims, the token stride free (e.g. column slices of the fused
                               q | k | v | fc_in GEMM output, token stride 3d + d_ff)
    cu_seqlens     [B+1] int32 sequence b is tokens cu_seqlens[b] : cu_seqlens[b+1]
    positions      [N] int64   rotary positions;  rope [n_positions, rotary_dim] fp32 (reference.rope_table)
    slot_mapping   [N] int64   where each token's rotated K and its V go in k_cache / v_cache
                               [num_blocks, block_size, H, D] (-1: not cached)
    -> out         [N, H, D]   softmax(rope(q) rope(k)^T / sqrt(D) + causal mask) v, per sequence

Program (query tile, sequence, head): RoPE on its BLOCK_M queries once, then over the key tiles up to the diagonal
with RoPE applied as each tile is loaded; scores, online softmax and the output accumulator in fp32; probabilities
cast to V's dtype before P @ V (as HF's eager attention does). Each program also stores the rotated keys and values
of its own BLOCK_M tokens, so every token is written once and no program reads what another writes.

Constexprs: ROTARY_DIM, DOT_PRECISION ("ieee" for fp32), BLOCK_M / BLOCK_N (query / key tile), BLOCK_D (head_dim
rounded up to a power of two; head_dim up to 256).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kogpt_fast.kv_cache import StepMetadata

from .checks import check_interpretable, check_same_dtype, check_tensor, dot_precision
from .rope import check_rope, fp_fusion_ok, load_rotated

MAX_HEAD_DIM = 256


class AttentionConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def pick_config(block_d: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    if device.type != "cuda":
        return AttentionConfig(32, 32, num_stages=1)
    # fp32 (tests only): keep the fp32 tiles in shared memory. Measured for sm_90 (Triton 3.6): block_d 256 with
    # (32, 16, stages 2) needs 128 KB, (32, 16, stages 1) 64 KB; block_d 128 with (64, 64, stages 3) needs 224.5 KB,
    # 2.5 KB under the H100's 227 KB and above sm_80's 163 KB, (32, 32, stages 2) 112 KB.
    if dtype == torch.float32 and block_d > 128:
        return AttentionConfig(32, 16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return AttentionConfig(32, 32, num_warps=4, num_stages=2)
    if block_d > 128:
        return AttentionConfig(64, 32, num_warps=8, num_stages=2)
    return AttentionConfig(64, 64, num_warps=4, num_stages=3)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rope_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, cu_seqlens_ptr,
    scale, H, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # token and head strides of q, k, v
    ROTARY_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    if tile * BLOCK_M >= seq_len:
        return

    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    in_seq = rows < seq_len
    tokens = (start + rows).to(tl.int64)
    offs = (tokens[:, None] * H + head) * D + d[None, :]  # [BLOCK_M, BLOCK_D] into out (contiguous)
    q_offs = tokens[:, None] * stride_qt + head * stride_qh + d[None, :]
    mask = in_seq[:, None] & in_d[None, :]
    pos = tl.load(pos_ptr + tokens, mask=in_seq, other=0).to(tl.int64)[:, None]
    q = load_rotated(q_ptr + q_offs, d[None, :], pos, mask, rope_ptr, ROTARY_DIM)

    # This tile's own tokens go to the cache.
    slot = tl.load(slot_ptr + tokens, mask=in_seq, other=-1).to(tl.int64)
    cache_offs = (slot[:, None] * H + head) * D + d[None, :]
    cache_mask = mask & (slot[:, None] >= 0)
    k_own = load_rotated(k_ptr + tokens[:, None] * stride_kt + head * stride_kh + d[None, :], d[None, :], pos, mask,
                         rope_ptr, ROTARY_DIM)
    tl.store(k_cache_ptr + cache_offs, k_own, mask=cache_mask)
    v_own = tl.load(v_ptr + tokens[:, None] * stride_vt + head * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + cache_offs, v_own, mask=cache_mask)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(seq_len, (tile + 1) * BLOCK_M)  # causal: no key beyond the tile's last query
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # key index within the sequence
        in_keys = cols < seq_len
        key_tokens = (start + cols).to(tl.int64)
        key_mask = in_keys[:, None] & in_d[None, :]
        key_pos = tl.load(pos_ptr + key_tokens, mask=in_keys, other=0).to(tl.int64)[:, None]
        k_offs = key_tokens[:, None] * stride_kt + head * stride_kh + d[None, :]
        k = load_rotated(k_ptr + k_offs, d[None, :], key_pos, key_mask, rope_ptr, ROTARY_DIM)
        v = tl.load(v_ptr + key_tokens[:, None] * stride_vt + head * stride_vh + d[None, :], mask=key_mask,
                    other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        visible = (cols[None, :] <= rows[:, None]) & in_keys[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is visible to every row
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: StepMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rope: torch.Tensor,
    rotary_dim: int,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """reference.prefill_attention (shapes in the module docstring); uses meta.cu_seqlens, positions,
    slot_mapping and max_seqlen (the longest sequence: the launch grid, read without a device sync).
    q, k, v may have any token stride (their last two dims contiguous); out is contiguous."""
    check_tensor("q", q, dim=3, contiguous="rows")
    n_tokens, n_head, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the prefill kernel's limit of {MAX_HEAD_DIM}")
    check_tensor("k", k, shape=tuple(q.shape), device=q.device, contiguous="rows")
    check_tensor("v", v, shape=tuple(q.shape), device=q.device, contiguous="rows")
    check_tensor("k_cache", k_cache, shape=(None, None, n_head, head_dim), device=q.device)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), device=q.device)
    check_same_dtype(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    check_interpretable(q.dtype, q.device)
    check_rope(rope, rotary_dim, head_dim, q.device)
    ints = (torch.int64, torch.int32)
    check_tensor("meta.positions", meta.positions, shape=(n_tokens,), dtypes=ints, device=q.device)
    check_tensor("meta.slot_mapping", meta.slot_mapping, shape=(n_tokens,), dtypes=ints, device=q.device)
    check_tensor("meta.cu_seqlens", meta.cu_seqlens, dim=1, dtypes=ints, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = meta.cu_seqlens.shape[0] - 1
    if n_tokens == 0 or batch <= 0 or meta.max_seqlen <= 0:
        return out
    block_d = max(triton.next_power_of_2(head_dim), 16)
    cfg = config or pick_config(block_d, q.dtype, q.device)
    grid = (triton.cdiv(meta.max_seqlen, cfg.block_m), batch, n_head)
    _prefill_attention_kernel[grid](
        q, k, v, out, meta.positions, rope if rotary_dim else q, k_cache, v_cache, meta.slot_mapping,
        meta.cu_seqlens,
        1.0 / math.sqrt(head_dim), n_head, head_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROTARY_DIM=rotary_dim, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=fp_fusion_ok(q.dtype),
    )
    return out
