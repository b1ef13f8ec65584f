"""The one place where an op implementation is chosen.

Backends: "torch" (kogpt_fast.reference: the oracle, runs anywhere), "triton" (kogpt_fast.kernels) and
"cuda" (the compiled library in csrc/). "auto" picks cuda > triton > torch by what is available for the device;
an explicit backend, by argument or the KOGPT_BACKEND environment variable, is obeyed strictly.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device."""


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def requested_backend(name: str = "auto") -> str:
    """The argument, unless it is "auto" and KOGPT_BACKEND names another backend."""
    check_backend_name(name)
    if name == "auto":
        env = os.environ.get("KOGPT_BACKEND", "").strip()
        if env:
            try:
                return check_backend_name(env)
            except ValueError as e:
                raise ValueError(f"KOGPT_BACKEND: {e}") from None
    return name


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    if name == "torch":
        return None
    # The Triton and CUDA kernels are not part of this build yet.
    return f"the {name} backend is not implemented in this version of kogpt-fast"


def resolve(name: str, device: torch.device) -> str:
    """The backend that will run on `device` for a requested name (raises BackendUnavailable if strict)."""
    name = requested_backend(name)
    if name == "auto":
        for candidate in ("cuda", "triton"):
            if _unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} was requested but cannot run on {device}: {reason}")
    return name


def get_ops(name: str, device: torch.device) -> ModuleType:
    """The module of ops (layer_norm, linear, linear_gelu, rope_table, prefill_attention, decode_attention)."""
    resolved = resolve(name, torch.device(device))
    if resolved == "torch":
        from . import reference

        return reference
    raise BackendUnavailable(f"backend {resolved!r} has no ops module")  # unreachable until kernels land
