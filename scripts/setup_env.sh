# Sourced by demo.sh and test.sh: a virtual environment in .venv with kogpt-fast installed (editable).
# Usage: source scripts/setup_env.sh [EXTRAS]   e.g. "test,bench"
#
# The install runs only when something it depends on changed: .venv/.kogpt-fast-installed records a digest of
# pyproject.toml, setup.py, csrc/ and the CUDA choice, and the extras installed; a later run that asks for no new
# extras and finds the same digest installs nothing (the package is editable: Python changes need no reinstall).
# setup.py compiles the CUDA library only where it can run or is asked for (a GPU driver, or KOGPT_BUILD_CUDA=1),
# and then ninja recompiles only the csrc/ files that changed (build/kogpt_cuda/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { echo "kogpt-fast: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
    say "first run: creating .venv and installing torch ${TORCH_VERSION:-2.13.0} and the dependencies (a few minutes)"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# What setup.py will do about the CUDA library (it decides by the same rule; this only says so, and a change of it
# means a new install).
if [ -n "${KOGPT_SKIP_CUDA:-}" ] && [ "${KOGPT_SKIP_CUDA}" != 0 ]; then
    cuda="no CUDA library (KOGPT_SKIP_CUDA is set)"
elif [ -n "${KOGPT_BUILD_CUDA:-}" ] && [ "${KOGPT_BUILD_CUDA}" != 0 ]; then
    cuda="the CUDA library too (KOGPT_BUILD_CUDA=1; about 2 minutes the first time, then only what changed)"
elif [ -e /proc/driver/nvidia/version ] || [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null; then
    cuda="the CUDA library too (a GPU driver is here; about 2 minutes the first time, then only what changed)"
else
    cuda="no CUDA library (no GPU driver here; KOGPT_BUILD_CUDA=1 builds it)"
fi

stamp=.venv/.kogpt-fast-installed
digest=$( (cat pyproject.toml setup.py csrc/* 2>/dev/null; echo "$cuda") | sha256sum | cut -d' ' -f1)
asked=$(echo "${1:-}" | tr ',' '\n' | sed '/^$/d' | sort -u)
installed=$( [ -f "$stamp" ] && tail -n +2 "$stamp" || true)  # the extras installed last time: kept
missing=$(comm -23 <(echo "$asked" | sed '/^$/d') <(echo "$installed" | sed '/^$/d'))
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$digest" ] && [ -z "$missing" ] \
        && python -c "import kogpt_fast" 2>/dev/null; then
    return 0 2>/dev/null || exit 0  # up to date: nothing to install or compile
fi

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build where a CPU one is enough.
# On a GPU machine, install the CUDA build of torch into .venv before running this script.
if ! python -c "import torch" 2>/dev/null; then
    say "installing torch ${TORCH_VERSION:-2.13.0} (the CPU build; for a GPU, install a CUDA torch into .venv first)"
    python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
extras=$(printf '%s\n%s\n' "$asked" "$installed" | sed '/^$/d' | sort -u | paste -sd, -)
say "installing kogpt-fast (editable${extras:+, with $extras}) and its dependencies; $cuda"
python -m pip install -q -e ".${extras:+[$extras]}"
printf '%s\n%s\n' "$digest" "$extras" | tr ',' '\n' > "$stamp"
