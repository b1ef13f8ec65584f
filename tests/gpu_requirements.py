"""What a GPU test may skip for, and what it must fail for instead.

On a machine with a GPU (where bench/gpu_check.sh has built the CUDA library), a kernel backend that cannot run is
a defect to report, not a reason to skip: a test that skips there would pass the GPU check without checking
anything. The one exception is an optional package that is not installed, named in the skip.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kogpt_fast import backends, cuda_lib


def require_backend(name: str, device: torch.device) -> None:
    """Fail (never skip) when backend `name` cannot run on a CUDA device, unless its package is not installed."""
    reason = backends.unavailable_reason(name, torch.device(device))
    if reason is None:
        return
    if name == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    pytest.fail(f"backend {name!r} cannot run on {device}, which a GPU machine must allow: {reason}")
