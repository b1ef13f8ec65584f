"""The cuda backend: the reference's ops (kogpt_fast.reference), same names, signatures and semantics.

An op runs a kernel of the CUDA library (kogpt_fast.cuda_lib) when one covers its inputs, and otherwise the
fallback ops module, chosen in one place: `fallback_ops()`. Covered today:
- linear, linear_gelu, and GPT-J's fused GEMMs linear_split_gelu (GELU from a column on), linear_residual
  (the residual added in the epilogue) and linear_concat_residual (the same over two inputs read in place): the
  decode GEMV (csrc/gemv.cu) for 1 to 16 rows, with dense weights or int8 / fp8 QuantizedWeights (fp16 and bf16
  activations); larger M (prefill) falls back;
- decode_attention: RoPE, cache write and flash-decoding in the library (csrc/decode_attention.cu);
- write_kv_cache: csrc/kv_cache_write.cu.
layer_norm, prefill_attention, extend_attention (new tokens over a cached context: chunked prefill, prefix-cache
hits, mixed steps; the Triton kernel on a GPU), apply_rope and the GELUs always fall back. With logging at DEBUG level for
"kogpt_fast.cuda_ops", the first call of each (op, implementation) pair logs which one ran and why.
"""
from __future__ import annotations

import logging
from types import ModuleType

import torch

from . import cuda_lib, reference
from .kv_cache import StepMetadata
from .quant import QuantizedWeight
from .reference import rope_table  # noqa: F401  (part of the ops interface: computed once per model)

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()

GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both spell GPT-J's tanh-approximated GELU


def fallback_ops(device: torch.device) -> ModuleType:
    """Where ops without a CUDA kernel (or inputs the kernels do not take) go: the Triton ops on a CUDA device
    where Triton imports, else the torch reference."""
    from . import backends

    if device.type == "cuda" and backends.unavailable_reason("triton", device) is None:
        return backends.triton_kernels("ops")
    return reference


def _ran(op: str, impl: str, why: str = "") -> None:
    if (op, impl) not in _logged and logger.isEnabledFor(logging.DEBUG):
        _logged.add((op, impl))
        logger.debug("%s ran on %s%s", op, impl, f" ({why})" if why else "")


def _kernel_dtype(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.is_cuda and first.dtype in cuda_lib.DTYPE_CODES and cuda_lib.is_available()
            and all(t.device == first.device and t.dtype == first.dtype for t in tensors))


# ---- ops with a CUDA kernel ----

def _gemv_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when the GEMV kernel takes these inputs, else why not."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not _kernel_dtype(*tensors):
        return "no CUDA kernel for this device/dtype"
    if x.dim() != 2 or not 1 <= x.shape[0] <= cuda_lib.GEMV_MAX_M:
        return f"{x.shape[0] if x.dim() == 2 else tuple(x.shape)} rows: the GEMV kernel takes 2-D x with 1..16 rows"
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or (bias is not None and not bias.is_contiguous()):
        return "non-contiguous inputs"
    if isinstance(weight, QuantizedWeight) and (x.dtype not in cuda_lib.QUANTIZED_GEMV_DTYPES
                                                or not weight.scale.is_contiguous()):
        return f"quantized weights with {x.dtype} activations: the GEMV takes float16 and bfloat16"
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] @ weight [M, K]^T + bias [M] -> [N, M] (weights in torch's Linear layout)."""
    why = _gemv_reason(x, weight, bias)
    if why is None:
        _ran("linear", "cuda gemv")
        return cuda_lib.gemv(x, weight, bias)
    _ran("linear", "fallback", why)
    return fallback_ops(x.device).linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "gelu_new") -> torch.Tensor:
    """fc_in with its activation, fused into the GEMV's epilogue: gelu(x @ weight^T + bias)."""
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")
    why = _gemv_reason(x, weight, bias)
    if why is None:
        _ran("linear_gelu", "cuda gemv")
        return cuda_lib.gemv(x, weight, bias, activation="gelu_tanh")
    _ran("linear_gelu", "fallback", why)
    return fallback_ops(x.device).linear_gelu(x, weight, bias, activation)


def linear_split_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new"
) -> torch.Tensor:
    """GPT-J's fused input projection: x @ weight^T + bias [N, M] with GELU on the columns >= gelu_start only,
    in the GEMV's epilogue (q | k | v | gelu(fc_in) from one GEMV over ln_1(x), gelu_start = 3 * n_embd)."""
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")
    why = _gemv_reason(x, weight, bias)
    if why is None:
        _ran("linear_split_gelu", "cuda gemv")
        return cuda_lib.gemv(x, weight, bias, activation="gelu_tanh", gelu_start=gelu_start)
    _ran("linear_split_gelu", "fallback", why)
    return fallback_ops(x.device).linear_split_gelu(x, weight, bias, gelu_start, activation)


def layer_norm_linear_split_gelu(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None, gelu_start: int, activation: str = "gelu_new",
) -> torch.Tensor:
    """linear_split_gelu(layer_norm(x)): for 1 or 2 rows one launch, the CUDA GEMV with its LayerNorm prologue;
    otherwise the fallback's LayerNorm, then linear_split_gelu."""
    if activation not in GELU_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {GELU_ACTIVATIONS}")
    why = _gemv_reason(x, weight, bias)
    if why is None and not (_kernel_dtype(x, ln_weight, ln_bias) and ln_weight.is_contiguous()
                            and ln_bias.is_contiguous() and ln_weight.shape == ln_bias.shape == (x.shape[1],)
                            and x.shape[0] <= cuda_lib.GEMV_LN_MAX_M):
        why = f"{x.shape[0]} rows, or LayerNorm parameters the prologue does not take"
    if why is None:
        _ran("layer_norm_linear_split_gelu", "cuda gemv with LayerNorm")
        return cuda_lib.gemv(x, weight, bias, activation="gelu_tanh", gelu_start=gelu_start,
                             ln=(ln_weight, ln_bias, eps))
    _ran("layer_norm_linear_split_gelu", "LayerNorm, then linear_split_gelu", why)
    return linear_split_gelu(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, gelu_start, activation)


def _residual_reason(x: torch.Tensor, n: int, residual: torch.Tensor) -> str | None:
    """None when the GEMV's residual epilogue takes this residual for output [x.shape[0], n], else why not."""
    if (residual.dtype == x.dtype and residual.device == x.device and residual.dim() == 2
            and residual.shape == (x.shape[0], n) and residual.stride(-1) == 1):
        return None
    return f"residual {tuple(residual.shape)} {residual.dtype}: not [N, M] in x's dtype, rows contiguous"


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """x @ weight^T + bias + residual [N, M], the residual added in the GEMV's epilogue and rounded once with the
    rest (GPT-J's out_proj and fc_out as one GEMV over K = d + d_ff)."""
    why = _gemv_reason(x, weight, bias) or _residual_reason(x, weight.shape[0], residual)
    if why is None:
        _ran("linear_residual", "cuda gemv")
        return cuda_lib.gemv(x, weight, bias, residual=residual)
    _ran("linear_residual", "fallback", why)
    return fallback_ops(x.device).linear_residual(x, weight, bias, residual)


def linear_concat_residual(
    x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """linear_residual over [x1 | x2], both read in place by the GEMV (GPT-J's out_proj + fc_out over
    [attention | gelu(fc_in)], x2 a column slice of the first fused GEMM's output): no concatenation."""
    why = _gemv_reason(x1, weight, bias) or _residual_reason(x1, weight.shape[0], residual)
    if why is None and not (_kernel_dtype(x1, x2) and x2.dim() == 2 and x2.shape[0] == x1.shape[0]
                            and x2.stride(-1) == 1 and x1.shape[1] + x2.shape[1] == weight.shape[1]):
        why = f"x2 {tuple(x2.shape)} {x2.dtype}: not [N, K - K1] with contiguous rows in x1's dtype and device"
    if why is None:
        _ran("linear_concat_residual", "cuda gemv")
        return cuda_lib.gemv(x1, weight, bias, residual=residual, x2=x2)
    _ran("linear_concat_residual", "fallback", why)
    return fallback_ops(x1.device).linear_concat_residual(x1, x2, weight, bias, residual)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [N, H, D] into one layer's pools [num_blocks, block_size, H, D] at slot_mapping [N] (-1: skip)."""
    if _kernel_dtype(k, v, k_cache, v_cache) and slot_mapping.dtype == torch.int64:
        _ran("write_kv_cache", "cuda")
        return cuda_lib.kv_cache_write(k, v, k_cache, v_cache, slot_mapping.contiguous())
    _ran("write_kv_cache", "fallback", "no CUDA kernel for these inputs")
    return reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


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
    """One new token per sequence attending to its cached context; RoPE and the cache write happen in the kernel."""
    if (_kernel_dtype(q, k, v, k_cache, v_cache) and q.shape[-1] in cuda_lib.ATTENTION_HEAD_DIMS
            and rope.dtype == torch.float32 and k_cache.stride(-1) == 1):
        _ran("decode_attention", "cuda")
        return cuda_lib.decode_attention(
            q, k, v, k_cache, v_cache, meta.slot_mapping, meta.positions, rope, rotary_dim,
            meta.block_tables, meta.seq_lens,
        )
    _ran("decode_attention", "fallback", f"no CUDA kernel for head_dim {q.shape[-1]}, {q.dtype} on {q.device}")
    return fallback_ops(q.device).decode_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)


# ---- ops without a CUDA kernel: the fallback's ----

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return fallback_ops(x.device).layer_norm(x, weight, bias, eps)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return reference.gelu_new(x)


def gelu_pytorch_tanh(x: torch.Tensor) -> torch.Tensor:
    return reference.gelu_pytorch_tanh(x)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    return reference.apply_rope(x, positions, table, rotary_dim)


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
    return fallback_ops(q.device).prefill_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)


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
    """No CUDA kernel: the fallback's, i.e. the Triton kernel on a GPU (kernels/extend_attention.py). Extend steps mix
    prefill chunks with decode rows; the library's decode kernel covers the decode-only steps, which the CUDA graphs
    replay."""
    return fallback_ops(q.device).extend_attention(q, k, v, meta, k_cache, v_cache, rope, rotary_dim)
