"""The triton backend: the reference's ops (kogpt_fast.reference), same names, signatures and semantics.

GPT-J's fusions are the GEMM's epilogues: linear_split_gelu (GELU from a column on) and linear_residual /
linear_concat_residual (the residual added; the latter reads its input from two tensors).
The model calls these through kogpt_fast.backends.get_ops("triton", device); apply_rope and write_kv_cache serve
kogpt_fast.torch_prefill (RoPE and the cache write before SDPA). rope_table is the reference's (it
is computed once per model, on the host side of the work).
"""
from __future__ import annotations

import torch

from kogpt_fast.reference import rope_table  # noqa: F401  (part of the ops interface)

from .decode_attention import decode_attention  # noqa: F401
from .extend_attention import extend_attention  # noqa: F401
from .gemm import gemm
from .kv_cache_write import write_kv_cache  # noqa: F401
from .layer_norm import layer_norm  # noqa: F401
from .prefill_attention import prefill_attention  # noqa: F401
from .rope import apply_rope  # noqa: F401

# Both spellings HF uses for GPT-J's tanh-approximated GELU compute the same function.
GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] @ weight [M, K]^T + bias [M] -> [N, M]."""
    return gemm(x, weight, bias)


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "gelu_new"
) -> torch.Tensor:
    """fc_in with its activation, fused into the GEMM's epilogue: gelu(x @ weight^T + bias)."""
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")
    return gemm(x, weight, bias, activation="gelu_tanh")


def linear_split_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new"
) -> torch.Tensor:
    """GPT-J's fused input projection: x @ weight^T + bias [N, M] with GELU on the columns >= gelu_start only,
    in the GEMM's epilogue (q | k | v | gelu(fc_in) from one GEMM over ln_1(x), gelu_start = 3 * n_embd)."""
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")
    return gemm(x, weight, bias, activation="gelu_tanh", gelu_start=gelu_start)


def layer_norm_linear_split_gelu(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new",
) -> torch.Tensor:
    """linear_split_gelu(layer_norm(x)): the GEMV normalises x's rows itself (decode: no LayerNorm kernel); larger
    M runs the LayerNorm kernel, then the tiled GEMM."""
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")
    return gemm(x, weight, bias, activation="gelu_tanh", gelu_start=gelu_start, ln=(ln_weight, ln_bias, eps))


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """x @ weight^T + bias + residual [N, M], the residual added in the epilogue and rounded once with the rest
    (GPT-J's out_proj and fc_out as one GEMM over K = d + d_ff)."""
    return _gemm_residual(x, None, weight, bias, residual)


def _gemm_residual(x, x2, weight, bias, residual):
    """gemm([x | x2]) + bias + residual, the residual fused into the epilogue when it is the output's shape and
    dtype; otherwise added after, with the reference's promotion and broadcasting."""
    if residual.dtype != x.dtype or residual.shape != (*x.shape[:-1], weight.shape[0]):
        return gemm(x, weight, bias, x2=x2) + residual
    return gemm(x, weight, bias, residual=residual.contiguous(), x2=x2)


def linear_concat_residual(
    x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """linear_residual over [x1 | x2] with both read in place (x1 [N, K1], x2 [N, K2], each contiguous or 2-D with
    contiguous rows): GPT-J's out_proj + fc_out over [attention | gelu(fc_in)] without the concatenation."""
    return _gemm_residual(x1, x2, weight, bias, residual)
