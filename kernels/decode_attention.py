"""Paged decode attention (flash-decoding): one new query per sequence over its cached context, RoPE fused.

    q, k, v       [B, H, D]   each sequence's new token before RoPE; each contiguous in its last two dims, the
                              token stride free (e.g. column slices of the fused q | k | v | fc_in GEMM output)
    positions     [B] int64   its rotary position;  rope [n_positions, rotary_dim] fp32 (reference.rope_table)
    slot_mapping  [B] int64   the cache slot of the new token: position seq_lens[b] - 1 of sequence b (as
                              PagedKVCache.plan makes it); the rotated k and v are stored there
    block_tables  [B, max_blocks] int32, seq_lens [B] int32 (the new token included)
    k_cache, v_cache [num_blocks, block_size, H, D]
    -> out        [B, H, D]

Split along the context so that batch 1 with 16 heads still fills the GPU: program (b, h, split) runs an online
softmax over context positions [split * SPLIT_LEN, (split + 1) * SPLIT_LEN), reading K/V page by page through the
block table, and writes its partial max, sum and fp32 accumulator; a second kernel merges the splits of each
(b, h). The new token's K/V come from k, v rather than the cache: the split that holds position seq_lens[b] - 1
attends to them and also stores them in the cache, so no program reads a slot another program writes.

Constexprs: ROTARY_DIM, PAGE_SIZE (the cache block size), SPLIT_LEN (a multiple of BLOCK_N), BLOCK_N (context
positions per step), BLOCK_D (head_dim rounded up to a power of two), BLOCK_S (splits rounded up, for the merge).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kogpt_fast.kv_cache import StepMetadata

from .checks import check_interpretable, check_same_dtype, check_tensor
from .rope import check_rope, fp_fusion_ok, load_rotated

MAX_HEAD_DIM = 256


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, rope_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_tables_ptr, seq_lens_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,
    scale, H, D, max_blocks, num_splits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # token and head strides of q, k, v
    ROTARY_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT_LEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    seq64 = seq.to(tl.int64)
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    q_offs = seq64 * stride_qt + head * stride_qh + d
    q = load_rotated(q_ptr + q_offs, d, pos, in_d, rope_ptr, ROTARY_DIM).to(tl.float32)

    last = tl.load(seq_lens_ptr + seq) - 1  # the new token's position in the context
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, last)  # cached positions this split reads
    table = block_tables_ptr + seq.to(tl.int64) * max_blocks
    m_i = float("-inf")  # running max of the scores
    l_i = 0.0  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        ctx = n0 + tl.arange(0, BLOCK_N)
        valid = ctx < hi
        block = tl.load(table + ctx // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        slots = block * PAGE_SIZE + ctx % PAGE_SIZE
        kv_offs = (slots[:, None] * H + head) * D + d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = valid[:, None] & in_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: ctx n0 < hi is valid
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    # The new token: attended to, and stored in the cache, by the split that holds its position.
    owner = (lo <= last) & (last < lo + SPLIT_LEN)
    k_new = load_rotated(k_ptr + seq64 * stride_kt + head * stride_kh + d, d, pos, in_d, rope_ptr, ROTARY_DIM)
    v_new = tl.load(v_ptr + seq64 * stride_vt + head * stride_vh + d, mask=in_d, other=0.0)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    new_mask = in_d & owner & (slot >= 0)
    tl.store(k_cache_ptr + (slot * H + head) * D + d, k_new, mask=new_mask)
    tl.store(v_cache_ptr + (slot * H + head) * D + d, v_new, mask=new_mask)
    s_new = tl.where(owner, tl.sum(k_new.to(tl.float32) * q, axis=0) * scale, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split past the context: all scores -inf
    alpha = tl.exp(m_i - m_safe)
    p_new = tl.exp(s_new - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha + p_new.to(v_new.dtype).to(tl.float32) * v_new.to(tl.float32)

    part = (seq.to(tl.int64) * H + head) * num_splits + split
    tl.store(part_max_ptr + part, m_new)
    tl.store(part_sum_ptr + part, l_i)
    tl.store(part_acc_ptr + part * D + d, acc, mask=in_d)


@triton.jit
def _decode_merge_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr,
    H, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    in_s = s < num_splits
    part = (seq.to(tl.int64) * H + head) * num_splits + s
    m = tl.load(part_max_ptr + part, mask=in_s, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=in_s, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=in_s[:, None] & (d < D)[None, :], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # the max is finite (the new token's split); empty splits weigh 0
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + (seq.to(tl.int64) * H + head) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(batch: int, n_head: int, max_context: int, block_n: int, device: torch.device,
                num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, split_len): enough programs for two waves over the GPU, each split a multiple of BLOCK_N.

    On the CPU interpreter, as if on a 4-SM device: a few splits, so the model tests exercise the merge.
    """
    chunks = triton.cdiv(max_context, block_n)
    if num_splits is None:
        sms = _multiprocessors(device) if device.type == "cuda" else 4
        num_splits = triton.cdiv(2 * sms, batch * n_head)
    num_splits = max(1, min(num_splits, chunks))
    split_len = triton.cdiv(chunks, num_splits) * block_n
    return triton.cdiv(max_context, split_len), split_len


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: StepMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rope: torch.Tensor,
    rotary_dim: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    """reference.decode_attention (shapes in the module docstring); num_splits None picks one for the device.
    q, k, v may have any token stride (their last two dims contiguous); out is contiguous."""
    check_tensor("q", q, dim=3, contiguous="rows")
    batch, n_head, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the decode kernel's limit of {MAX_HEAD_DIM}")
    check_tensor("k", k, shape=tuple(q.shape), device=q.device, contiguous="rows")
    check_tensor("v", v, shape=tuple(q.shape), device=q.device, contiguous="rows")
    check_tensor("k_cache", k_cache, shape=(None, None, n_head, head_dim), device=q.device)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), device=q.device)
    check_same_dtype(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    check_interpretable(q.dtype, q.device)
    check_rope(rope, rotary_dim, head_dim, q.device)
    ints = (torch.int64, torch.int32)
    check_tensor("meta.positions", meta.positions, shape=(batch,), dtypes=ints, device=q.device)
    check_tensor("meta.slot_mapping", meta.slot_mapping, shape=(batch,), dtypes=ints, device=q.device)
    check_tensor("meta.seq_lens", meta.seq_lens, shape=(batch,), dtypes=ints, device=q.device)
    check_tensor("meta.block_tables", meta.block_tables, shape=(batch, None), dtypes=ints, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    page_size = k_cache.shape[1]
    max_blocks = meta.block_tables.shape[1]
    block_d = triton.next_power_of_2(head_dim)
    block_n = 16 if q.device.type != "cuda" else (32 if block_d > 128 else 64)
    splits, split_len = plan_splits(batch, n_head, max_blocks * page_size, block_n, q.device, num_splits)
    part_max = torch.empty((batch, n_head, splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((batch, n_head, splits, head_dim), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, n_head, splits)](
        q, k, v, meta.positions, rope if rotary_dim else q, k_cache, v_cache, meta.slot_mapping,
        meta.block_tables, meta.seq_lens, part_max, part_sum, part_acc,
        1.0 / math.sqrt(head_dim), n_head, head_dim, max_blocks, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROTARY_DIM=rotary_dim, PAGE_SIZE=page_size, SPLIT_LEN=split_len, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4, enable_fp_fusion=fp_fusion_ok(q.dtype),
    )
    _decode_merge_kernel[(batch, n_head)](
        part_max, part_sum, part_acc, out, n_head, head_dim, splits,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
    )
    return out
