#!/usr/bin/env bash
# The tests, from a fresh clone: set up .venv with the test extras (transformers as the reference, triton for its
# interpreter, matplotlib for the benchmark's plots, the openai client and the serve extra for the HTTP server), run
# pytest, say how long it took.
# Extra arguments go to pytest, e.g.: scripts/test.sh -k parity. Tests marked slow are left out (CI runs them
# in a step of their own: scripts/test.sh -m slow).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test,bench,serve
# NumPy's threaded BLAS under the Triton interpreter crawls when the cores are shared.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
say "running the tests (4-6 minutes on 2 CPU cores; the slow ones, -m slow, about 2 more)"
start=$SECONDS
status=0
python -m pytest -q -m "not slow" "$@" || status=$?  # a later -m in "$@" wins: scripts/test.sh -m slow
say "the tests took $((SECONDS - start)) s (exit status $status)"
exit "$status"
