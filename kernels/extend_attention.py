"""Extend attention: each sequence's new tokens over its paged, cached context and, causally, over each other, in one
launch for variable numbers of new and cached tokens; RoPE fused, the new K/V written to the paged cache.

    q, k, v        [N, H, D]   the step's new tokens before RoPE, sequences one after another; each contiguous in
                               its last two dims, the token stride free (column slices of the fused GEMM output)
    cu_seqlens     [B+1] int32 sequence b's new tokens are cu_seqlens[b] : cu_seqlens[b+1] (n_b of them)
    seq_lens       [B] int32   its context length, the new tokens included: they sit at context offsets
                               seq_lens[b] - n_b .. seq_lens[b] - 1, after seq_lens[b] - n_b cached tokens
    block_tables   [B, max_blocks] int32  the pages of each sequence's context
    positions      [N] int64   rotary positions;  rope [n_positions, rotary_dim] fp32 (reference.rope_table)
    slot_mapping   [N] int64   where each new token's rotated K and its V go (-1: not cached)
    k_cache, v_cache [num_blocks, block_size, H, D]
    -> out         [N, H, D]

Program (query tile, sequence, head): RoPE on its BLOCK_M new queries once, then an online softmax over two ranges of
keys: the cached context, page by page through the block table (already rotated, all visible), and the new tokens up
to the tile's diagonal, read from k, v with RoPE applied as each tile is loaded (causal mask). Scores, softmax and the
accumulator in fp32; probabilities cast to V's dtype before P @ V, as HF's eager attention does. Each program stores
the rotated keys and values of its own BLOCK_M tokens; no program reads a slot written in the same launch (the new
tokens' K/V come from k, v), so the stores need no ordering. Prefill (nothing cached) and decode (n_b = 1) are special
cases; the model keeps the dedicated kernels for steps of only one kind.

Constexprs: ROTARY_DIM, PAGE_SIZE (the cache block size), DOT_PRECISION ("ieee" for fp32), BLOCK_M / BLOCK_N
(query / key tile), BLOCK_D (head_dim rounded up to a power of two; head_dim up to 256).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kogpt_fast.kv_cache import StepMetadata

from .checks import check_interpretable, check_same_dtype, check_tensor, dot_precision
from .prefill_attention import MAX_HEAD_DIM, AttentionConfig, pick_config
from .rope import check_rope, fp_fusion_ok, load_rotated


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale, DOT_PRECISION: tl.constexpr):
    """One key tile into the running (max, sum, accumulator); every row must see at least one key of the tile."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extend_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rope_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, cu_seqlens_ptr,
    seq_lens_ptr, block_tables_ptr,
    scale, H, D, max_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # token and head strides of q, k, v
    ROTARY_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    n_new = tl.load(cu_seqlens_ptr + seq + 1) - start
    if tile * BLOCK_M >= n_new:
        return
    n_cached = tl.load(seq_lens_ptr + seq) - n_new

    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index among the sequence's new tokens
    in_seq = rows < n_new
    tokens = (start + rows).to(tl.int64)
    mask = in_seq[:, None] & in_d[None, :]
    pos = tl.load(pos_ptr + tokens, mask=in_seq, other=0).to(tl.int64)[:, None]
    q = load_rotated(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :], d[None, :], pos, mask,
                     rope_ptr, ROTARY_DIM)

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

    # The cached context, through the block table: rotated already, visible to every new token.
    table = block_tables_ptr + seq.to(tl.int64) * max_blocks
    for n0 in range(0, n_cached, BLOCK_N):
        ctx = n0 + tl.arange(0, BLOCK_N)
        in_ctx = ctx < n_cached  # ctx n0 always is: every row sees a key, the running max stays finite
        page = tl.load(table + ctx // PAGE_SIZE, mask=in_ctx, other=0).to(tl.int64)
        kv_offs = ((page * PAGE_SIZE + ctx % PAGE_SIZE)[:, None] * H + head) * D + d[None, :]
        kv_mask = in_ctx[:, None] & in_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, in_ctx[None, :], m_i, l_i, acc, scale, DOT_PRECISION)

    # The new tokens, causally, from k and v (not from the cache this launch writes).
    end = tl.minimum(n_new, (tile + 1) * BLOCK_M)  # no key beyond the tile's last query
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        in_keys = cols < n_new
        key_tokens = (start + cols).to(tl.int64)
        key_mask = in_keys[:, None] & in_d[None, :]
        key_pos = tl.load(pos_ptr + key_tokens, mask=in_keys, other=0).to(tl.int64)[:, None]
        k = load_rotated(k_ptr + key_tokens[:, None] * stride_kt + head * stride_kh + d[None, :], d[None, :],
                         key_pos, key_mask, rope_ptr, ROTARY_DIM)
        v = tl.load(v_ptr + key_tokens[:, None] * stride_vt + head * stride_vh + d[None, :], mask=key_mask,
                    other=0.0)
        visible = (cols[None, :] <= rows[:, None]) & in_keys[None, :]  # key 0 is visible to every row
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (tokens[:, None] * H + head) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def extend_attention(
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
    """reference.extend_attention (shapes in the module docstring); uses meta.cu_seqlens, seq_lens, block_tables,
    positions, slot_mapping and max_seqlen (the most new tokens of a sequence: the launch grid, no device sync).
    q, k, v may have any token stride (their last two dims contiguous); out is contiguous."""
    check_tensor("q", q, dim=3, contiguous="rows")
    n_tokens, n_head, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the extend kernel's limit of {MAX_HEAD_DIM}")
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
    batch = meta.cu_seqlens.shape[0] - 1
    check_tensor("meta.seq_lens", meta.seq_lens, shape=(batch,), dtypes=ints, device=q.device)
    check_tensor("meta.block_tables", meta.block_tables, shape=(batch, None), dtypes=ints, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n_tokens == 0 or batch <= 0 or meta.max_seqlen <= 0:
        return out
    block_d = max(triton.next_power_of_2(head_dim), 16)
    cfg = config or pick_config(block_d, q.dtype, q.device)
    grid = (triton.cdiv(meta.max_seqlen, cfg.block_m), batch, n_head)
    _extend_attention_kernel[grid](
        q, k, v, out, meta.positions, rope if rotary_dim else q, k_cache, v_cache, meta.slot_mapping,
        meta.cu_seqlens, meta.seq_lens, meta.block_tables,
        1.0 / math.sqrt(head_dim), n_head, head_dim, meta.block_tables.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROTARY_DIM=rotary_dim, PAGE_SIZE=k_cache.shape[1], DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=fp_fusion_ok(q.dtype),
    )
    return out
