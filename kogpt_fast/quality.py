"""What weight quantization costs in quality, measured on a checkpoint and a text: `python -m kogpt_fast.quality`.

    python -m kogpt_fast.quality                                   # the demo model on kogpt_fast/demo/quality.txt
    python -m kogpt_fast.quality --model PATH --text FILE [--schemes float32,float16,int8,fp8] [--json OUT]

Each scheme is a model loaded from the same checkpoint: "float32" / "float16" / "bfloat16" (dense weights in that
dtype) or "int8" / "fp8" (kogpt_fast.quant: weights quantized at load time, activations in --dtype). The first
scheme is the reference. For each, over the same tokens:
  perplexity        exp(mean next-token NLL) over the text, cut into windows of --window tokens, each window a prefill
                    from its first token (which is not scored), logits at every position
  vs_reference      perplexity / the reference's
  max_logit_diff    the largest |logit - reference logit| over every position and vocabulary entry of the text
  greedy_agreement  over the prompts (--prompts FILE, one a line; default: the first --prompt-tokens tokens of the
                    text's first --num-prompts lines), the fraction of the reference's greedy continuation
                    (--new-tokens each) whose every token is also this scheme's argmax given the same preceding tokens
                    (teacher-forced: one disagreement costs one token, not the rest of the continuation)
  greedy_prefix     the mean fraction of the continuation that this scheme's own greedy generation repeats before
                    it first differs (what a user sees)
The models are held at once (their resident sizes add up: kogpt_fast.quant.resident_bytes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import quant
from .loader import DTYPES, parse_dtype

DENSE_SCHEMES = ("float32", "float16", "bfloat16")
DEFAULT_SCHEMES = ("float32", "float16", "int8", "fp8")
DEMO_TEXT = Path(__file__).resolve().parent / "demo" / "quality.txt"


@torch.inference_mode()
def token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, vocab] at every position of one sequence ids [T], from one prefill step."""
    ids = ids.to(model.device)
    t = ids.shape[0]
    cache = model.cache_for([t])
    cache.start([t])
    try:
        meta = cache.plan([t], torch.arange(t), is_prefill=True)
        meta = dataclasses.replace(meta, logits_indices=torch.arange(t, device=model.device))  # every position
        return model.forward_step(ids, meta, cache)
    finally:
        cache.release()


def load_scheme(path, scheme: str, device, dtype, backend: str):
    """The model of one scheme: dense in that dtype, or quantized with activations in `dtype`."""
    from .model import KoGPTForCausalLM

    if scheme in DENSE_SCHEMES:
        return KoGPTForCausalLM.from_pretrained(path, device=device, dtype=scheme, backend=backend)
    return KoGPTForCausalLM.from_pretrained(path, device=device, dtype=dtype, backend=backend,
                                            quantize=quant.check_scheme(scheme))


def check_schemes(schemes: list[str]) -> list[str]:
    known = DENSE_SCHEMES + quant.SCHEMES
    bad = [s for s in schemes if s not in known]
    if bad or not schemes:
        raise ValueError(f"schemes {bad or schemes} are not among {', '.join(known)}")
    if len(set(schemes)) != len(schemes):
        raise ValueError(f"schemes {schemes} repeat one")
    return schemes


def windows(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Consecutive pieces of at most `window` tokens (a last piece of one token scores nothing and is dropped)."""
    pieces = list(torch.split(tokens, window))
    return [p for p in pieces if p.numel() >= 2]


def text_prompts(tokenizer, text: str, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    prompts = []
    for line in text.splitlines():
        ids = tokenizer.encode(line.strip()) if line.strip() else []
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == num_prompts:
            break
    return prompts


def evaluate(models: dict, tokens: torch.Tensor, prompts: list[list[int]], window: int, new_tokens: int) -> dict:
    """The figures of the module docstring for each of `models` ({scheme: model}, the reference first)."""
    names = list(models)
    reference = models[names[0]]
    if reference.config.n_positions < window:
        raise ValueError(f"window {window} exceeds the model's n_positions={reference.config.n_positions}")
    nll = dict.fromkeys(names, 0.0)
    max_diff = dict.fromkeys(names, 0.0)
    scored = 0
    for piece in windows(tokens, window):
        target = piece[1:].to(reference.device)
        ref_logits = None
        for name in names:
            logits = token_logits(models[name], piece)
            nll[name] += F.cross_entropy(logits[:-1], target, reduction="sum").item()
            if ref_logits is None:
                ref_logits = logits
            max_diff[name] = max(max_diff[name], (logits - ref_logits).abs().max().item())
        scored += target.numel()
    if scored == 0:
        raise ValueError("the text has too few tokens to score (at least 2 are needed)")
    agree = dict.fromkeys(names, 0)
    prefix = dict.fromkeys(names, 0.0)
    for prompt in prompts:
        ids = torch.tensor([prompt])
        if len(prompt) + new_tokens > reference.config.n_positions:
            raise ValueError(f"a prompt of {len(prompt)} tokens + {new_tokens} new exceeds n_positions")
        continuation = reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False)[0, len(prompt):].cpu()
        sequence = torch.tensor(prompt + continuation.tolist())
        for name in names:
            predicted = token_logits(models[name], sequence[:-1])[len(prompt) - 1:].argmax(dim=-1).cpu()
            agree[name] += int((predicted == continuation).sum())
            own = continuation if name == names[0] else models[name].generate(  # the reference's is continuation
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)[0, len(prompt):].cpu()
            same = (own == continuation).long().cumprod(dim=0).sum().item()
            prefix[name] += same / new_tokens
    ref_ppl = math.exp(nll[names[0]] / scored)
    rows = {}
    for name in names:
        ppl, scheme = math.exp(nll[name] / scored), quant.model_scheme(models[name])
        rows[name] = {
            "perplexity": ppl, "vs_reference": ppl / ref_ppl, "max_logit_diff": max_diff[name],
            "greedy_agreement": agree[name] / (new_tokens * len(prompts)) if prompts else None,
            "greedy_prefix": prefix[name] / len(prompts) if prompts else None,
            "weights": scheme or "dense", "dtype": str(models[name].dtype).removeprefix(
                "torch."),
            "backend": models[name].backend(),
            "resident_bytes": quant.resident_bytes(models[name].config, scheme, models[name].dtype)["total"],
        }
    return {"reference": names[0], "tokens_scored": scored, "window": window, "prompts": len(prompts),
            "new_tokens": new_tokens, "schemes": rows}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kogpt_fast.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--text", type=Path, default=None, help=f"UTF-8 text to score (default: {DEMO_TEXT.name}, "
                   "the demo's, with the demo model only)")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                   help="comma-separated, the reference first (default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype of the quantized schemes (default float16 on cuda, float32 on cpu)")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")
    p.add_argument("--window", type=int, default=None, help="tokens per perplexity window (default: min(n_positions, "
                   "1024))")
    p.add_argument("--prompts", type=Path, default=None, help="a file of prompts, one a line")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    for name in ("window", "num_prompts", "prompt_tokens", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "window" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def run(args: argparse.Namespace) -> dict:
    from .tokenizer import KoGPTTokenizer

    schemes = check_schemes([s.strip() for s in args.schemes.split(",") if s.strip()])
    if args.text is None and args.model is not None:
        raise ValueError("--text is needed with --model (the default text is the demo model's)")
    text = (args.text or DEMO_TEXT).read_text(encoding="utf-8")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    tokenizer = KoGPTTokenizer.from_pretrained(args.model)
    models = {s: load_scheme(args.model, s, device, dtype, args.backend) for s in schemes}
    config = models[schemes[0]].config
    window = args.window or min(config.n_positions, 1024)
    if args.prompts is not None:
        lines = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [tokenizer.encode(line) for line in lines]
    else:
        prompts = text_prompts(tokenizer, text, args.num_prompts, args.prompt_tokens)
    tokens = torch.tensor(tokenizer.encode(text))
    report = evaluate(models, tokens, prompts, window, args.new_tokens)
    report.update(model=str(args.model or "demo"), text=str(args.text or DEMO_TEXT), device=str(device))
    return report


def format_table(report: dict) -> str:
    lines = [f"{report['model']} on {report['text']}: {report['tokens_scored']} tokens scored in windows of "
             f"{report['window']}, {report['prompts']} prompts x {report['new_tokens']} greedy tokens, "
             f"reference {report['reference']}, {report['device']}",
             f"{'scheme':<10}{'weights':>8}{'dtype':>10}{'backend':>9}{'resident':>12}{'perplexity':>12}"
             f"{'vs ref':>9}{'max |dlogit|':>14}{'agreement':>11}{'prefix':>8}"]
    for name, r in report["schemes"].items():
        agreement = "-" if r["greedy_agreement"] is None else f"{r['greedy_agreement']:.3f}"
        prefix = "-" if r["greedy_prefix"] is None else f"{r['greedy_prefix']:.3f}"
        lines.append(f"{name:<10}{r['weights']:>8}{r['dtype']:>10}{r['backend']:>9}"
                     f"{r['resident_bytes'] / 1e6:>10.1f}MB{r['perplexity']:>12.4f}{r['vs_reference']:>9.4f}"
                     f"{r['max_logit_diff']:>14.4f}{agreement:>11}{prefix:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
