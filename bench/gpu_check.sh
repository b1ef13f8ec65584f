#!/usr/bin/env bash
# The one-shot GPU check: build the CUDA library, run the acceptance tests, the quick benchmarks, then the other
# GPU tests, and leave at most 8 files in OUTDIR (the device tool's $OUT brings back 8):
#
#   bash bench/gpu_check.sh OUTDIR       # on the GPU machine: bash bench/gpu_check.sh "$OUT"
#
# OUTDIR gets summary.txt (what passed, what was measured), results.json (the benchmark's figures) and logs.tgz
# (every log, the compile logs, the plots). Exit status: 0 when the build, the library check and the acceptance
# tests passed; 1 otherwise (the other phases are reported in the summary, not in the status).
#
# Time: every phase runs under `timeout`, capped by its own limit and by what is left of GPU_CHECK_BUDGET_S
# (default 450 s); the summary and the bundle take at most 25 s more, so the worst case ends within 480 s.
# Phases and caps:
#   build    90 s  setup.py build_ext --inplace for this card only, every core (about 15 s for sm_90 on 2 cores);
#   library  20 s  the library file exists and loads, with the GPU visible (cuda_lib.status());
#   accept  200 s  two pytest processes side by side (their Triton compiles overlap on two cores): the KoGPT-6B-shape
#                  margin test, and the demo checkpoint's margin tests with the CUDA-graph tests. Counted from the code
#                  paths on a cold Triton cache: about 25 compiles per process (GEMV row buckets x epilogues, tiled
#                  GEMMs, LayerNorm, the attention kernels; the cuda backend reuses the triton backend's prefill
#                  kernels), at up to 8 s each. Each run logs every compile (compiles_*.jsonl, counted in the
#                  summary) so the next run's caps come from measured counts;
#   bench   150 s  bench/run.py --quick (the kernel backends, HF eager, compiled PyTorch), no new case after 110 s;
#   tests   what is left (at least 15 s): the other `pytest -m gpu` tests (the op sweeps).
# Environment: PYTHON (default python3, else python), GPU_CHECK_BUDGET_S, GPU_CHECK_PHASES (default
# build,accept,bench,tests; e.g. tests alone for a second call), GPU_CHECK_SYSTEMS (the end-to-end systems),
# KOGPT_BUILD_CMD (overrides the build), and setup.py's own (KOGPT_CUDA_ARCHS: default this card's).
set -u -o pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # logs and the benchmark's own files: bundled at the end
cd "$REPO"
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
FAILED=0
: >"$WORK/phases.txt"

left() { echo $((TOTAL - ($(date +%s) - START))); }
PHASES=",${GPU_CHECK_PHASES:-build,accept,bench,tests},"
wanted() { [[ $PHASES == *",$1,"* ]]; }
note() { echo "$1" | tee -a "$WORK/phases.txt"; }

# phase NAME CAP CMD...: run CMD under a timeout of min(CAP, time left), output to WORK/NAME.log; its status in
# WORK/NAME.rc (also for phases run in the background).
phase() {
    local name=$1 cap=$2
    shift 2
    local limit rc status t0
    limit=$(($(left) - 5))  # timeout's 5 s of grace before its kill stay inside the budget
    ((limit > cap)) && limit=$cap
    if ((limit < 15)); then
        note "$name: skipped, no time left"
        echo 125 >"$WORK/$name.rc"
        return 125
    fi
    t0=$(date +%s)
    echo "[$((t0 - START))s] $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        5) status="no tests collected" ;;  # pytest's exit code when a marker selects nothing
        *) status="failed (exit $rc)" ;;
    esac
    note "$name: $status in $(($(date +%s) - t0))s"
    echo "$rc" >"$WORK/$name.rc"
    return "$rc"
}

# nvcc where setup.py's find_nvcc looks: $CUDA_HOME (or $CUDA_PATH)/bin, PATH, /usr/local/cuda/bin.
find_nvcc() {
    local home=${CUDA_HOME:-${CUDA_PATH:-}}
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then echo "$home/bin/nvcc"
    elif command -v nvcc >/dev/null; then command -v nvcc
    elif [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc
    fi
}
NVCC=$(find_nvcc)
[ -n "$NVCC" ] && export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}

# --- the machine -----------------------------------------------------------------------------------------------
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv 2>&1 \
        || echo "nvidia-smi failed"
    if [ -n "$NVCC" ]; then echo "nvcc $NVCC: $("$NVCC" --version | tail -n 1)"; else echo "nvcc not found"; fi
    echo "cpus $(nproc)"
    timeout 30 "$PY" -c '
import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for pkg in ("triton", "transformers", "hypothesis", "matplotlib", "pytest", "ninja", "setuptools"):
    try:
        print(pkg, m.version(pkg))
    except m.PackageNotFoundError:
        print(pkg, "not installed")' 2>&1
    echo "commit ${KOGPT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

# --- build the CUDA library, and check that it loads -----------------------------------------------------------
if wanted build; then
    if [ -n "${KOGPT_BUILD_CMD:-}" ]; then
        phase build 90 bash -c "$KOGPT_BUILD_CMD"
    elif [ -z "$NVCC" ]; then
        note "build: FAILED, nvcc not found (\$CUDA_HOME/bin, PATH, /usr/local/cuda/bin)"
        FAILED=1
    else
        arch=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
        [ -n "$arch" ] && export KOGPT_CUDA_ARCHS=${KOGPT_CUDA_ARCHS:-$arch}
        export KOGPT_BUILD_JOBS=${KOGPT_BUILD_JOBS:-$(nproc)}
        KOGPT_SKIP_CUDA=0 phase build 90 "$PY" setup.py build_ext --inplace || FAILED=1
    fi
fi
# Whatever built it (this run or an earlier one): the file must exist and load with the GPU visible.
phase library 20 "$PY" -c '
import json, sys
from kogpt_fast import cuda_lib
status = cuda_lib.status()
print(json.dumps(status, indent=1))
sys.exit(0 if status["present"] and status["loaded"] and status["available"] else 1)' || FAILED=1
head -c 600 "$WORK/library.log"; echo

# --- the acceptance tests: greedy parity of the fast path under the margin rule, CUDA-graph bookkeeping --------
# -s: the margin reports they print (steps under the rule, largest logit difference) go to the log.
PYTEST=("$PY" -m pytest -q -s -m gpu -p no:cacheprovider --durations=10)
if wanted accept; then
    KOGPT_COMPILE_LOG="$WORK/compiles_accept_6b.jsonl" phase accept_6b 200 "${PYTEST[@]}" tests/test_fast_path.py &
    KOGPT_COMPILE_LOG="$WORK/compiles_accept_demo.jsonl" phase accept_demo 200 "${PYTEST[@]}" \
        tests/test_triton_model.py tests/test_decode_step.py &
    wait
    for name in accept_6b accept_demo; do
        [ "$(cat "$WORK/$name.rc" 2>/dev/null)" = 0 ] || FAILED=1
    done
fi

# --- the quick benchmarks ---------------------------------------------------------------------------------------
# End to end: the kernel backends and the baselines; kogpt-fast[torch] is the reference (its speed is no target).
SYSTEMS=${GPU_CHECK_SYSTEMS:-"kogpt-fast[cuda],kogpt-fast[triton],hf-eager,compiled,kogpt-fast[cuda]+torch-prefill,hf-sdpa,kogpt-fast[cuda]+int8,kogpt-fast[cuda]+fp8"}
if wanted bench; then
    BENCH_LIMIT=$(($(left) - 15))  # the op sweeps keep at least 15 s
    ((BENCH_LIMIT > 150)) && BENCH_LIMIT=150
    if ((BENCH_LIMIT > 60)); then
        phase bench "$BENCH_LIMIT" "$PY" bench/run.py --quick --device cuda --out "$WORK/bench" \
            --budget $((BENCH_LIMIT - 40)) --systems "$SYSTEMS"
    else
        note "bench: skipped, $(left)s left"
    fi
fi

# --- the other GPU tests (the op sweeps), with what is left ----------------------------------------------------
if wanted tests; then
    KOGPT_COMPILE_LOG="$WORK/compiles_tests_gpu.jsonl" phase tests_gpu 600 "$PY" -m pytest -q -m gpu \
        -p no:cacheprovider --durations=25 --ignore=tests/test_fast_path.py --ignore=tests/test_triton_model.py \
        --ignore=tests/test_decode_step.py tests
fi

# --- summary, results.json and the bundle: at most 25 s -------------------------------------------------------
RESULTS="$WORK/bench/results.json"
{
    echo "== gpu_check $(date -u +%FT%TZ), $(($(date +%s) - START))s in all, exit status $FAILED"
    sed -n 2,3p "$WORK/env.txt"
    cat "$WORK/phases.txt"
    for log in accept_6b accept_demo tests_gpu; do
        [ -f "$WORK/$log.log" ] && echo "$log: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$WORK/$log.log" | tail -n 1)"
    done
    grep -h "^margin rule" "$WORK"/accept_*.log 2>/dev/null
    grep -h -E "^(FAILED|ERROR) " "$WORK"/accept_*.log "$WORK"/tests_gpu.log 2>/dev/null | head -n 40
    for log in "$WORK"/compiles_*.jsonl; do
        [ -f "$log" ] && timeout 5 "$PY" -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
secs = [r["seconds"] for r in rows if r["seconds"] is not None]
print(f"{sys.argv[1].rsplit(\"/\", 1)[-1]}: {len(rows)} Triton compiles, {sum(secs):.0f} s in all, longest {max(secs, default=0):.1f} s")' "$log"
    done
    if [ -f "$RESULTS" ]; then
        timeout 10 "$PY" bench/run.py --report "$RESULTS" --summary 2>&1
    else
        echo "no benchmark results"
    fi
} >"$OUT/summary.txt" 2>&1
[ -f "$RESULTS" ] && cp "$RESULTS" "$OUT/results.json"
[ -f "$RESULTS" ] && timeout 10 "$PY" bench/run.py --report "$RESULTS" >"$WORK/report.log" 2>&1  # table + plots
cp "$OUT/summary.txt" "$WORK/"
tar czf "$OUT/logs.tgz" -C "$(dirname "$WORK")" "$(basename "$WORK")"
echo
cat "$OUT/summary.txt"
exit "$FAILED"
