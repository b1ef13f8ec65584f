"""The one place where an op implementation is chosen.

Backends: "torch" (kogpt_fast.reference: the oracle, runs anywhere), "triton" (kogpt_fast.kernels) and
"cuda" (the compiled library in csrc/). "auto" picks cuda > triton > torch by what is available for the device
(on the CPU always torch: Triton runs there only under its interpreter, which is for tests); an explicit backend,
by argument or the KOGPT_BACKEND environment variable, is obeyed strictly. Nothing here imports Triton until the
triton backend is asked for.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device."""


class DeviceUnavailable(RuntimeError):
    """A device that this torch build or this machine does not have (e.g. device="cuda" with a CPU-only torch)."""


def require_device(device) -> torch.device:
    """`device` as a torch.device, once it is known to exist here (checked before anything is moved to it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.backends.cuda.is_built():
        raise DeviceUnavailable(
            f"device {str(device)!r} was requested, but this torch ({torch.__version__}) was built without CUDA: "
            "install a CUDA build of torch (https://pytorch.org/get-started/locally/), or run on the CPU "
            "(device='cpu', --device cpu in the CLI)"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceUnavailable(
            f"device {str(device)!r} was requested, but no CUDA device is visible (no driver, no GPU, or "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); run on the CPU (device='cpu', "
            "--device cpu in the CLI)"
        )
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(f"device {str(device)!r} was requested, but only {count} CUDA device(s) are visible")
    return device


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


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else why not."""
    if name == "torch":
        return None
    if name == "triton":
        return _triton_unavailable_reason(device)
    return _cuda_unavailable_reason(device)


def _cuda_unavailable_reason(device: torch.device) -> str | None:
    """The compiled csrc/ library runs on CUDA devices; ops it has no kernel for go to Triton (or torch)."""
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA devices, not on {device.type}"
    from . import cuda_lib

    if not cuda_lib.is_available():
        return f"the CUDA library is unavailable: {cuda_lib.status()}"
    return None


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """Triton runs on CUDA devices; on the CPU only under its interpreter (TRITON_INTERPRET=1: slow, for tests)."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "Triton kernels run on CUDA devices; on the CPU only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before Triton is imported; it is meant for tests)"
            )
    elif device.type != "cuda":
        return f"Triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), not on {device.type}"
    return _triton_import_error()


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    """None when the Triton kernels import (checked once: importing Triton takes a second)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        triton_kernels("ops")
    except Exception as e:  # a broken Triton install must not break backend="auto"
        return f"the Triton kernels failed to import: {type(e).__name__}: {e}"
    return None


def triton_kernels(name: str) -> ModuleType:
    """The module kogpt_fast.kernels.<name> (Triton kernels; importing it imports Triton).

    An installed kogpt-fast has kernels/ as kogpt_fast.kernels; a source checkout used without installing
    (python -m pytest from the repository root) has it beside kogpt_fast/, and it is loaded from there under
    the same name.
    """
    if "kogpt_fast.kernels" not in sys.modules:
        try:
            importlib.import_module("kogpt_fast.kernels")
        except ModuleNotFoundError as e:
            if e.name != "kogpt_fast.kernels":
                raise
            _load_kernels_from_source_tree()
    return importlib.import_module(f"kogpt_fast.kernels.{name}")


def _load_kernels_from_source_tree() -> None:
    package_dir = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "kogpt_fast.kernels", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    if spec is None or not (package_dir / "__init__.py").is_file():
        raise ModuleNotFoundError("kogpt_fast.kernels is not installed and kernels/ is not beside kogpt_fast/",
                                  name="kogpt_fast.kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kogpt_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kogpt_fast.kernels"]
        raise


def resolve(name: str, device: torch.device) -> str:
    """The backend that will run on `device` for a requested name (raises BackendUnavailable if strict)."""
    name = requested_backend(name)
    if name == "auto":
        if device.type != "cuda":  # on the CPU, Triton's interpreter is for tests: only chosen explicitly
            return "torch"
        for candidate in ("cuda", "triton"):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} was requested but cannot run on {device}: {reason}")
    return name


def get_ops(name: str, device: torch.device) -> ModuleType:
    """The module of ops (layer_norm, linear, linear_gelu, rope_table, prefill_attention, decode_attention)."""
    resolved = resolve(name, torch.device(device))
    if resolved == "torch":
        from . import reference

        return reference
    if resolved == "triton":
        return triton_kernels("ops")
    from . import cuda_ops

    return cuda_ops
