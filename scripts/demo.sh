#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then run KoGPT's prompt loop on the embedded demo model.
# Extra arguments go to the CLI, e.g.: scripts/demo.sh --model /path/to/kogpt --device cuda
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m kogpt_fast "$@"
