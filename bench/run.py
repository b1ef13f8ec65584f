"""Benchmark kogpt-fast: each op on every backend that runs on the device, and end-to-end generation.

    python bench/run.py                       # full suite on the GPU (KoGPT-6B shapes, random fp16 weights)
    python bench/run.py --quick --out DIR     # a small subset (what bench/gpu_check.sh runs)
    python bench/run.py --model PATH          # a real GPT-J checkpoint directory instead of random weights
    python bench/run.py --quick --device cpu  # tiny shapes on the CPU: a smoke test of the machinery, seconds
    python bench/run.py --report DIR/results.json   # table and plots of an earlier run, nothing measured
    python bench/run.py --suites serving      # the serving benchmark (bench/serving.py) into results.json

Writes DIR/results.json (device, driver, versions, git commit, the peaks measured in this run, every figure with
its unit and its baseline), PNG plots when matplotlib is installed, and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/run.py` from a checkout, installed or not

import torch  # noqa: E402

from bench import e2e, ops, plots, report  # noqa: E402
from bench.timing import Timer, measure_peaks  # noqa: E402
from kogpt_fast import backends  # noqa: E402
from kogpt_fast.config import GPTJConfig  # noqa: E402

# The CPU smoke test's model: KoGPT's layout at toy size (head_dim 64, rotary on a quarter of it).
TINY = GPTJConfig(vocab_size=512, n_positions=256, n_embd=128, n_layer=2, n_head=2, rotary_dim=16, n_inner=512)
EPILOG = """\
baselines: cuBLAS (F.linear, + a separate GELU for fc_in), SDPA (flash) and index_copy_ per op; HF transformers
  GPTJForCausalLM (eager, sdpa) and a compiled-PyTorch GPT-J (bench/compiled_baseline.py) end to end.
per op: the median time of cold-input runs (CUDA events; perf_counter on the CPU), TB/s, TFLOP/s, and the
  fraction of the copy bandwidth, of the matmul peak and of the roofline, all measured in the same run.
end to end: time to first token (batch 1, prompt 128 and 2047), decode ms/token (batch 1, prompt 32, 128 new
  tokens, also with --quick), tokens/s (batch 16 and 64, prompt 128, 64 new); --quick runs fewer. See
  bench/README.md.
"""
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available. cpu runs tiny shapes and a tiny GPT-J (a smoke test)")
    p.add_argument("--quick", action="store_true", help="a small subset of the shapes and cases")
    p.add_argument("--out", type=Path, default=REPO / "bench_out", help="output directory (default bench_out/)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a HF GPT-J checkpoint directory (default: random weights of KoGPT-6B's shape, or of the "
                   "tiny model on the CPU; nothing is downloaded)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float16 on cuda, float32 on cpu")
    p.add_argument("--suites", default="ops,e2e",
                   help="comma-separated: ops, e2e, serving (default ops,e2e; serving runs bench/serving.py with "
                   "its defaults for the device, --quick, --model and --dtype passed on)")
    p.add_argument("--backends", default=None,
                   help="comma-separated kogpt-fast backends to run (default: every one kogpt_fast.backends can run "
                   "on the device)")
    p.add_argument("--systems", default=None,
                   help="comma-separated end-to-end systems: kogpt, hf-eager, hf-sdpa, compiled, or a full name "
                   "such as kogpt-fast[triton] (default all)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the compiled baseline without torch.compile (always so on the CPU)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (ops get the first 35%% when both suites run); "
                   "what ran is kept")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report", type=Path, default=None, metavar="RESULTS_JSON",
                   help="measure nothing: print the table of an earlier results.json and (re)make its plots")
    p.add_argument("--summary", action="store_true", help="with --report: print the compact summary instead")
    return p.parse_args(argv)


def runnable_backends(device: torch.device, only: list[str] | None) -> tuple[dict, dict]:
    """({name: ops module} that run on the device, {name: {"runnable", "reason"}} for every backend)."""
    modules, status = {}, {}
    for name in backends.BACKENDS:
        if name == "auto" or (only is not None and name not in only):
            continue
        try:
            modules[name] = backends.get_ops(name, device)
            status[name] = {"runnable": True, "reason": None}
        except Exception as e:  # BackendUnavailable, or a kernel package that fails to import
            status[name] = {"runnable": False, "reason": f"{type(e).__name__}: {e}"}
    return modules, status


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str]) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device), "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"), "transformers": _version("transformers"), "matplotlib": _version("matplotlib"),
        "kogpt_fast": _version("kogpt-fast"),
        # A copy of the tree without .git (a GPU machine) can be told its commit.
        "git_commit": _command(["git", "rev-parse", "HEAD"]) or os.environ.get("KOGPT_GIT_COMMIT"),
        "git_dirty": None, "device_name": platform.processor() or platform.machine(), "driver": None,
    }
    status = _command(["git", "status", "--porcelain", "--untracked-files=no"])
    env["git_dirty"] = None if status is None else bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
        smi = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                        str(device.index or 0)])
        env["driver"] = smi.splitlines()[0] if smi else None
    return env


def run_ops(results, config, device, dtype, impls, timer, peaks, quick, deadline) -> None:
    for case in ops.all_cases(config, ops.shapes_for(device, quick), device, dtype):
        if deadline is not None and time.monotonic() > deadline:
            results.add("ops", {"op": case.op, "name": case.name, "label": case.label, "params": case.params,
                                "impl": "*", "is_baseline": False, "skipped": "time budget exhausted"})
            continue
        for record in ops.run_case(case, impls, timer, peaks):
            results.add("ops", record)
        print(f"  ops: {case.label}", flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the end-to-end models need the memory


def run_e2e(results, model_path, config, device, dtype, backend_names, systems, compile_, quick, runs,
            deadline, peaks=None) -> None:
    if model_path:
        config, weights = e2e.checkpoint_weights(model_path, device, dtype)
    else:
        weights = e2e.random_weights(config, device, dtype)
    specs = e2e.system_specs(config, weights, backend_names, systems, compile_)

    def on_record(record):
        results.add("e2e", record)
        if "value" in record:
            print(f"  e2e: {record['system']} {record['metric']} {record['params']}: "
                  f"{record['value']:.4g} {record['unit']}", flush=True)

    results.data["e2e_info"] = e2e.run(config, weights, specs, e2e.e2e_cases(config, device, quick), runs,
                                       deadline, on_record)
    e2e.attach_baselines(results.data["e2e"])
    gemm = sys.modules.get("kogpt_fast.kernels.gemm")  # the Triton GEMV's tiles, tuned on this card as it ran
    results.data["e2e_info"]["gemv_tuned"] = gemm.tuned_configs() if gemm is not None else None
    results.data["e2e_info"]["floor"] = e2e.attach_floor(results.data["e2e"], weights,
                                                         peaks.copy_bytes_per_s if peaks else None)
    results.save()


def _finish(results: report.Results, out: Path, make_plots: bool) -> None:
    if make_plots:
        results.data["plots"] = plots.make_plots(results.data, out)
    else:
        results.data["plots"] = {"skipped": "--no-plots"}
    results.data["finished"] = True
    results.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        data = json.loads(args.report.read_text(encoding="utf-8"))
        if args.summary:
            print(report.summary(data))
            return 0
        if not args.no_plots:
            data["plots"] = plots.make_plots(data, args.report.parent)
        print(report.full_report(data))
        return 0

    start = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (use --device cpu for the smoke test)",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu":
        # The smoke test's tiny ops gain nothing from threads, and on a shared machine (CI) OpenMP threads that
        # wait for busy cores turn milliseconds into hundreds of them.
        torch.set_num_threads(1)
    suites = {s.strip() for s in args.suites.split(",") if s.strip()}
    unknown = suites - {"ops", "e2e", "serving"}
    if unknown:
        print(f"error: unknown suites {sorted(unknown)} (ops, e2e, serving)", file=sys.stderr)
        return 2
    only = [b.strip() for b in args.backends.split(",")] if args.backends else None
    systems = {s.strip() for s in args.systems.split(",")} if args.systems else None
    compile_ = device.type == "cuda" and not args.no_compile

    if args.model:
        config = GPTJConfig.from_json_file(Path(args.model) / "config.json")
    else:
        config = GPTJConfig() if device.type == "cuda" else TINY  # GPTJConfig() is KoGPT-6B's geometry
    impls, status = runnable_backends(device, only)
    args.out.mkdir(parents=True, exist_ok=True)
    results = report.Results(args.out, {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "env": environment(device),
        "settings": {"quick": args.quick, "dtype": str(dtype).removeprefix("torch."), "suites": sorted(suites),
                     "model": args.model or ("random weights, KoGPT-6B shape" if device.type == "cuda"
                                             else "random weights, tiny GPT-J"),
                     "config": config.to_dict(), "torch_compile": compile_, "budget_s": args.budget,
                     "cpu_threads": torch.get_num_threads()},
        "backends": status,
    })
    results.save()
    print("\n".join(report.header_lines(results.data)), flush=True)

    timer = Timer(device, budget_s=0.25 if device.type == "cuda" else 0.02,
                  min_samples=20 if device.type == "cuda" else 7)
    if args.quick and device.type == "cuda":
        timer.budget_s = 0.1
    peaks = measure_peaks(timer, dtype)
    results.data["peaks"] = peaks.to_json()
    results.save()
    print("\n".join(report.header_lines(results.data)[1:2]), flush=True)

    deadline = None if args.budget is None else start + args.budget
    if "ops" in suites:
        ops_deadline = start + 0.35 * args.budget if deadline is not None and "e2e" in suites else deadline
        run_ops(results, config, device, dtype, impls, timer, peaks, args.quick, ops_deadline)
    if "e2e" in suites:
        runs = 2 if (args.quick or device.type != "cuda") else 3
        run_e2e(results, args.model, config, device, dtype, list(impls), systems, compile_, args.quick, runs,
                deadline, peaks)
    if "serving" in suites:
        from bench import serving

        argv = ["--device", device.type, "--dtype", str(dtype).removeprefix("torch.")]
        argv += (["--model", args.model] if args.model else []) + (["--quick"] if args.quick else [])
        results.data["serving"] = serving.run(serving.parse_args(argv))
        results.save()
    results.data["elapsed_s"] = time.monotonic() - start
    _finish(results, args.out, not args.no_plots)
    print()
    print(report.full_report(results.data))
    print(f"\nresults: {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
