#!/usr/bin/env bash
# The one-shot GPU check: build the CUDA library, run the acceptance tests, the quick benchmarks, then the other
# GPU tests.
#
#   bench/gpu_check.sh OUTDIR
#
# Designed to finish within 8 minutes on an H100: every phase runs under `timeout`, capped both by its own limit
# and by what is left of GPU_CHECK_BUDGET_S (default 450 s), so a hang costs one phase, not the session.
# Writes to OUTDIR: env.txt, phases.txt, build.log, tests_accept.log, tests_gpu.log, tests_rest.log, bench.log,
# bench/results.json and bench/*.png (the benchmark writes results.json after every case, so a run cut short keeps
# what it measured), report.log, summary.txt; prints the summary at the end.
# Environment: PYTHON (default python, else python3), GPU_CHECK_BUDGET_S, GPU_CHECK_REST=1 (also the CPU tests),
# GPU_CHECK_SYSTEMS (the end-to-end systems, comma-separated), GPU_CHECK_PHASES (default build,accept,bench,tests:
# e.g. build,tests for a second call that runs what a first one had no time for),
# KOGPT_BUILD_CMD (overrides the build command),
# and setup.py's own (KOGPT_CUDA_ARCHS: default this card's; KOGPT_BUILD_JOBS: default every core).
set -u -o pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-$(command -v python || command -v python3)}
TOTAL=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
: > "$OUT/phases.txt"

left() { echo $((TOTAL - ($(date +%s) - START))); }
PHASES=",${GPU_CHECK_PHASES:-build,accept,bench,tests},"
wanted() { [[ $PHASES == *",$1,"* ]]; }
note() { echo "$1" | tee -a "$OUT/phases.txt"; }

# phase NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left), output to OUTDIR/NAME.log.
phase() {
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(left)
    ((limit > cap)) && limit=$cap
    if ((limit < 15)); then
        note "$name: skipped, no time left"
        return 0
    fi
    local t0 rc status
    t0=$(date +%s)
    echo "[$((t0 - START))s] $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        5) status="no tests collected" ;;  # pytest's exit code when a marker selects nothing
        *) status="failed (exit $rc)" ;;
    esac
    note "$name: $status in $(($(date +%s) - t0))s"
}

# --- the machine -----------------------------------------------------------------------------------------------
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    timeout 60 "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
    for pkg in triton transformers matplotlib pytest; do
        timeout 30 "$PY" -c "import importlib.metadata as m; print('$pkg', m.version('$pkg'))" 2>/dev/null || echo "$pkg not installed"
    done
    git rev-parse HEAD 2>/dev/null || echo "git commit unknown (no .git)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- build the CUDA library ------------------------------------------------------------------------------------
if ! wanted build; then
    note "build: not in GPU_CHECK_PHASES"
elif [ -n "${KOGPT_BUILD_CMD:-}" ]; then
    phase build 120 bash -c "$KOGPT_BUILD_CMD"
elif [ ! -d csrc ]; then
    note "build: skipped, no csrc/"
elif ! command -v nvcc >/dev/null; then
    note "build: skipped, nvcc not found"
elif [ -f setup.py ] && grep -q csrc setup.py; then
    # Only this card's architecture, with every core: the full multi-arch build is CI's job.
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    [ -n "$arch" ] && export KOGPT_CUDA_ARCHS=${KOGPT_CUDA_ARCHS:-$arch}
    export KOGPT_BUILD_JOBS=${KOGPT_BUILD_JOBS:-$(nproc)}
    phase build 120 "$PY" setup.py build_ext --inplace
else
    note "build: skipped, setup.py has no CUDA build step yet (set KOGPT_BUILD_CMD to build csrc/)"
fi

# --- tests and benchmarks, in the order the issues need them --------------------------------------------------
# 1. The acceptance tests (greedy parity on the fast path: the KoGPT-6B-shape margin test, the demo checkpoint
#    against HF fp16 eager); 2. the quick benchmarks; 3. the other GPU tests (the op sweeps), with what is left.
# The rest of the tests are CI's (a CPU machine runs them on every submission); GPU_CHECK_REST=1 runs them here
# too, beside the GPU tests and with the GPU hidden, as on CI. --durations: what to trim when a phase runs long.
if [ "${GPU_CHECK_REST:-0}" = 1 ]; then
    CUDA_VISIBLE_DEVICES="" phase tests_rest 180 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider &
fi
ACCEPTANCE="tests/test_fast_path.py tests/test_triton_model.py"
if wanted accept; then
    # shellcheck disable=SC2086
    phase tests_accept 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=10 $ACCEPTANCE
fi

# End to end: the kernel backends and the baselines. kogpt-fast[torch] is the reference (its speed is no target),
# left out here to leave the time to the compiled baseline's compilation; the per-op rows still run it.
SYSTEMS=${GPU_CHECK_SYSTEMS:-"kogpt-fast[cuda],kogpt-fast[triton],kogpt-fast[cuda]+torch-prefill,kogpt-fast[cuda]+int8,kogpt-fast[cuda]+fp8,hf-eager,hf-sdpa,compiled"}
TESTS_RESERVE=$(wanted tests && echo 90 || echo 0)  # seconds the op sweeps keep after the bench
BENCH_LIMIT=$(($(left) - 40 - TESTS_RESERVE))  # and room for the report and summary
((BENCH_LIMIT > 300)) && BENCH_LIMIT=300
BUDGET=$((BENCH_LIMIT - 60))  # no new case starts after this; the last one may still be compiling
if ! wanted bench; then
    note "bench: not in GPU_CHECK_PHASES"
elif ((BUDGET > 30)); then
    phase bench "$BENCH_LIMIT" "$PY" bench/run.py --quick --device cuda --out "$OUT/bench" --budget "$BUDGET" \
        --systems "$SYSTEMS"
else
    note "bench: skipped, $(left)s left"
fi

if wanted tests; then
    phase tests_gpu 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=25 \
        $(for f in $ACCEPTANCE; do printf -- "--ignore=%s " "$f"; done) tests
fi
wait

# --- report: table and plots from whatever results.json holds (also after a timeout), then the summary --------
if [ -f "$OUT/bench/results.json" ]; then
    timeout 60 "$PY" bench/run.py --report "$OUT/bench/results.json" >"$OUT/report.log" 2>&1 || note "report: failed"
fi
{
    echo "== gpu_check $(date -u +%FT%TZ), $(($(date +%s) - START))s in all"
    head -n 3 "$OUT/env.txt" | tail -n 2
    cat "$OUT/phases.txt"
    for log in tests_accept tests_gpu tests_rest; do
        [ -f "$OUT/$log.log" ] && echo "$log: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/$log.log" | tail -n 1)"
    done
    if [ -f "$OUT/bench/results.json" ]; then
        timeout 60 "$PY" bench/run.py --report "$OUT/bench/results.json" --summary 2>&1
    else
        echo "no benchmark results"
    fi
} >"$OUT/summary.txt" 2>&1
echo
cat "$OUT/summary.txt"
