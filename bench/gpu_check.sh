#!/usr/bin/env bash
# The one-shot GPU check: build the CUDA library, run the GPU tests and the rest, then the quick benchmarks.
#
#   bench/gpu_check.sh OUTDIR
#
# Designed to finish within 8 minutes on an H100: every phase runs under `timeout`, capped both by its own limit
# and by what is left of GPU_CHECK_BUDGET_S (default 450 s), so a hang costs one phase, not the session.
# Writes to OUTDIR: env.txt, phases.txt, build.log, tests_gpu.log, tests_rest.log, bench.log,
# bench/results.json and bench/*.png (the benchmark writes results.json after every case, so a run cut short keeps
# what it measured), report.log, summary.txt; prints the summary at the end.
# Environment: PYTHON (default python, else python3), GPU_CHECK_BUDGET_S, GPU_CHECK_REST=1 (also the CPU tests),
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
if [ -n "${KOGPT_BUILD_CMD:-}" ]; then
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

# --- tests: the GPU ones. The rest are CI's (a CPU machine runs them on every submission); GPU_CHECK_REST=1 runs
# them here too, beside the GPU tests and with the GPU hidden, as on CI.
if [ "${GPU_CHECK_REST:-0}" = 1 ]; then
    CUDA_VISIBLE_DEVICES="" phase tests_rest 180 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider &
fi
phase tests_gpu 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider
wait

# --- quick benchmarks ------------------------------------------------------------------------------------------
BENCH_LIMIT=$(($(left) - 40))  # keep room for the report and summary
BUDGET=$((BENCH_LIMIT - 60))  # no new case starts after this; the last one may still be compiling
if ((BUDGET > 30)); then
    phase bench "$BENCH_LIMIT" "$PY" bench/run.py --quick --device cuda --out "$OUT/bench" --budget "$BUDGET"
else
    note "bench: skipped, $(left)s left"
fi

# --- report: table and plots from whatever results.json holds (also after a timeout), then the summary --------
if [ -f "$OUT/bench/results.json" ]; then
    timeout 60 "$PY" bench/run.py --report "$OUT/bench/results.json" >"$OUT/report.log" 2>&1 || note "report: failed"
fi
{
    echo "== gpu_check $(date -u +%FT%TZ), $(($(date +%s) - START))s in all"
    head -n 3 "$OUT/env.txt" | tail -n 2
    cat "$OUT/phases.txt"
    for log in tests_gpu tests_rest; do
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
