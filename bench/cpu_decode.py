"""The CPU decode step: kogpt-fast's torch backend against HF transformers (eager) and CTranslate2, in one process.

    python bench/cpu_decode.py                          # batch 1, 8, 32 x prompt 32, 400; 48 new tokens; 2 threads
    python bench/cpu_decode.py --batches 1,8 --prompts 32 --out DIR

The model is issue 12's: a random GPT-J with KoGPT's head geometry (n_embd 1024, 4 layers, 4 heads x 256, rotary
64, d_ff 4096, vocab 8000), fp32, the same weights in every system. Each case runs greedy generate(n) and
generate(1) on every system in turn (alternating, `--repeats` times, after a warm-up), and reports
decode ms/token = (median T(n) - median T(1)) / (n - 1), the time of one more token with the prompt cached.
eos is suppressed (min_new_tokens = n) so no run stops early, and the systems' tokens are compared.
CTranslate2 (optional: pip install ctranslate2) converts the same model with its own Transformers converter;
without it its rows say so. Writes DIR/cpu_decode.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.e2e import HFSystem, KoGPTSystem, System, random_weights  # noqa: E402
from kogpt_fast.config import GPTJConfig  # noqa: E402

CONFIG = GPTJConfig(vocab_size=8000, n_positions=2048, n_embd=1024, n_layer=4, n_head=4, rotary_dim=64,
                    n_inner=4096)
KOGPT, HF, CT2 = "kogpt-fast[torch]", "hf-eager", "ctranslate2"


class CTranslate2System(System):
    """The model converted by CTranslate2's own Transformers converter (a word-level tokenizer of the ids' names
    saved beside it: CTranslate2 speaks token strings), run by its Generator with the same thread count, in a child
    process that never imports torch (bench/ct2_worker.py says why: in this process it slows torch's threads down).
    The child's pipe costs the same for n new tokens as for 1, so it cancels out of decode ms/token."""

    def __init__(self, config: GPTJConfig, weights: dict, threads: int, workdir: Path):
        import ctranslate2
        import transformers
        from tokenizers import Tokenizer, models

        self.name, self.info = CT2, {"ctranslate2": ctranslate2.__version__, "compute_type": "float32",
                                     "process": "its own (bench/ct2_worker.py)"}
        src, dst = workdir / "hf", workdir / "ct2"
        hf = HFSystem(config, weights, "eager").model
        hf.save_pretrained(src, safe_serialization=True)
        vocab = {f"t{i}": i for i in range(config.vocab_size)}
        tokenizer = transformers.PreTrainedTokenizerFast(  # ids 0 and 1: bos and eos, as in KoGPT
            tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")), bos_token="t0", eos_token="t1", unk_token="t0")
        tokenizer.save_pretrained(src)
        ctranslate2.converters.TransformersConverter(str(src)).convert(str(dst), quantization="float32")
        self.worker = subprocess.Popen([sys.executable, str(REPO / "bench" / "ct2_worker.py"), str(dst), str(threads)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reply()  # {"ready": version}

    def _reply(self) -> dict:
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the CTranslate2 worker exited (rc {self.worker.wait()}); its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the CTranslate2 worker failed: {reply['error']}")
        return reply

    def generate(self, ids, n):
        self.worker.stdin.write(json.dumps({"prompts": ids.tolist(), "n": n}) + "\n")
        self.worker.stdin.flush()
        new = torch.tensor(self._reply()["tokens"], dtype=torch.long)
        return torch.cat([ids, new], dim=1)

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.stdin.close()
            self.worker.wait(timeout=30)


def build_systems(config, weights, wanted: set[str], threads: int, workdir: Path) -> tuple[list[System], dict]:
    systems, skipped = [], {}
    if KOGPT in wanted:
        systems.append(KoGPTSystem(config, weights, "torch"))
    if HF in wanted:
        try:
            systems.append(HFSystem(config, weights, "eager"))
        except ImportError as e:
            skipped[HF] = f"transformers is not installed ({e})"
    if CT2 in wanted:
        try:
            systems.append(CTranslate2System(config, weights, threads, workdir))
        except ImportError as e:
            skipped[CT2] = f"ctranslate2 (an optional baseline) is not installed: pip install ctranslate2 ({e})"
    return systems, skipped


def timed(system: System, ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = system.generate(ids, n)
    return time.perf_counter() - t0, out


def run_case(systems: list[System], batch: int, prompt: int, new: int, repeats: int) -> dict:
    ids = torch.randint(2, CONFIG.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch + prompt))
    full = {s.name: [] for s in systems}
    one = {s.name: [] for s in systems}
    tokens = {}
    for s in systems:  # warm-up
        tokens[s.name] = timed(s, ids, new)[1][:, prompt:]
        timed(s, ids, 1)
    for _ in range(repeats):
        for s in systems:  # alternating, so that a slow spell of the machine hits every system
            full[s.name].append(timed(s, ids, new)[0])
            one[s.name].append(timed(s, ids, 1)[0])
    reference = tokens[systems[0].name]
    rows = {}
    for s in systems:
        t_full, t_one = statistics.median(full[s.name]), statistics.median(one[s.name])
        rows[s.name] = {
            "decode_ms_per_token": (t_full - t_one) / (new - 1) * 1e3, "request_s": t_full, "first_token_s": t_one,
            "runs_s": full[s.name], "runs_first_token_s": one[s.name],
            "same_tokens_as_" + systems[0].name: bool(torch.equal(tokens[s.name], reference)),
        }
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "systems": rows}


def table(cases: list[dict], names: list[str]) -> str:
    lines = ["| batch | prompt | " + " | ".join(names) + " | kogpt-fast / HF | kogpt-fast / CTranslate2 |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for case in cases:
        rows = case["systems"]
        cells = [f"{rows[n]['decode_ms_per_token']:.1f} ms" if n in rows else "-" for n in names]

        def ratio(other):
            if KOGPT in rows and other in rows:
                return f"{rows[KOGPT]['decode_ms_per_token'] / rows[other]['decode_ms_per_token']:.2f}x"
            return "-"

        lines.append(f"| {case['batch']} | {case['prompt']} | " + " | ".join(cells) + f" | {ratio(HF)} | {ratio(CT2)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/cpu_decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompts", default="32,400")
    p.add_argument("--new", type=int, default=48, help="new tokens per request (default 48)")
    p.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 threads (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default=f"{KOGPT},{HF},{CT2}")
    p.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be at least 2 (decode ms/token compares n new tokens with 1)")
    torch.set_num_threads(args.threads)
    weights = random_weights(CONFIG, torch.device("cpu"), torch.float32, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        systems, skipped = build_systems(CONFIG, weights, set(args.systems.split(",")), args.threads, Path(tmp))
        if not systems:
            p.error(f"no system to run: {skipped}")
        cases = []
        try:
            for batch in map(int, args.batches.split(",")):
                for prompt in map(int, args.prompts.split(",")):
                    cases.append(run_case(systems, batch, prompt, args.new, args.repeats))
                    print(f"batch {batch}, prompt {prompt}: " + ", ".join(
                        f"{n} {r['decode_ms_per_token']:.1f} ms/token" for n, r in cases[-1]["systems"].items()),
                        flush=True)
        finally:
            for s in systems:
                s.close()
    names = [s.name for s in systems]
    result = {"config": CONFIG.to_dict(), "threads": args.threads, "repeats": args.repeats, "systems": names,
              "skipped": skipped, "info": {s.name: s.info for s in systems}, "cases": cases,
              "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_decode.json").write_text(json.dumps(result, indent=1))
    print(table(cases, names))
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
