# Sourced by demo.sh and test.sh: a virtual environment in .venv with kogpt-fast installed (editable).
# Usage: source scripts/setup_env.sh [EXTRAS]   e.g. "test"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build where a CPU one is enough.
# On a GPU machine, install the CUDA build of torch into .venv before running this script.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".${1:+[$1]}"
