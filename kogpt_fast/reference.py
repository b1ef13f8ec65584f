"""The torch backend: every op of the decoder in plain PyTorch.

This file is the oracle for the Triton and CUDA kernels, the CPU path, and the documentation of the numerics.
Each op computes exactly what HF transformers' GPT-J eager path computes (modeling_gptj.py), op for op, so that
greedy decoding on this backend equals HF token for token in fp32:

- RoPE: sin/cos from an fp32 table, cast to the activation dtype, applied to interleaved pairs
  (x[2i], x[2i+1]) of the first rotary_dim dims of each head: (x*cos - y*sin, y*cos + x*sin).
- Attention: q and k upcast to fp32, scores = q k^T / sqrt(head_dim), softmax in fp32, probabilities cast to
  the value dtype before P @ V.
- GELU: gelu_new, 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x**3))), written as HF writes it.
- Quantized weights (kogpt_fast.quant.QuantizedWeight, int8 / fp8 with per-row scales), taken by every linear op:
  dequantized to the activation dtype, (data.float() * scale.float()).to(x.dtype), then the dense op.

Shapes: N packed tokens (all sequences of a step, one after another), B sequences, H heads, D head_dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kv_cache import StepMetadata
from .quant import dense


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] @ weight [M, K]^T + bias [M] -> [N, M] (weights in torch's Linear layout, dense or quantized)."""
    return F.linear(x, dense(weight, x.dtype), bias)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_pytorch_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "gelu_new") -> torch.Tensor:
    """fc_in with its activation: gelu(x @ weight^T + bias)."""
    act = gelu_new if activation == "gelu_new" else gelu_pytorch_tanh
    return act(linear(x, weight, bias))


def linear_split_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu_start: int, activation: str = "gelu_new"
) -> torch.Tensor:
    """GPT-J's fused input projection: y = x @ weight^T + bias [N, M], GELU on columns >= gelu_start only.

    With weight = [Wq; Wk; Wv; W_in] and bias = [0; 0; 0; b_in], one GEMM gives q | k | v | gelu(fc_in).
    """
    act = gelu_new if activation == "gelu_new" else gelu_pytorch_tanh
    y = linear(x, weight, bias)
    return torch.cat([y[:, :gelu_start], act(y[:, gelu_start:])], dim=-1)


def layer_norm_linear_split_gelu(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new",
) -> torch.Tensor:
    """linear_split_gelu(layer_norm(x)): GPT-J's fused input projection with the ln_1 before it, as one op so that a
    kernel backend can normalise x inside the GEMV (the decode step then launches no LayerNorm kernel)."""
    return linear_split_gelu(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu_start, activation)


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """x @ weight^T + bias + residual [N, M]: with x = [a | gelu(fc_in)] and weight = [Wo | W_out], GPT-J's
    out_proj and fc_out as one GEMM over K = d + d_ff, added into the residual stream."""
    return linear(x, weight, bias) + residual


def linear_concat_residual(
    x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """linear_residual over [x1 | x2] (x1 [N, K1], x2 [N, K2], weight [M, K1 + K2]). The kernel backends read the
    two inputs in place (GPT-J: the attention output and the fc_in columns of the first fused GEMM's output), so
    the concatenation is never materialised; here it is, which makes the result the same as linear_residual's."""
    return linear_residual(torch.cat([x1, x2], dim=-1), weight, bias, residual)


def rope_table(n_positions: int, rotary_dim: int, device=None) -> torch.Tensor:
    """[n_positions, rotary_dim] fp32: sin of each position's angles in the first half, cos in the second.

    inv_freq[i] = 1 / 10000^(2i / rotary_dim); computed as HF's create_sinusoidal_positions does.
    """
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.einsum("i , j -> i j", torch.arange(n_positions, dtype=torch.int64).float(), inv_freq).float()
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1).to(device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE on the first rotary_dim dims of each head. x [N, H, D], positions [N] -> [N, H, D] (a new tensor)."""
    sincos = table[positions].to(x.dtype)  # [N, rotary_dim]
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    sin = torch.repeat_interleave(sin[:, None, :], 2, dim=-1)  # [N, 1, rotary_dim]
    cos = torch.repeat_interleave(cos[:, None, :], 2, dim=-1)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated_half = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)  # (x,y) -> (-y,x)
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [N, H, D] into one layer's pools [num_blocks, block_size, H, D] at slot_mapping [N].

    slot = block * block_size + offset. A slot of -1 is skipped (a token that is not cached).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def _score_dtype(q: torch.Tensor) -> torch.dtype:
    """HF's upcast of q and k for the scores: fp32 for fp16/bf16/fp32, and fp64 kept (the kernel tests' oracle)."""
    return torch.promote_types(q.dtype, torch.float32)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """q [..., H, Tq, D], k/v [..., H, Tk, D], visible [..., 1, Tq, Tk] bool -> [..., H, Tq, D] in v's dtype."""
    up = _score_dtype(q)
    scores = torch.matmul(q.to(up), k.to(up).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def _rope_and_cache(q, k, v, meta: StepMetadata, k_cache, v_cache, rope, rotary_dim):
    """RoPE on the new q and k at meta.positions; the rotated k and v stored at meta.slot_mapping. -> (q, k)."""
    q = apply_rope(q, meta.positions, rope, rotary_dim)
    k = apply_rope(k, meta.positions, rope, rotary_dim)
    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    return q, k


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: StepMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rope: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """Causal attention of fresh sequences packed along N, RoPE applied here; K (rotated) and V go to the cache.

    q, k, v [N, H, D] before RoPE; meta.cu_seqlens [B+1] bounds each sequence in N; returns [N, H, D].
    """
    q, k = _rope_and_cache(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)
    out = torch.empty_like(v)
    bounds = meta.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        t = end - start
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None]
        seq = slice(start, end)
        out[seq] = _attend(
            q[seq].transpose(0, 1), k[seq].transpose(0, 1), v[seq].transpose(0, 1), causal
        ).transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: StepMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rope: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """One new token per sequence attending to its whole cached context through the block table.

    q, k, v [B, H, D] before RoPE; the new k, v are written first, so meta.seq_lens [B] counts them.
    meta.block_tables [B, max_blocks] int32 lists each sequence's blocks in order; returns [B, H, D].
    Each sequence reads only the blocks its context fills (the table is as wide as the longest sequence the model
    allows): in place when they are consecutive in the pool (as a fresh generate() allocates them), else gathered.
    """
    q, _ = _rope_and_cache(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)
    block_size = k_cache.shape[1]
    out = torch.empty_like(v)
    up = _score_dtype(q)
    q_up, scale = q.to(up)[:, :, None, :], math.sqrt(q.shape[-1])  # [B, H, 1, D], once for every sequence
    for b, (length, table) in enumerate(zip(meta.seq_lens.tolist(), meta.block_tables.tolist())):
        keys = _context(k_cache, table, length, block_size)  # [L, H, D]
        values = _context(v_cache, table, length, block_size)
        # q [H, 1, D] @ keys as [H, D, L]: a view BLAS reads in place (measured 2x faster than keys^T's [H, L, D])
        scores = torch.matmul(q_up[b], keys.to(up).permute(1, 2, 0))  # [H, 1, L]
        probs = torch.softmax(scores / scale, dim=-1).to(values.dtype)
        out[b] = torch.matmul(probs, values.transpose(0, 1))[:, 0]  # [H, D]
    return out


def _context(pool: torch.Tensor, table: list[int], length: int, block_size: int) -> torch.Tensor:
    """The first `length` cached tokens [length, H, D] of a sequence whose blocks are `table` in pool
    [num_blocks, block_size, H, D]: a view when its blocks are consecutive, else a gather of just those blocks."""
    n = -(-length // block_size)
    blocks = table[:n]
    if n == 0:
        return pool[:0].flatten(0, 1)
    if blocks == list(range(blocks[0], blocks[0] + n)):
        context = pool[blocks[0]:blocks[0] + n]
    else:
        context = pool.index_select(0, torch.tensor(blocks, device=pool.device))  # 2-3x advanced indexing's speed
    return context.reshape(n * block_size, *pool.shape[2:])[:length]


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: StepMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rope: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """New tokens of each sequence attending to its cached context and, causally, to each other.

    q, k, v [N, H, D] before RoPE, sequence b's n_b new tokens at meta.cu_seqlens[b] : cu_seqlens[b+1]; they sit at
    context offsets seq_lens[b] - n_b .. seq_lens[b] - 1 (meta.seq_lens counts them), after the seq_lens[b] - n_b
    tokens already cached in the blocks meta.block_tables[b]. Their rotated K and V go to the cache at
    meta.slot_mapping; the attention reads them from k, v, so a token that is not cached (slot -1) is still seen.
    Prefill (nothing cached) and decode (n_b = 1) are special cases. Returns [N, H, D].
    """
    q, k = _rope_and_cache(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)
    out = torch.empty_like(v)
    block_size = k_cache.shape[1]
    bounds, seq_lens, tables = meta.cu_seqlens.tolist(), meta.seq_lens.tolist(), meta.block_tables.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        new, cached = end - start, seq_lens[b] - (end - start)
        keys = torch.cat([_context(k_cache, tables[b], cached, block_size), k[start:end]])  # [cached + new, H, D]
        values = torch.cat([_context(v_cache, tables[b], cached, block_size), v[start:end]])
        rows = torch.arange(new, device=q.device)[:, None] + cached  # each new token's context offset
        visible = (torch.arange(cached + new, device=q.device)[None, :] <= rows)[None]  # [1, new, cached + new]
        out[start:end] = _attend(
            q[start:end].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), visible
        ).transpose(0, 1)
    return out
