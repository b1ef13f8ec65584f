#!/usr/bin/env bash
# The tests, from a fresh clone: set up .venv with the test extras (transformers as the reference), run pytest.
# Extra arguments go to pytest, e.g.: scripts/test.sh -k parity
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
exec python -m pytest -q "$@"
