#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then run KoGPT's prompt loop on the embedded demo model.
# Extra arguments go to the CLI, e.g.: scripts/demo.sh --model /path/to/kogpt --device cuda
# The extras argument is given, even empty: a `source` without arguments would hand setup_env.sh this script's own
# arguments (the CLI's), and it would read the first one as the extras to install.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" ""
exec python -m kogpt_fast "$@"
