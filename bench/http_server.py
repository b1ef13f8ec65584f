"""The HTTP server under load, on loopback: `kogpt-fast serve` started as the README says, then
1. the HTTP layer's cost: the same requests as concurrent streams through the server and straight into an Engine in
   this process (same model, same max_running, same torch threads, the same requests seen before), back to back in
   each round, which of the two goes first alternating; output tokens/s of each, and the median over the rounds of
   server / engine;
2. a bounded load test: rounds of a fixed number of requests (half streamed) at a fixed concurrency, each round within
   a time limit; requests/s, output tokens/s, time to first token; every request must come back complete, and the
   server's memory (RSS) after the last round is compared with its level after the warm-up round.

    python bench/http_server.py                                   # the demo model on the CPU
    python bench/http_server.py --model PATH --device cuda --streams 64 --out DIR

Every request is greedy with min_tokens = max_tokens, so each makes exactly --max-tokens tokens; prompts are random
token ids, fresh for each round (no prefix-cache hits between rounds), the same for the server and the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/http_server.py` from a checkout, installed or not

import httpx  # noqa: E402
import torch  # noqa: E402

from kogpt_fast import KoGPTForCausalLM  # noqa: E402
from kogpt_fast.serving import Engine, SamplingParams  # noqa: E402

MODEL_NAME = "bench"
CLIENT_WAKE_BYTES = 16384  # the comparison's client wakes per 16 kB of events, not per event: it shares the cores


# ---- the server, as a user starts it ----

def start_server(model_args: list[str], max_running: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m kogpt_fast serve --port 0 ...`: a free port, which its first line names."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kogpt_fast", "serve", "--port", "0", "--served-model-name", MODEL_NAME,
         "--max-running", str(max_running), *model_args],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    deadline, url = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: see {log}")
        found = url or re.search(r"serving .* at (http://127\.0\.0\.1:\d+)/v1", log.read_text(errors="replace"))
        url = url or (found.group(1) if found else None)
        try:
            if url and httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not come up within 180 s: see {log}")


def rss_mib(pid: int) -> float:
    """The resident memory of the server and its child processes (the engine's)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text()).group(1))
               for p in [pid, *map(int, children)]) / 1024


def server_metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- requests ----

def make_prompts(n: int, vocab: int, seed: int, low: int = 8, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]


USAGE = re.compile(rb'"usage":(\{[^}]*\})')


async def one_request(port: int, prompt: list[int], max_tokens: int, stream: bool, wake_every: int = 0) -> dict:
    """One completion over a fresh connection. The client is a plain asyncio socket that keeps only the last 4 kB
    of the answer (where the usage is): on a machine of few cores, a full HTTP client's parsing of every event
    would take CPU time from the server it measures. wake_every > 0: the kernel wakes the client only when that many
    bytes have arrived (SO_RCVLOWAT; the time to first token is then not measured)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if wake_every:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wake_every)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    ttft, head, tail = None, b"", b""
    while chunk := await reader.read(65536):
        if not head:
            head = chunk[:12]  # b"HTTP/1.1 200"
        if ttft is None and (not stream or b"data: " in chunk):
            ttft = time.perf_counter() - start
        tail = (tail + chunk)[-4096:]
    writer.close()
    usage = USAGE.findall(tail)
    ok = head.endswith(b"200") and bool(usage) and (not stream or b"data: [DONE]" in tail)
    return {"ok": ok, "tokens": json.loads(usage[-1])["completion_tokens"] if ok else 0,
            "ttft": ttft if stream else None, "latency": time.perf_counter() - start}


async def load_round(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int, streamed: float,
                     timeout: float, wake_every: int = 0) -> dict:
    """All prompts through the server, `concurrency` at a time (a fraction `streamed` of them streamed)."""
    port = int(url.rsplit(":", 1)[1])
    gate = asyncio.Semaphore(concurrency)
    every = max(1, round(1 / streamed)) if streamed > 0 else None

    async def gated(i, prompt):
        async with gate:
            return await one_request(port, prompt, max_tokens, every is not None and i % every == 0, wake_every)

    start = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(gated(i, p) for i, p in enumerate(prompts))), timeout)
    elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] * 1e3 for r in results if r["ttft"] is not None)
    return {"requests": len(prompts), "completed": sum(r["ok"] and r["tokens"] == max_tokens for r in results),
            "seconds": elapsed, "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": tokens / elapsed,
            "ttft_ms_p50": percentile(ttfts, 50), "ttft_ms_p99": percentile(ttfts, 99)}


def run_client(coroutine):
    """Run the client's coroutine on uvloop where it is installed (the serve extra brings it): its sockets cost the
    machine less CPU than asyncio's, CPU the server would otherwise lose to its own load generator."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def engine_round(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens/s of the same requests run straight on an Engine (no HTTP, no asyncio)."""
    params = SamplingParams(max_new_tokens=max_tokens, min_new_tokens=max_tokens)
    start = time.perf_counter()
    requests = [engine.add_request(p, params) for p in prompts]
    engine.run()
    elapsed = time.perf_counter() - start
    assert all(r.num_new == max_tokens for r in requests)
    return sum(r.num_new for r in requests) / elapsed


# ---- the run ----

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded demo model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--requests", type=int, default=64, help="requests per load round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--load-rounds", type=int, default=3, help="load rounds after the warm-up round")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams for the HTTP-cost comparison")
    p.add_argument("--cost-rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per load request")
    p.add_argument("--cost-max-tokens", type=int, default=64, help="new tokens per stream in the comparison")
    p.add_argument("--threads", type=int, default=None,
                   help="on the CPU, torch threads of the server's engine and of the engine compared with it "
                   "(default: kogpt-fast serve's, one fewer than torch would use)")
    p.add_argument("--timeout", type=float, default=120, help="seconds a round may take at most")
    p.add_argument("--all-cores-baseline", action="store_true",
                   help="on the CPU, also time the engine alone on every core (the server leaves one to HTTP)")
    p.add_argument("--out", type=Path, default=None, help="directory for http_server.json and the server's log")
    args = p.parse_args(argv)

    out = args.out or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    model_args = [f"--device={args.device}", f"--backend={args.backend}"]
    model_args += [f"--model={args.model}"] * (args.model is not None)
    model_args += [f"--dtype={args.dtype}"] * (args.dtype is not None)
    max_running = max(args.streams, args.concurrency)
    all_threads = torch.get_num_threads()
    threads = args.threads or max(1, all_threads - 1)  # kogpt-fast serve's default on the CPU: a core for HTTP
    if args.device == "cpu":
        model_args.append(f"--threads={threads}")
    model = KoGPTForCausalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    vocab = model.config.vocab_size
    server, url = start_server(model_args, max_running, out / "http_server.log")
    report: dict = {"device": args.device, "model": args.model or "demo", "machine_note": "loopback; one machine"}
    try:
        # 1. the HTTP layer's cost, on the server as it started: the same requests each round, through the server and
        # into an Engine here that has seen the same requests before (the pool's and the prefix cache's state matter
        # to a step's cost); the first round of each warms up.
        torch.set_num_threads(threads)  # the engine as the server runs it
        engine = Engine(model, max_running=args.streams)
        engine_tps, server_tps, engine_all_tps = [], [], []
        for i in range(args.cost_rounds + 1):
            prompts = make_prompts(args.streams, vocab, seed=1000 + i)
            runs = [lambda: engine_round(engine, prompts, args.cost_max_tokens),
                    lambda: run_client(load_round(url, prompts, args.cost_max_tokens, args.streams, 1.0,
                                                  args.timeout, wake_every=CLIENT_WAKE_BYTES))]
            if i % 2:
                e, s = runs[0](), runs[1]()
            else:  # the other order every other round: neither side always runs first
                s, e = runs[1](), runs[0]()
            assert s["completed"] == args.streams, s
            if args.all_cores_baseline:
                torch.set_num_threads(all_threads)
                engine_all_tps.append(engine_round(Engine(model, max_running=args.streams), prompts,
                                                   args.cost_max_tokens))
                torch.set_num_threads(threads)
            if i:
                engine_tps.append(e)
                server_tps.append(s["output_tokens_per_s"])
        report["http_cost"] = {
            "streams": args.streams, "max_tokens": args.cost_max_tokens, "torch_threads": threads,
            "engine_all_threads_tokens_per_s": engine_all_tps[1:], "all_threads": all_threads,
            "engine_tokens_per_s": engine_tps,
            "server_tokens_per_s": server_tps, "engine_median": statistics.median(engine_tps),
            "server_median": statistics.median(server_tps),
            # Each round's server / engine, then the median: a round's pair runs back to back, so the machine's
            # load drifting (it is shared) moves both; the ratio of the medians is kept too.
            "round_ratios": [s / e for s, e in zip(server_tps, engine_tps)],
            "ratio": statistics.median(s / e for s, e in zip(server_tps, engine_tps)),
            "ratio_of_medians": statistics.median(server_tps) / statistics.median(engine_tps),
        }
        # 2. the load test: a warm-up round, then rounds whose memory is compared with the warm-up's.
        rounds = []
        for i in range(args.load_rounds + 1):
            prompts = make_prompts(args.requests, vocab, seed=100 + i)
            result = run_client(load_round(url, prompts, args.max_tokens, args.concurrency, 0.5, args.timeout))
            result["server_rss_mib"] = rss_mib(server.pid)
            rounds.append(result)
        m = server_metrics(url)
        report["load"] = {
            "rounds": rounds, "warmup_rss_mib": rounds[0]["server_rss_mib"],
            "final_rss_mib": rounds[-1]["server_rss_mib"],
            "lost": sum(r["requests"] - r["completed"] for r in rounds),
            "after": {k: m[k] for k in ("kogpt_requests_running", "kogpt_requests_waiting", "kogpt_kv_blocks_used")},
        }
    finally:
        server.send_signal(signal.SIGTERM)
        report["server_exit_status"] = server.wait(timeout=120)
    (out / "http_server.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    load = report["load"]
    print(f"load ({report['device']}, {report['model']}): round  requests/s  output tokens/s  TTFT p50/p99 ms  "
          "server RSS MiB")
    for i, r in enumerate(load["rounds"]):
        ttft = f"{r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f}" if r["ttft_ms_p50"] is not None else "-"
        print(f"  {'warm-up' if i == 0 else i:>7}  {r['requests_per_s']:10.1f}  {r['output_tokens_per_s']:15.0f}  "
              f"{ttft:>15}  {r['server_rss_mib']:14.1f}")
    print(f"  lost requests: {load['lost']}; RSS after warm-up {load['warmup_rss_mib']:.1f} MiB, at the end "
          f"{load['final_rss_mib']:.1f} MiB")
    cost = report["http_cost"]
    print(f"HTTP cost at {cost['streams']} streams x {cost['max_tokens']} tokens: engine "
          f"{', '.join(f'{x:.0f}' for x in cost['engine_tokens_per_s'])} tokens/s, server "
          f"{', '.join(f'{x:.0f}' for x in cost['server_tokens_per_s'])}; medians {cost['engine_median']:.0f} / "
          f"{cost['server_median']:.0f}; the server gives {100 * cost['ratio']:.0f}% of the engine's (median of the "
          f"rounds' ratios; both on {cost['torch_threads']} torch threads)")
    if cost["engine_all_threads_tokens_per_s"]:
        print(f"  the engine alone on {cost['all_threads']} torch threads: "
              f"{', '.join(f'{x:.0f}' for x in cost['engine_all_threads_tokens_per_s'])} tokens/s")


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
