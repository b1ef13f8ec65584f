"""The prefill step on torch's library kernels: what the kernel backends' prefill is measured against.

`KoGPTForCausalLM.prefill_path = "torch"` sends the prefill steps' projections and attention here instead of the
backend's tiled GEMM and fused prefill attention; decode steps keep the backend's kernels. Same names, signatures
and semantics as the reference's ops (kogpt_fast.reference):
- GEMMs on torch's matmul (cuBLAS on a GPU), each epilogue that cuBLAS cannot fuse as one torch op over the output,
  in place: GELU as `gelu(approximate="tanh")`, the function HF's gelu_new computes, in one kernel (the reference
  writes gelu_new as HF does, eight elementwise kernels, fine as an oracle and slow over 2048 x 16384
  activations); the residual as the GEMM's beta term (torch.addmm), the bias added after; [x1 | x2] as two addmm
  into one output, so the concatenation is never made;
- attention on `scaled_dot_product_attention` (flash on a GPU), causal, sequence by sequence, after RoPE on q and
  k and the cache write, each one launch of the Triton kernels (the reference's RoPE is a dozen elementwise ops).
Each GEMM op rounds to the activation dtype after the GEMM and again after its epilogue, as HF does after each of
its ops; the Triton and CUDA GEMMs round once. Both are within the tests' tolerance of the reference.
A quantized weight is dequantized to the activation dtype first (the reference's rounding), then read by cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, reference
from .kv_cache import StepMetadata
from .quant import dense

GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both spell GPT-J's tanh-approximated GELU


def _check_activation(activation: str) -> None:
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")


def _gelu_(y: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(y, approximate="tanh")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dense(weight, x.dtype), bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "gelu_new") -> torch.Tensor:
    _check_activation(activation)
    return _gelu_(F.linear(x, dense(weight, x.dtype), bias))


def linear_split_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new"
) -> torch.Tensor:
    _check_activation(activation)
    y = F.linear(x, dense(weight, x.dtype), bias)
    _gelu_(y[..., gelu_start:])
    return y


def layer_norm_linear_split_gelu(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new",
) -> torch.Tensor:
    return linear_split_gelu(reference.layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu_start, activation)


def _residual_fits(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> bool:
    """addmm's beta term takes the residual as is: 2-D, the output's shape and dtype (else the reference's `+`)."""
    return (x.dim() == 2 and residual.dim() == 2 and residual.dtype == x.dtype
            and residual.shape == (x.shape[0], weight.shape[0]))


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    weight = dense(weight, x.dtype)
    if not _residual_fits(x, weight, residual):
        return reference.linear_residual(x, weight, bias, residual)
    out = torch.addmm(residual, x, weight.t())
    return out if bias is None else out.add_(bias)


def linear_concat_residual(
    x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """[x1 | x2] @ weight^T + bias + residual as residual + x1 W1^T, then + x2 W2^T (W = [W1 | W2], column slices
    that cuBLAS reads at the weight's row stride), then + bias."""
    k1, weight = x1.shape[-1], dense(weight, x1.dtype)
    if not (_residual_fits(x1, weight, residual) and x2.dim() == 2 and k1 + x2.shape[-1] == weight.shape[1]):
        return reference.linear_concat_residual(x1, x2, weight, bias, residual)
    out = torch.addmm(residual, x1, weight[:, :k1].t())
    out.addmm_(x2, weight[:, k1:].t())
    return out if bias is None else out.add_(bias)


def _rope_ops(device: torch.device):
    """The Triton kernels' apply_rope and write_kv_cache where they run (a CUDA device, or the CPU interpreter in
    the tests), else the reference's."""
    if backends.unavailable_reason("triton", device) is None:
        return backends.triton_kernels("ops")
    return reference


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
    """reference.prefill_attention: q, k, v [N, H, D] before RoPE (last two dims contiguous, any token stride),
    packed sequences bounded by meta.cu_seqlens; K (rotated) and V go to the cache; returns [N, H, D]."""
    ops = _rope_ops(q.device)
    q = ops.apply_rope(q, meta.positions, rope, rotary_dim)
    k = ops.apply_rope(k, meta.positions, rope, rotary_dim)
    ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty(q.shape, dtype=v.dtype, device=v.device)
    bounds = meta.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        seq = slice(start, end)
        # [T, H, D] -> [1, H, T, D]: views, the head dim contiguous as SDPA wants it
        attended = F.scaled_dot_product_attention(*(t[seq].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)
        out[seq] = attended[0].transpose(0, 1)
    return out
