"""Input checks shared by the kernel launchers: a bad argument is a ValueError that names it, raised before launch."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t: torch.Tensor, *, dim: int | None = None, shape: tuple | None = None,
                 dtypes: tuple = FLOAT_DTYPES, device: torch.device | None = None,
                 contiguous: bool | str = True) -> None:
    """shape entries of None match any size.

    contiguous: True (the whole tensor), False (any strides), or "rows": the last two dims contiguous (stride(-1)
    == 1, stride(-2) == size(-1)) and any stride for the leading ones, e.g. q, k, v [N, H, D] that are column
    slices of a wider [N, W] buffer (GPT-J's fused q | k | v | fc_in GEMM output viewed per head).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous == "rows":
        if not rows_contiguous(t):
            raise ValueError(f"{name} must be contiguous in its last two dims (shape {tuple(t.shape)}, "
                             f"strides {t.stride()})")
    elif contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def rows_contiguous(t: torch.Tensor) -> bool:
    """The last dim has stride 1 and the one before it stride size(-1) (a dim of size 1 may have any stride):
    each [..., i, :, :] slab is one contiguous block, the slabs themselves at any stride."""
    if t.dim() == 0:
        return True
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    return t.dim() < 2 or t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1]


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise ValueError("dtypes differ: " + ", ".join(f"{n} {d}" for n, d in dtypes.items()))


def check_interpretable(dtype: torch.dtype, device: torch.device) -> None:
    """The CPU interpreter keeps bfloat16 as raw 16-bit integers: its arithmetic on them is garbage and its
    fp32 -> bfloat16 cast truncates instead of rounding. bfloat16 runs on the GPU only."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise ValueError("bfloat16 is not supported by the Triton CPU interpreter; use float16 or float32")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products (IEEE) for fp32 inputs, where TF32 would round them."""
    return "ieee" if dtype == torch.float32 else "tf32"
