"""CI check of the CUDA library's build, on a machine with nvcc and no GPU (runs on a GPU machine too).

One `pip wheel` (for sm_75 and sm_90, the two ends of setup.py's default range) of a copy of the source tree, then: the wheel holds
kogpt_fast/_lib/libkogpt_cuda.so, the library exports the C ABI, and the wheel installed into a fresh target
directory imports in a subprocess without a GPU and reports the library present and no device/driver.
Also: KOGPT_SKIP_CUDA=1 gives a pure-Python wheel and says so.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kogpt_fast import cuda_lib

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_IN_WHEEL = "kogpt_fast/_lib/libkogpt_cuda.so"
ARCHS = "75;90"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


# Slow (a wheel build and ptxas over every kernel: about 100 s on the 2-core CI machine): CI runs them in its bounded
# `-m slow` step, outside the README's test command.
pytestmark = [pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)"),
              pytest.mark.slow]


def _copy_source(dest: Path) -> Path:
    """The source tree without build outputs, so the build starts clean and leaves the checkout alone."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", ".benchmarks", "bench_out", "_lib", "*.so", "*.whl")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _pip_wheel(src: Path, out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-v", "-w", str(out)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )


def _only_wheel(out: Path) -> Path:
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def cuda_wheel(tmp_path_factory) -> Path:
    src = _copy_source(tmp_path_factory.mktemp("src") / "kogpt-fast")
    out = tmp_path_factory.mktemp("wheel")
    cuda_home = str(Path(_nvcc()).resolve().parent.parent)
    result = _pip_wheel(src, out, KOGPT_SKIP_CUDA="0", KOGPT_CUDA_ARCHS=ARCHS, CUDA_HOME=cuda_home)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return _only_wheel(out)


def test_wheel_holds_the_library(cuda_wheel):
    names = zipfile.ZipFile(cuda_wheel).namelist()
    assert LIBRARY_IN_WHEEL in names
    assert "kogpt_fast/kernels/__init__.py" in names and "kogpt_fast/demo/config.json" in names
    assert "py3-none-any" not in cuda_wheel.name  # a wheel holding a .so is platform-specific


def test_library_exports_the_c_abi(cuda_wheel, tmp_path):
    zipfile.ZipFile(cuda_wheel).extract(LIBRARY_IN_WHEEL, tmp_path)
    lib = ctypes.CDLL(str(tmp_path / LIBRARY_IN_WHEEL))
    from kogpt_fast import cuda_lib

    missing = [name for name in cuda_lib.EXPORTED_SYMBOLS if not hasattr(lib, name)]
    assert not missing
    lib.kogpt_compiled_archs.restype = ctypes.c_char_p
    assert lib.kogpt_compiled_archs().decode() == ARCHS
    assert lib.kogpt_abi_version() == cuda_lib.ABI_VERSION
    # Argument checks run on the host: a distinct code and a message, no GPU needed.
    for name, (restype, argtypes) in cuda_lib._SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    rc = lib.kogpt_gemv(1, 0, 8, 64, None, 64, None, 64, None, None, 0, None, 8, 0, None)
    assert rc == cuda_lib.ERR_INVALID_ARGUMENT and b"M=0" in lib.kogpt_last_error()
    assert lib.kogpt_decode_attention_workspace_size(1, 1, 16, 256, 2048, 64) > 16 * 32 * 256 * 4


PROBE = """
import json, sys
import kogpt_fast
loaded_at_import = any("libkogpt_cuda" in line for line in open("/proc/self/maps"))
from kogpt_fast import cuda_lib
print(json.dumps({"file": kogpt_fast.__file__, "loaded_at_import": loaded_at_import,
                  "status": cuda_lib.status(), "available": cuda_lib.is_available()}))
"""


def test_installed_wheel_reports_library_and_no_gpu(cuda_wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(cuda_wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    env = {**os.environ, "PYTHONPATH": str(target), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("KOGPT_CUDA_LIB", None)
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-4000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(target.resolve())
    assert not report["loaded_at_import"]  # importing kogpt_fast must not load the library
    status = report["status"]
    assert status["present"] and status["loaded"] and status["error"] is None, status
    assert status["library"].startswith(str(target))
    assert status["devices"] == 0 and not status["available"] and not report["available"]
    assert status["device_error"].startswith(("no driver", "no device")), status


def test_skip_flag_builds_a_pure_python_wheel(tmp_path):
    src = _copy_source(tmp_path / "kogpt-fast")
    result = _pip_wheel(src, tmp_path / "wheel", KOGPT_SKIP_CUDA="1")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    wheel = _only_wheel(tmp_path / "wheel")
    assert wheel.name.endswith("py3-none-any.whl")
    assert LIBRARY_IN_WHEEL not in zipfile.ZipFile(wheel).namelist()
    assert "without the CUDA library" in result.stdout + result.stderr
    # every package of the source tree is in the wheel (kogpt_fast.serving was once left out: no `kogpt-fast serve`)
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(ROOT)).replace("kernels", "kogpt_fast/kernels", 1)
                for p in [*ROOT.glob("kogpt_fast/**/__init__.py"), ROOT / "kernels" / "__init__.py"]}
    assert packages >= {"kogpt_fast", "kogpt_fast/serving", "kogpt_fast/kernels"}
    assert {p for p in packages if f"{p}/__init__.py" not in names} == set(), names


def test_every_kernel_fits_turing(tmp_path):
    """sm_75 (T4), the oldest target nvcc 13 has, for the model card's Turing cards: every kernel compiles without
    spills, within Turing's 255 registers a thread and 48 KB of static shared memory a block."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    def ptxas(src: Path) -> str:
        cmd = [_nvcc(), "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-gencode", "arch=compute_75,code=sm_75",
               f"-I{ROOT / 'csrc'}", "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stderr

    with ThreadPoolExecutor(2) as pool:
        report = "".join(pool.map(ptxas, sorted((ROOT / "csrc").glob("*.cu"))))
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_75'", report)
    assert len(entries) >= 40, f"expected every kernel instantiation, found {len(entries)}"
    assert all(int(n) == 0 for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)), report
    assert max(int(n) for n in re.findall(r"Used (\d+) registers", report)) <= 255
    assert max([int(n) for n in re.findall(r"(\d+) bytes smem", report)] or [0]) <= 48 * 1024


# The library's argument checks run on the host before any CUDA call: no GPU needed, so CI checks them on the
# library of the wheel built above (an editable install on a machine without a GPU driver builds none).

@pytest.fixture(scope="module")
def wheel_library(cuda_wheel, tmp_path_factory):
    where = tmp_path_factory.mktemp("lib")
    zipfile.ZipFile(cuda_wheel).extract(LIBRARY_IN_WHEEL, where)
    return cuda_lib.load_library(where / LIBRARY_IN_WHEEL)


def test_library_refuses_bad_gemv_arguments_on_the_host(wheel_library):
    """Argument checks of the GEMV entry points run before any CUDA call: no GPU needed."""
    lib = wheel_library
    assert lib.kogpt_abi_version() == cuda_lib.ABI_VERSION
    for gelu_start in (-1, 9):  # N = 8
        rc = lib.kogpt_gemv_split_gelu(1, 1, 8, 64, 16, 64, 16, 64, None, None, 0, 16, 8, 1, gelu_start, None)
        assert rc == cuda_lib.ERR_INVALID_ARGUMENT and b"gelu_start" in lib.kogpt_last_error()
    rc = lib.kogpt_gemv_split_gelu(1, 17, 8, 64, 16, 64, 16, 64, None, None, 0, 16, 8, 1, 0, None)
    assert rc == cuda_lib.ERR_INVALID_ARGUMENT and b"M=17" in lib.kogpt_last_error()
    # kogpt_gemv_concat(dtype, M, N, K1, K2, x1, x1_stride, x2, x2_stride, weight, ...): sizes and pointers.
    for k1, k2, x2, message in ((-1, 64, 16, b"K1=-1"), (0, 0, 16, b"K1=0 K2=0"), (32, 32, None, b"x2 (with K2 > 0)")):
        rc = lib.kogpt_gemv_concat(1, 1, 8, k1, k2, 16, 64, x2, 64, 16, 64, None, None, 0, 16, 8, 0, 0, None)
        assert rc == cuda_lib.ERR_INVALID_ARGUMENT and message in lib.kogpt_last_error(), lib.kogpt_last_error()
    # kogpt_gemv_ln_split_gelu(dtype, M, N, K, x, x_stride, ln_weight, ln_bias, eps, weight, ...): M <= 2, the
    # LayerNorm parameters present, eps finite and >= 0.
    for m, ln_w, eps, message in ((3, 16, 1e-5, b"M must be in [1, 2]"), (1, None, 1e-5, b"ln_weight and ln_bias"),
                                  (1, 16, -1.0, b"finite eps >= 0"), (1, 16, float("inf"), b"finite eps >= 0")):
        rc = lib.kogpt_gemv_ln_split_gelu(1, m, 8, 64, 16, 64, ln_w, 16, eps, 16, 64, None, None, 0, 16, 8, 1, 0, None)
        assert rc == cuda_lib.ERR_INVALID_ARGUMENT and message in lib.kogpt_last_error(), lib.kogpt_last_error()


def test_library_refuses_bad_decode_attention_arguments_on_the_host(wheel_library):
    """kogpt_decode_attention checks its arguments before any CUDA call: no GPU needed."""
    lib = wheel_library
    h, d, bs = 2, 64, 16
    ptr = 4096  # a 256-byte aligned address, never dereferenced: every call here is refused first

    def call(rotary_dim=32, k=ptr, slots=ptr, partition_size=64, head_dim=d):
        return lib.kogpt_decode_attention(
            1, 1, h, head_dim, ptr, h * head_dim, head_dim, k, h * head_dim, head_dim, ptr, h * head_dim, head_dim,
            ptr, ptr, bs, bs * h * head_dim, h * head_dim, head_dim, slots, ptr, ptr, 32, rotary_dim, ptr, 4, 4,
            ptr, 0.125, partition_size, ptr, h * head_dim, head_dim, ptr, 1 << 20, None)

    for kwargs, code, message in (
        (dict(rotary_dim=0), cuda_lib.ERR_INVALID_ARGUMENT, b"rotary_dim 0"),
        (dict(rotary_dim=33), cuda_lib.ERR_INVALID_ARGUMENT, b"rotary_dim 33"),
        (dict(rotary_dim=66), cuda_lib.ERR_INVALID_ARGUMENT, b"rotary_dim 66"),
        (dict(k=None), cuda_lib.ERR_INVALID_ARGUMENT, b"NULL"),
        (dict(slots=None), cuda_lib.ERR_INVALID_ARGUMENT, b"NULL"),
        (dict(partition_size=48), cuda_lib.ERR_INVALID_ARGUMENT, b"partition_size 48"),
        (dict(head_dim=96), cuda_lib.ERR_UNSUPPORTED, b"head_dim 96"),
    ):
        assert call(**kwargs) == code and message in lib.kogpt_last_error(), (kwargs, lib.kogpt_last_error())


def test_library_refuses_bad_quantized_gemv_arguments_on_the_host(wheel_library):
    """kogpt_gemv_quantized checks its arguments before any CUDA call: no GPU needed."""
    lib = wheel_library
    p = 4096  # an aligned address, never dereferenced: each call is refused first

    def call(dtype=1, fmt=1, m=1, scale=p, ln_w=None):
        # (dtype, weight_format, M, N, K1, K2, x1, x1_stride, x2, x2_stride, ln_weight, ln_bias, eps, weight,
        #  weight_stride, weight_scale, bias, residual, residual_stride, out, out_stride, activation, gelu_start, s)
        return lib.kogpt_gemv_quantized(dtype, fmt, m, 8, 64, 0, p, 64, None, 0, ln_w, ln_w, 1e-5, p, 64, scale,
                                        None, None, 0, p, 8, 0, 0, None)

    for kwargs, code, message in (
        (dict(fmt=0), cuda_lib.ERR_INVALID_ARGUMENT, b"quantized weight format"),
        (dict(scale=None), cuda_lib.ERR_INVALID_ARGUMENT, b"weight_scale"),
        (dict(fmt=7), cuda_lib.ERR_INVALID_ARGUMENT, b"unknown weight format code 7"),
        (dict(dtype=0), cuda_lib.ERR_UNSUPPORTED, b"float16 or bfloat16"),
        (dict(m=3, ln_w=p), cuda_lib.ERR_INVALID_ARGUMENT, b"M must be in [1, 2]"),
    ):
        assert call(**kwargs) == code and message in lib.kogpt_last_error(), lib.kogpt_last_error()
