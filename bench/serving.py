"""Serving benchmark: the engine (continuous batching) against the same requests run one by one through generate(),
and as static batches of the same size, in one run; on a GPU also HF transformers' batched generate() and the
compiled-PyTorch baseline as static batches.

    python bench/serving.py --device cpu                      # the demo model: 32 requests, 16 at a time
    python bench/serving.py --device cpu --rates inf,8        # also Poisson arrivals at 8 requests/s
    python bench/serving.py --device cuda --model PATH        # 128 in / 128 out, 1024 requests, 256 at a time
    python bench/serving.py --quick --device cpu --out DIR    # a smoke test, seconds

Requests: prompt and output lengths drawn from a seeded distribution (fixed, or uniform in [len/2, 3 len/2]),
random prompt ids, greedy, exactly the drawn number of new tokens each (eos suppressed as min_new_tokens does);
they arrive all at once (rate inf) or as a Poisson process at the given rate. Every system gets the same requests.
Reported per system and rate: output tokens/s (new tokens / time from the first arrival to the last token), time to
first token and inter-token latency (p50, p99, ms; measured from each request's arrival, queueing included), and
the peak KV blocks in use. A static batch starts when its last request has arrived and the previous batch has
finished, runs until its longest request ends, and counts only each row's own tokens.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/serving.py` from a checkout, installed or not

import torch  # noqa: E402

from kogpt_fast.serving import Engine, SamplingParams  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- the requests ----

@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after the start

    def __len__(self) -> int:
        return len(self.prompts)


def make_workload(n: int, vocab: int, input_len: int, output_len: int, dist: str, rate: float, seed: int,
                  n_positions: int) -> Workload:
    g = torch.Generator().manual_seed(seed)

    def draw(mean: int) -> list[int]:
        if dist == "fixed":
            return [mean] * n
        return torch.randint(max(1, mean // 2), mean + mean // 2 + 1, (n,), generator=g).tolist()

    inputs, outputs = draw(input_len), draw(output_len)
    outputs = [max(1, min(o, n_positions + 1 - i)) for i, o in zip(inputs, outputs)]  # fits the model
    prompts = [torch.randint(2, vocab, (i,), generator=g).tolist() for i in inputs]
    if rate == float("inf"):
        arrivals = [0.0] * n
    else:
        gaps = torch.empty(n).exponential_(rate, generator=g).tolist()  # Poisson arrivals, the first at 0
        arrivals = list(itertools.accumulate(gaps[:-1], initial=0.0))
    return Workload(prompts, outputs, arrivals)


# ---- measuring ----

@dataclass
class Timing:
    arrival: float
    token_times: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(system: str, rate: float, timings: list[Timing], start: float, blocks_peak: int | None,
              note: str | None = None) -> dict:
    tokens = sum(len(t.token_times) for t in timings)
    end = max((t.token_times[-1] for t in timings if t.token_times), default=start)
    ttft = [1e3 * (t.token_times[0] - t.arrival) for t in timings if t.token_times]
    itl = [1e3 * (b - a) for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    streamed = all(len(set(t.token_times)) == len(t.token_times) for t in timings)  # per-token times known
    return {
        "system": system, "rate": "inf" if rate == float("inf") else rate, "requests": len(timings),
        "output_tokens": tokens, "elapsed_s": end - start,
        "output_tokens_per_s": tokens / (end - start) if end > start else None,
        "ttft_ms_p50": percentile(ttft, 50) if streamed else None,
        "ttft_ms_p99": percentile(ttft, 99) if streamed else None,
        "itl_ms_p50": percentile(itl, 50) if streamed else None,
        "itl_ms_p99": percentile(itl, 99) if streamed else None,
        "kv_blocks_peak": blocks_peak, "note": note,
    }


def wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimingStreamer:
    """generate()'s streamer: the time of each step's tokens (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())  # put() receives tokens.cpu(): the step is done
        self._prompt_seen = True

    def end(self):
        pass


# ---- systems ----

def run_engine(model, work: Workload, concurrency: int, max_batch_tokens: int, rate: float) -> dict:
    engine = Engine(model, max_running=concurrency, max_batch_tokens=max_batch_tokens, max_waiting=len(work) + 1)
    pending, requests, peak = deque(range(len(work))), [None] * len(work), 0
    start = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter()
        while pending and start + work.arrivals[pending[0]] <= now:
            i = pending.popleft()
            n = work.output_lens[i]
            requests[i] = engine.add_request(work.prompts[i], SamplingParams(max_new_tokens=n, min_new_tokens=n))
            requests[i].arrival_time = start + work.arrivals[i]
        if engine.has_work():
            engine.step()
            peak = max(peak, engine.blocks.num_used)
        elif pending:
            wait_until(start + work.arrivals[pending[0]])
    timings = [Timing(r.arrival_time, r.token_times) for r in requests]
    stats = engine.stats()
    result = summarize("engine", rate, timings, start, peak)
    result.update(preemptions=stats.preemptions, steps=stats.steps, prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
                  kv_blocks_total=stats.blocks_total)
    return result


def blocks_for(model, tokens: int) -> int:
    return -(-tokens // model.kv_block_size)


@torch.inference_mode()
def run_one_by_one(model, work: Workload, rate: float) -> dict:
    timings, peak = [], 0
    start = time.perf_counter()
    for prompt, n, arrival in zip(work.prompts, work.output_lens, work.arrivals):
        wait_until(start + arrival)
        streamer = TimingStreamer()
        model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=n, min_new_tokens=n,
                       streamer=streamer)
        timings.append(Timing(start + arrival, streamer.times))
        peak = max(peak, blocks_for(model, len(prompt) + n))
    return summarize("generate-one-by-one", rate, timings, start, peak)


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def batches(work: Workload, size: int):
    for lo in range(0, len(work), size):
        yield list(range(lo, min(lo + size, len(work))))


@torch.inference_mode()
def run_static(model, work: Workload, batch: int, rate: float) -> dict:
    """generate() over static batches: each row streams its own tokens, the batch runs until its longest ends."""
    pad = model.config.eos_token_ids[0] if model.config.eos_token_ids else 0
    timings, peak = [], 0
    start = time.perf_counter()
    for rows in batches(work, batch):
        wait_until(start + max(work.arrivals[i] for i in rows))
        n = max(work.output_lens[i] for i in rows)
        ids, mask = left_padded([work.prompts[i] for i in rows], pad, model.device)
        streamer = TimingStreamer()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                       streamer=streamer)
        timings += [Timing(start + work.arrivals[i], streamer.times[:work.output_lens[i]]) for i in rows]
        peak = max(peak, sum(blocks_for(model, len(work.prompts[i]) + n) for i in rows))
    return summarize(f"generate-static-batch-{batch}", rate, timings, start, peak)


@torch.inference_mode()
def run_baseline_static(system, work: Workload, batch: int, rate: float, device) -> dict:
    """An e2e baseline (HF transformers, compiled PyTorch) over static batches of equal-length prompts. It does not
    stream: each row's tokens are all timed at its batch's end, so only throughput is reported."""
    timings = []
    start = time.perf_counter()
    for rows in batches(work, batch):
        wait_until(start + max(work.arrivals[i] for i in rows))
        n = max(work.output_lens[i] for i in rows)
        system.generate(torch.tensor([work.prompts[i] for i in rows], device=device), n)
        sync(device)
        done = time.perf_counter()
        timings += [Timing(start + work.arrivals[i], [done] * work.output_lens[i]) for i in rows]
    system.release()
    return summarize(f"{system.name}-static-batch-{batch}", rate, timings, start, None,
                     note="no streaming: throughput only")


# ---- the run ----

def load_model(args, device, dtype):
    from kogpt_fast import KoGPTForCausalLM

    if args.model is not None or device.type == "cpu":
        return KoGPTForCausalLM.from_pretrained(args.model, device=device, dtype=dtype, backend=args.backend)
    from bench.e2e import random_weights
    from kogpt_fast.config import GPTJConfig

    config = GPTJConfig()  # KoGPT-6B's geometry, random fp16 weights made on the device
    return KoGPTForCausalLM.from_state_dict(config, random_weights(config, device, dtype), backend=args.backend)


def baseline_systems(model, names: set[str], compile_: bool):
    from bench.e2e import CompiledSystem, HFSystem

    weights = {name: p.data for name, p in model.named_parameters()}
    weights.setdefault("lm_head.weight", weights["transformer.wte.weight"])
    if "hf" in names:
        yield lambda: HFSystem(model.config, weights, "eager")
    if "compiled" in names:
        yield lambda: CompiledSystem(model.config, weights, compile_)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/serving.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a GPT-J checkpoint directory (default: the demo model on the CPU, random KoGPT-6B-shaped "
                   "fp16 weights on a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float16 on cuda, float32 on cpu")
    p.add_argument("--backend", default="auto", help="kogpt-fast backend (default auto)")
    p.add_argument("--num-requests", type=int, default=None, help="default 32 (cpu), 1024 (cuda)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="the engine's max_running and the static batch size (default 16 cpu, 256 cuda)")
    p.add_argument("--input-len", type=int, default=None, help="mean prompt length (default 64 cpu, 128 cuda)")
    p.add_argument("--output-len", type=int, default=None, help="mean output length (default 32 cpu, 128 cuda)")
    p.add_argument("--length-dist", choices=["uniform", "fixed"], default=None,
                   help="uniform in [len/2, 3 len/2] (default on cpu) or fixed (default on cuda)")
    p.add_argument("--rates", default="inf", help="comma-separated arrival rates, requests/s; inf: all at once")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="the engine's token budget per step "
                   "(default 256 cpu, 4096 cuda)")
    p.add_argument("--systems", default=None,
                   help="comma-separated: engine, one-by-one, static, hf, compiled (default: the first three; "
                   "on cuda all five)")
    p.add_argument("--no-compile", action="store_true", help="the compiled baseline without torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8 small requests: a smoke test")
    p.add_argument("--out", type=Path, default=None, help="write DIR/serving.json")
    return p.parse_args(argv)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if gpu else torch.float32)
    if not gpu:
        torch.set_num_threads(1)  # on a shared CPU, waiting OpenMP threads cost more than they give (bench/run.py)
    quick = args.quick
    n = args.num_requests or (8 if quick else 1024 if gpu else 32)
    concurrency = args.concurrency or (4 if quick else 256 if gpu else 16)
    input_len = args.input_len or (16 if quick else 128 if gpu else 64)
    output_len = args.output_len or (8 if quick else 128 if gpu else 32)
    dist = args.length_dist or ("fixed" if gpu else "uniform")
    max_batch_tokens = args.max_batch_tokens or (4096 if gpu else 256)
    systems = set(args.systems.split(",")) if args.systems else (
        {"engine", "one-by-one", "static", "hf", "compiled"} if gpu else {"engine", "one-by-one", "static"})
    rates = [float(r) for r in args.rates.split(",")]

    model = load_model(args, device, dtype)
    config = model.config
    settings = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), backend=model.backend(),
                    model=args.model or ("demo" if not gpu else "random weights, KoGPT-6B shape"),
                    num_requests=n, concurrency=concurrency, input_len=input_len, output_len=output_len,
                    length_dist=dist, max_batch_tokens=max_batch_tokens, seed=args.seed,
                    cpu_threads=torch.get_num_threads())
    warm = make_workload(min(concurrency, 4), config.vocab_size, 8, 4, "fixed", float("inf"), 99, config.n_positions)
    run_engine(model, warm, concurrency, max_batch_tokens, float("inf"))  # compiles, captures, allocates
    results = []
    for rate in rates:
        work = make_workload(n, config.vocab_size, input_len, output_len, dist, rate, args.seed, config.n_positions)
        if "engine" in systems:
            # Warm every decode graph bucket the run will use (the batch shrinks as requests finish).
            run_engine(model, make_workload(concurrency, config.vocab_size, 4, 3, "fixed", float("inf"), 98,
                                            config.n_positions), concurrency, max_batch_tokens, float("inf"))
            results.append(run_engine(model, work, concurrency, max_batch_tokens, rate))
            print(format_row(results[-1]), flush=True)
        if "one-by-one" in systems:
            run_one_by_one(model, warm, float("inf"))
            results.append(run_one_by_one(model, work, rate))
            print(format_row(results[-1]), flush=True)
        if "static" in systems:
            run_static(model, warm, concurrency, float("inf"))
            results.append(run_static(model, work, concurrency, rate))
            print(format_row(results[-1]), flush=True)
        for build in baseline_systems(model, systems, gpu and not args.no_compile):
            if dist != "fixed":
                print("  (the HF and compiled baselines run equal-length prompts only: use --length-dist fixed)")
                break
            try:
                system = build()
                run_baseline_static(system, warm, concurrency, float("inf"), device)
                results.append(run_baseline_static(system, work, concurrency, rate, device))
                print(format_row(results[-1]), flush=True)
                del system
            except Exception as e:  # a missing transformers, an out-of-memory: the others' figures stand
                print(f"  baseline failed: {type(e).__name__}: {e}")
        model.drop_cache()
        if gpu:
            torch.cuda.empty_cache()
    return {"settings": settings, "results": results, "ratios": ratios(results)}


def ratios(results: list[dict]) -> dict:
    """The engine's output tokens/s over each other system's, per rate."""
    out = {}
    for rate in {r["rate"] for r in results}:
        rows = {r["system"]: r for r in results if r["rate"] == rate}
        engine = rows.get("engine")
        if engine is None or not engine["output_tokens_per_s"]:
            continue
        out[str(rate)] = {name: engine["output_tokens_per_s"] / r["output_tokens_per_s"]
                          for name, r in rows.items() if name != "engine" and r["output_tokens_per_s"]}
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_row(r: dict) -> str:
    blocks = "-" if r["kv_blocks_peak"] is None else str(r["kv_blocks_peak"])
    return (f"  {r['system']:<36} rate {str(r['rate']):>4}  {r['output_tokens_per_s'] or 0:9.1f} tok/s  "
            f"TTFT p50/p99 {_ms(r['ttft_ms_p50'])}/{_ms(r['ttft_ms_p99'])} ms  "
            f"ITL p50/p99 {_ms(r['itl_ms_p50'])}/{_ms(r['itl_ms_p99'])} ms  KV blocks {blocks}")


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["ratios"], indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
