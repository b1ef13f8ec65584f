"""The compiled CUDA library (csrc/, built by setup.py into kogpt_fast/_lib/libkogpt_cuda.so), through ctypes.

The library exports plain C launchers (csrc/kogpt_cuda.h) that take device pointers, sizes, strides and a
cudaStream_t; it links neither torch nor libcuda, so one build serves every torch version. It is loaded on first
use, never when kogpt_fast is imported. Each wrapper here checks its tensors (ValueError naming the problem),
launches on torch's current stream of the tensors' device, and turns a failing return code into an exception
naming the kernel: CudaLibraryError (a RuntimeError) for CUDA errors, ValueError for arguments the library refused.

KOGPT_CUDA_LIB=/path/to/libkogpt_cuda.so loads another build of the library (e.g. one compiled on the GPU machine).
"""
from __future__ import annotations

import ctypes
import functools
import math
import operator
import os
from pathlib import Path

import torch

ABI_VERSION = 5  # KOGPT_ABI_VERSION in csrc/kogpt_cuda.h (2: kogpt_gemv_split_gelu, 3: kogpt_gemv_concat,
# 4: kogpt_gemv_ln_split_gelu, 5: kogpt_gemv_quantized)

# kogpt_status codes
OK, ERR_CUDA, ERR_INVALID_ARGUMENT, ERR_UNSUPPORTED, ERR_WORKSPACE = 0, 1, 2, 3, 4
_STATUS_NAMES = {ERR_CUDA: "CUDA error", ERR_INVALID_ARGUMENT: "invalid argument", ERR_UNSUPPORTED: "unsupported",
                 ERR_WORKSPACE: "workspace too small"}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATIONS = {"none": 0, "gelu_tanh": 1}
WEIGHT_FORMATS = {"int8": 1, "fp8": 2}  # kogpt_weight_format, by kogpt_fast.quant scheme
QUANTIZED_GEMV_DTYPES = (torch.float16, torch.bfloat16)  # activation dtypes kogpt_gemv_quantized takes
ATTENTION_HEAD_DIMS = (64, 128, 256)  # the head dims decode_attention.cu is instantiated for


class CudaLibraryError(RuntimeError):
    """A CUDA error inside the library (launch failure, no driver, ...)."""


def library_path() -> Path:
    """Where the library is looked for (it may not exist: a pure-Python build has none)."""
    override = os.environ.get("KOGPT_CUDA_LIB")
    return Path(override) if override else Path(__file__).resolve().parent / "_lib" / "libkogpt_cuda.so"


_p, _i, _i64, _f, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_size_t
_SIGNATURES = {  # name: (restype, argtypes), as declared in csrc/kogpt_cuda.h
    "kogpt_abi_version": (_i, []),
    "kogpt_last_error": (ctypes.c_char_p, []),
    "kogpt_device_count": (_i, [ctypes.POINTER(_i)]),
    "kogpt_compiled_archs": (ctypes.c_char_p, []),
    "kogpt_kv_cache_write": (_i, [_i, _i, _i, _i, _p, _i64, _i64, _p, _i64, _i64, _p, _p, _i, _i64, _i64, _i64,
                                  _p, _p, _p, _i64, _i, _p]),
    "kogpt_decode_attention_workspace_size": (_sz, [_i, _i, _i, _i, _i, _i]),
    "kogpt_decode_attention": (_i, [_i, _i, _i, _i, _p, _i64, _i64, _p, _i64, _i64, _p, _i64, _i64, _p, _p, _i,
                                    _i64, _i64, _i64, _p, _p, _p, _i64, _i, _p, _i64, _i, _p, _f, _i,
                                    _p, _i64, _i64, _p, _sz, _p]),
    "kogpt_gemv": (_i, [_i, _i, _i, _i, _p, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _i, _p]),
    "kogpt_gemv_split_gelu": (_i, [_i, _i, _i, _i, _p, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _i, _i, _p]),
    "kogpt_gemv_concat": (_i, [_i, _i, _i, _i, _i, _p, _i64, _p, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _i, _i,
                               _p]),
    "kogpt_gemv_ln_split_gelu": (_i, [_i, _i, _i, _i, _p, _i64, _p, _p, _f, _p, _i64, _p, _p, _i64, _p, _i64, _i,
                                      _i, _p]),
    "kogpt_gemv_quantized": (_i, [_i, _i, _i, _i, _i, _i, _p, _i64, _p, _i64, _p, _p, _f, _p, _i64, _p, _p, _p, _i64,
                                  _p, _i64, _i, _i, _p]),
}
EXPORTED_SYMBOLS = tuple(_SIGNATURES)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return load_library(library_path())


def load_library(path: Path) -> ctypes.CDLL:
    """The library at `path` with its C ABI declared, after checking its ABI version (_library() loads the one
    kogpt_fast uses; the tests also load the one in a freshly built wheel)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"the CUDA library is not built: {path} is missing (install kogpt-fast with nvcc on PATH, "
            "or see setup.py; KOGPT_SKIP_CUDA builds leave it out)"
        )
    lib = ctypes.CDLL(str(path))
    # The version first: an older build may lack symbols this version declares.
    lib.kogpt_abi_version.restype, lib.kogpt_abi_version.argtypes = _SIGNATURES["kogpt_abi_version"]
    if lib.kogpt_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI version {lib.kogpt_abi_version()}, this kogpt_fast expects {ABI_VERSION}: "
                           "rebuild it (pip install .)")
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _device_count() -> tuple[int, str | None]:
    """(number of devices, None) or (0, the library's reason: "no driver: ...", "no device: ...")."""
    lib = _library()
    count = ctypes.c_int(0)
    if lib.kogpt_device_count(ctypes.byref(count)) != OK:
        return 0, lib.kogpt_last_error().decode(errors="replace")
    return count.value, None


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """The library is present and loads, and the CUDA runtime sees a device (checked once)."""
    try:
        return _device_count()[0] > 0
    except Exception:
        return False


def status() -> dict:
    """What `kogpt-fast` knows about the CUDA library, without raising: for logs, the CLI and CI.

    {"library": path, "present": bool, "loaded": bool, "error": str | None, "archs": "80;89;90" | None,
     "devices": int, "device_error": "no driver: ..." | None, "available": bool}
    """
    path = library_path()
    info = {"library": str(path), "present": path.is_file(), "loaded": False, "error": None, "archs": None,
            "devices": 0, "device_error": None, "available": False}
    if not info["present"]:
        info["error"] = f"{path} is missing (a build without nvcc, or KOGPT_SKIP_CUDA=1)"
        return info
    try:
        lib = _library()
        info["loaded"] = True
        info["archs"] = lib.kogpt_compiled_archs().decode()
        info["devices"], info["device_error"] = _device_count()
    except Exception as e:  # a library that fails to load is reported, not raised
        info["error"] = f"{type(e).__name__}: {e}"
    info["available"] = info["devices"] > 0
    return info


def _check(rc: int, kernel: str) -> None:
    if rc == OK:
        return
    message = _library().kogpt_last_error().decode(errors="replace")
    if rc == ERR_CUDA:
        raise CudaLibraryError(f"{kernel}: {message}")
    raise ValueError(f"{kernel}: {_STATUS_NAMES.get(rc, f'error {rc}')}: {message}")


# ---- input checks ----

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_tensor(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None, dim: int,
                  contiguous: bool = False) -> None:
    _require(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _require(t.device == device, f"{name} is on {t.device}, expected {device}")
    _require(dtype is None or t.dtype == dtype, f"{name} has dtype {t.dtype}, expected {dtype}")
    _require(t.dim() == dim, f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if contiguous:
        _require(t.is_contiguous(), f"{name} must be contiguous")
    else:
        _require(t.dim() == 0 or t.stride(-1) == 1, f"{name} must be contiguous in its last dim")


def _dtype_code(name: str, t: torch.Tensor) -> int:
    _require(t.is_cuda, f"{name} must be a CUDA tensor, got one on {t.device}")
    _require(t.dtype in DTYPE_CODES, f"{name} has dtype {t.dtype}; the CUDA kernels take float32, float16, bfloat16")
    return DTYPE_CODES[t.dtype]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---- ops ----

def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, positions: torch.Tensor | None = None,
                   rope_table: torch.Tensor | None = None, rotary_dim: int = 0) -> None:
    """Store k, v [N, H, D] into the pools [num_blocks, block_size, H, D] at slot_mapping [N] (int64; -1 skips).

    k and v need only their last dim contiguous: their token and head strides go to the library.

    With rope_table ([n_positions, rotary_dim] fp32) and positions [N] int64, k is rotated (GPT-J RoPE) first.
    """
    dtype = _dtype_code("k", k)
    device = k.device
    _check_tensor("k", k, device, k.dtype, 3)
    n, h, d = k.shape
    _check_tensor("v", v, device, k.dtype, 3)
    _require(v.shape == k.shape, f"v has shape {tuple(v.shape)}, k {tuple(k.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, device, k.dtype, 4)
        _require(cache.shape[2:] == (h, d), f"{name} has shape {tuple(cache.shape)}, expected [*, *, {h}, {d}]")
    _require(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(),
             "k_cache and v_cache must have the same shape and strides")
    _check_tensor("slot_mapping", slot_mapping, device, torch.int64, 1, contiguous=True)
    _require(slot_mapping.shape[0] == n, f"slot_mapping has {slot_mapping.shape[0]} entries for {n} tokens")
    if rope_table is not None:
        _check_tensor("rope_table", rope_table, device, torch.float32, 2)
        _require(positions is not None, "positions are needed with rope_table")
        _check_tensor("positions", positions, device, torch.int64, 1, contiguous=True)
        _require(positions.shape[0] == n, f"positions has {positions.shape[0]} entries for {n} tokens")
        _require(rope_table.shape[1] == rotary_dim,
                 f"rope_table has {rope_table.shape[1]} columns, expected rotary_dim={rotary_dim}")
    with torch.cuda.device(device):
        rc = _library().kogpt_kv_cache_write(
            dtype, n, h, d, _ptr(k), k.stride(0), k.stride(1), _ptr(v), v.stride(0), v.stride(1),
            _ptr(k_cache), _ptr(v_cache), k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            _ptr(slot_mapping), _ptr(positions) if rope_table is not None else None, _ptr(rope_table),
            rope_table.stride(0) if rope_table is not None else 0, rotary_dim if rope_table is not None else 0,
            _stream(device),
        )
    _check(rc, "kogpt_kv_cache_write")


def decode_partition_size(batch: int, n_head: int, max_context: int, device: torch.device) -> int:
    """Tokens per flash-decoding split: enough splits that batch * n_head * splits fills the GPU ~4 CTAs deep.

    Depends only on host-known sizes (max_context = max_blocks * block_size), so CUDA-graph capture sees a fixed
    grid. A multiple of 32 in [32, 512].
    """
    target_ctas = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = max(1, -(-target_ctas // (batch * n_head)))
    size = -(-max_context // splits)
    return min(512, max(32, -(-size // 32) * 32))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                     rope_table: torch.Tensor, rotary_dim: int, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float | None = None, partition_size: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged decode attention with RoPE and the cache write fused (kogpt_fast.reference.decode_attention).

    q, k, v [B, H, D] before RoPE, last dim contiguous, any token and head strides (e.g. column slices of the fused
    q | k | v | fc_in GEMM output); positions, slot_mapping [B] int64; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (counting the new token); rope_table [n_positions, rotary_dim] fp32. Returns out [B, H, D].
    """
    dtype = _dtype_code("q", q)
    device = q.device
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, device, q.dtype, 3)
        _require(t.shape == q.shape, f"{name} has shape {tuple(t.shape)}, q {tuple(q.shape)}")
    b, h, d = q.shape
    _require(d in ATTENTION_HEAD_DIMS, f"head_dim {d} is not supported by the CUDA kernel ({ATTENTION_HEAD_DIMS})")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, device, q.dtype, 4)
        _require(cache.shape[2:] == (h, d), f"{name} has shape {tuple(cache.shape)}, expected [*, *, {h}, {d}]")
    _require(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(),
             "k_cache and v_cache must have the same shape and strides")
    for name, t in (("slot_mapping", slot_mapping), ("positions", positions)):
        _check_tensor(name, t, device, torch.int64, 1, contiguous=True)
        _require(t.shape[0] == b, f"{name} has {t.shape[0]} entries for a batch of {b}")
    _check_tensor("block_tables", block_tables, device, torch.int32, 2)
    _require(block_tables.shape[0] == b and block_tables.shape[1] >= 1,
             f"block_tables has shape {tuple(block_tables.shape)} for a batch of {b}")
    _check_tensor("seq_lens", seq_lens, device, torch.int32, 1, contiguous=True)
    _require(seq_lens.shape[0] == b, f"seq_lens has {seq_lens.shape[0]} entries for a batch of {b}")
    _check_tensor("rope_table", rope_table, device, torch.float32, 2)
    _require(0 < rotary_dim <= d and rotary_dim % 2 == 0 and rope_table.shape[1] == rotary_dim,
             f"rotary_dim {rotary_dim} must be even, at most head_dim {d}, and the rope_table's width "
             f"({rope_table.shape[1]})")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _check_tensor("out", out, device, q.dtype, 3)
    _require(out.shape == q.shape, f"out has shape {tuple(out.shape)}, q {tuple(q.shape)}")

    block_size, max_blocks = k_cache.shape[1], block_tables.shape[1]
    if partition_size is None:
        partition_size = decode_partition_size(b, h, max_blocks * block_size, device)
    lib = _library()
    workspace_bytes = lib.kogpt_decode_attention_workspace_size(dtype, b, h, d, max_blocks * block_size,
                                                                partition_size)
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        rc = lib.kogpt_decode_attention(
            dtype, b, h, d, _ptr(q), q.stride(0), q.stride(1), _ptr(k), k.stride(0), k.stride(1),
            _ptr(v), v.stride(0), v.stride(1), _ptr(k_cache), _ptr(v_cache), block_size,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), _ptr(slot_mapping), _ptr(positions),
            _ptr(rope_table), rope_table.stride(0), rotary_dim, _ptr(block_tables), block_tables.stride(0),
            max_blocks, _ptr(seq_lens), 1.0 / math.sqrt(d) if scale is None else scale, partition_size,
            _ptr(out), out.stride(0), out.stride(1), _ptr(workspace), workspace_bytes, _stream(device),
        )
    _check(rc, "kogpt_decode_attention")
    return out


GEMV_MAX_M = 16


GEMV_LN_MAX_M = 2  # rows the GEMV's LayerNorm prologue takes


def gemv(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, activation: str = "none",
         out: torch.Tensor | None = None, gelu_start: int = 0, x2: torch.Tensor | None = None,
         ln: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """out [M, N] = act([x | x2] [M, K] @ weight [N, K]^T + bias [N]) + residual [M, N], for M = 1..16.

    x [M, K1] and the optional x2 [M, K - K1] are read in place (each 2-D with contiguous rows, any row stride).
    ln = (ln_weight [K], ln_bias [K], eps), without x2 and for M <= 2: the input is layer_norm(x), computed in the
    kernel.
    activation: "none" or "gelu_tanh" (HF's gelu_new), applied to the columns n >= gelu_start only (0: all, N: none).
    weight: a dense tensor in x's dtype, or a kogpt_fast.quant.QuantizedWeight (int8 / fp8 data [N, K] with contiguous
    rows, scale [N] in x's dtype; x float16 or bfloat16): the scale multiplies the fp32 sum before the epilogue.
    fp32 accumulation; one rounding to the dtype at the end.
    """
    from .quant import QuantizedWeight

    dtype = _dtype_code("x", x)
    device = x.device
    _check_tensor("x", x, device, x.dtype, 2)
    m, k1 = x.shape
    _require(1 <= m <= GEMV_MAX_M, f"x has {m} rows; the GEMV kernel takes 1 to {GEMV_MAX_M}")
    k2 = 0
    if x2 is not None:
        _check_tensor("x2", x2, device, x.dtype, 2)
        _require(x2.shape[0] == m, f"x2 has {x2.shape[0]} rows, x {m}")
        k2 = x2.shape[1]
    scale = None
    if isinstance(weight, QuantizedWeight):
        _require(x.dtype in QUANTIZED_GEMV_DTYPES,
                 f"x has dtype {x.dtype}; the GEMV takes quantized weights with float16 or bfloat16 activations")
        scale, weight_format = weight.scale, WEIGHT_FORMATS[weight.scheme]
        _check_tensor("weight scale", scale, device, x.dtype, 1, contiguous=True)
        weight = weight.data
        _check_tensor("weight", weight, device, None, 2)
    else:
        _check_tensor("weight", weight, device, x.dtype, 2)
    _require(weight.shape[1] == k1 + k2 and k1 + k2 >= 1,
             f"weight has shape {tuple(weight.shape)}, expected [N, {k1 + k2}] (x's {k1} columns + x2's {k2})")
    n = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, device, x.dtype, 1, contiguous=True)
        _require(bias.shape[0] == n, f"bias has {bias.shape[0]} entries, expected {n}")
    if residual is not None:
        _check_tensor("residual", residual, device, x.dtype, 2)
        _require(residual.shape == (m, n), f"residual has shape {tuple(residual.shape)}, expected ({m}, {n})")
    _require(activation in ACTIVATIONS, f"activation {activation!r} is not one of {tuple(ACTIVATIONS)}")
    try:
        gelu_start = operator.index(gelu_start) if not isinstance(gelu_start, bool) else None
    except TypeError:
        gelu_start = None
    _require(gelu_start is not None and 0 <= gelu_start <= n,
             f"gelu_start must be an integer in [0, {n}] (weight's out_features)")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=device)
    _check_tensor("out", out, device, x.dtype, 2)
    _require(out.shape == (m, n), f"out has shape {tuple(out.shape)}, expected ({m}, {n})")
    ln_weight = ln_bias = None
    eps = 0.0
    if ln is not None:
        _require(x2 is None, "ln (a LayerNorm of x) and x2 cannot be combined")
        _require(m <= GEMV_LN_MAX_M, f"x has {m} rows; the GEMV's LayerNorm prologue takes 1 to {GEMV_LN_MAX_M}")
        ln_weight, ln_bias, eps = ln
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            _check_tensor(name, t, device, x.dtype, 1, contiguous=True)
            _require(t.shape[0] == k1, f"{name} has {t.shape[0]} entries, expected {k1}")
        _require(math.isfinite(eps) and eps >= 0, f"eps must be finite and >= 0, got {eps}")
    lib = _library()
    residual_stride = residual.stride(0) if residual is not None else 0
    with torch.cuda.device(device):
        if scale is not None:
            rc = lib.kogpt_gemv_quantized(
                dtype, weight_format, m, n, k1, k2, _ptr(x) if k1 else None, x.stride(0),
                _ptr(x2) if k2 else None, x2.stride(0) if k2 else 0, _ptr(ln_weight), _ptr(ln_bias), float(eps),
                _ptr(weight), weight.stride(0), _ptr(scale), _ptr(bias), _ptr(residual), residual_stride,
                _ptr(out), out.stride(0), ACTIVATIONS[activation], gelu_start, _stream(device),
            )
        elif ln is not None:
            rc = lib.kogpt_gemv_ln_split_gelu(
                dtype, m, n, k1, _ptr(x), x.stride(0), _ptr(ln_weight), _ptr(ln_bias), float(eps), _ptr(weight),
                weight.stride(0), _ptr(bias), _ptr(residual), residual_stride, _ptr(out), out.stride(0),
                ACTIVATIONS[activation], gelu_start, _stream(device),
            )
        else:
            rc = lib.kogpt_gemv_concat(
                dtype, m, n, k1, k2, _ptr(x) if k1 else None, x.stride(0),
                _ptr(x2) if k2 else None, x2.stride(0) if k2 else 0, _ptr(weight), weight.stride(0), _ptr(bias),
                _ptr(residual), residual_stride, _ptr(out), out.stride(0), ACTIVATIONS[activation], gelu_start,
                _stream(device),
            )
    _check(rc, "kogpt_gemv")
    return out
