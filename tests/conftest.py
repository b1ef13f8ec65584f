import os
import sys

# The tests import their helpers (hf_reference, ...) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

# The Triton GEMV measures its tiles on the card at the first call of each shape (kernels/gemm.py). The tests run
# hundreds of shapes, each tuning would compile and time every candidate: they use the default tiles, and the
# tuner has its own tests (tests/test_gemm.py), which turn it on.
os.environ.setdefault("KOGPT_GEMV_TUNE", "0")


def pytest_configure(config):
    """KOGPT_COMPILE_LOG=FILE (bench/gpu_check.sh sets it): one JSON line per Triton compile (from source or the
    on-disk cache) with its kernel, the test that caused it and its seconds, so the check's time caps can be set
    from measured compile counts."""
    path = os.environ.get("KOGPT_COMPILE_LOG")
    if path:
        _log_triton_compiles(path)


_current_test = {"id": None}


def pytest_runtest_setup(item):
    _current_test["id"] = item.nodeid


def _log_triton_compiles(path: str) -> None:
    import json
    import time
    import warnings

    try:
        from triton import knobs
    except Exception as e:  # no Triton, or one without the hooks: nothing to log
        warnings.warn(f"KOGPT_COMPILE_LOG: cannot hook Triton's compiles ({type(e).__name__}: {e})")
        return
    started = {}

    def before(*args, **kwargs):
        started[str(kwargs.get("key"))] = time.perf_counter()
        return None  # never skip the compile

    def after(*args, **kwargs):
        fn = kwargs.get("fn")
        t0 = started.pop(str(kwargs.get("key")), None)
        record = {"kernel": getattr(fn, "name", str(fn)), "test": _current_test["id"],
                  "seconds": None if t0 is None else round(time.perf_counter() - t0, 3)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return None

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after
