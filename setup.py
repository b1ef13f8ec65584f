"""Packaging for kogpt-fast.

`kernels/` (Triton kernels) installs as `kogpt_fast.kernels`: a top-level package named `kernels`
would clash with an existing PyPI package. The embedded demo checkpoint ships as package data.

The CUDA kernels in csrc/ are compiled by nvcc, driven by ninja, into one shared library,
kogpt_fast/_lib/libkogpt_cuda.so, that links neither torch nor libcuda (the CUDA runtime is linked statically):
Python loads it with ctypes (kogpt_fast/cuda_lib.py).

It is built where it can be used or where it is asked for: always in a wheel (`pip wheel .`, `pip install .`), and
in an editable install (`pip install -e .`, what scripts/setup_env.sh runs) only on a machine with a GPU driver or
with KOGPT_BUILD_CUDA=1. The objects stay in build/kogpt_cuda/, so ninja recompiles only the csrc/ files that
changed. Environment:
  KOGPT_SKIP_CUDA=1        build a pure-Python package (also what happens when nvcc is not found)
  KOGPT_BUILD_CUDA=1       build the library in an editable install too (and fail if nvcc is missing)
  KOGPT_CUDA_ARCHS="80;90" SM architectures to compile for (default 75;80;89;90)
  CUDA_HOME                where nvcc lives (default: nvcc on PATH, else /usr/local/cuda)
  KOGPT_BUILD_JOBS         parallel nvcc jobs (default 2)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
LIBRARY = "libkogpt_cuda.so"
DEFAULT_ARCHS = "75;80;89;90"  # Turing (T4), Ampere, Ada, Hopper: nvcc 13 has nothing older
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr"]


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )


def find_ninja() -> str | None:
    try:
        import ninja  # the PyPI package ships the binary

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("KOGPT_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise RuntimeError(f"KOGPT_CUDA_ARCHS={os.environ.get('KOGPT_CUDA_ARCHS')!r}: expected e.g. '80;89;90'")
    return archs


def flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def gpu_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver (where an editable install's library could run)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists() or bool(
        shutil.which("nvidia-smi"))


def write_build_ninja(build_dir: Path, nvcc: str, archs: list[str], output: Path) -> list[str]:
    """One compile edge per csrc/*.cu and one link edge; the library links the CUDA runtime statically.
    Returns the same commands as shell lines (compiles first, the link last) for a machine without ninja."""
    gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs)
    defines = f"'-DKOGPT_ARCHS=\"{';'.join(archs)}\"'"  # quoted: ninja runs the command in a shell
    sources = sorted(CSRC.glob("*.cu"))
    headers = " ".join(str(h) for h in sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")))
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cflags = {' '.join(NVCC_FLAGS)} {gencode} -I{CSRC} {defines}",
        "rule nvcc",
        "  command = $nvcc $cflags -c $in -o $out",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared -cudart static -Xcompiler -fPIC $in -o $out",
        "  description = link $out",
    ]
    objects, commands = [], []
    for src in sources:
        obj = build_dir / (src.stem + ".o")
        objects.append(str(obj))
        lines.append(f"build {obj}: nvcc {src} | {headers}")
        commands.append(f"{nvcc} {' '.join(NVCC_FLAGS)} {gencode} -I{CSRC} {defines} -c {src} -o {obj}")
    lines.append(f"build {output}: link {' '.join(objects)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    return commands + [f"{nvcc} -shared -cudart static -Xcompiler -fPIC {' '.join(objects)} -o {output}"]


def run_without_ninja(commands: list[str], jobs: int) -> None:
    """build.ninja's commands, the compiles `jobs` at a time, then the link (a machine without ninja, e.g. a bare
    GPU machine: a full rebuild each time)."""
    from concurrent.futures import ThreadPoolExecutor

    print("kogpt-fast: ninja not found (pip install ninja for incremental builds): running nvcc directly", flush=True)
    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        for done in pool.map(lambda c: subprocess.run(c, shell=True), commands[:-1]):
            done.check_returncode()
    subprocess.run(commands[-1], shell=True, check=True)


class CUDALibrary(Extension):
    """The csrc/ library: an Extension only so that setuptools builds it and marks the wheel platform-specific."""

    def __init__(self):
        super().__init__("kogpt_fast._lib.libkogpt_cuda", sources=[])


class BuildCUDALibrary(build_ext):
    def get_ext_filename(self, fullname):
        if fullname.split(".")[-1] == "libkogpt_cuda":
            return os.path.join(*fullname.split(".")[:-1], LIBRARY)
        return super().get_ext_filename(fullname)

    def run(self):
        if self.editable_mode and not (flag("KOGPT_BUILD_CUDA") or gpu_driver_present()):
            print("kogpt-fast: editable install on a machine without a GPU driver: the CUDA library is not built "
                  "(it could not run here; KOGPT_BUILD_CUDA=1 builds it)", flush=True)
            self.extensions = [e for e in self.extensions if not isinstance(e, CUDALibrary)]
        super().run()

    def copy_extensions_to_source(self):
        # editable installs copy the library into kogpt_fast/_lib/, which a fresh checkout does not have
        package_dir = self.get_finalized_command("build_py").get_package_dir("kogpt_fast._lib")
        os.makedirs(package_dir, exist_ok=True)
        super().copy_extensions_to_source()

    def build_extension(self, ext):
        if not isinstance(ext, CUDALibrary):
            return super().build_extension(ext)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        # In the source tree, not in build_temp (a new temporary directory for every editable install): ninja keeps
        # its objects and its log there, and recompiles only what changed.
        build_dir = ROOT / "build" / "kogpt_cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = cuda_archs()
        commands = write_build_ninja(build_dir, NVCC, archs, build_dir / LIBRARY)
        jobs = os.environ.get("KOGPT_BUILD_JOBS", "2")
        print(f"kogpt-fast: compiling csrc/ with {NVCC} for sm_{', sm_'.join(archs)} in {build_dir} (only what "
              "changed)", flush=True)
        ninja = find_ninja()
        if ninja is None:
            run_without_ninja(commands, int(jobs))
        else:
            subprocess.run([ninja, "-C", str(build_dir), f"-j{jobs}"], check=True)
        shutil.copy2(build_dir / LIBRARY, output)


NVCC = None if flag("KOGPT_SKIP_CUDA") else find_nvcc()
if NVCC is None and flag("KOGPT_BUILD_CUDA") and not flag("KOGPT_SKIP_CUDA"):
    raise RuntimeError("KOGPT_BUILD_CUDA=1 asks for the CUDA library, but nvcc was not found (CUDA_HOME, PATH, "
                       "/usr/local/cuda/bin)")
if NVCC is None:
    reason = "KOGPT_SKIP_CUDA is set" if flag("KOGPT_SKIP_CUDA") else "nvcc not found"
    print(f"kogpt-fast: {reason}: building a pure-Python package without the CUDA library "
          "(backend='cuda' will be unavailable; torch and triton still work)", file=sys.stderr, flush=True)

setup(
    # every package under kogpt_fast/ (serving included), and kernels/ installed as kogpt_fast.kernels
    packages=[*find_packages(include=["kogpt_fast", "kogpt_fast.*"]), "kogpt_fast.kernels"],
    package_dir={"kogpt_fast": "kogpt_fast", "kogpt_fast.kernels": "kernels"},
    package_data={"kogpt_fast.demo": ["*.json", "*.safetensors", "*.model", "*.md", "*.txt"]},
    ext_modules=[CUDALibrary()] if NVCC else [],
    cmdclass={"build_ext": BuildCUDALibrary} if NVCC else {},
)
