"""`python -m kogpt_fast` / `kogpt-fast`: KoGPT's prompt loop, a one-shot mode, and `convert`.

    kogpt-fast                         # prompt> / temperature(0.8)> / max_length(128)> on the demo model
    kogpt-fast --model PATH --prompt "..." --max-new-tokens 64
    kogpt-fast convert SRC DST [--dtype float16] [--quantize int8]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

EXIT_ERROR = 1


class TextPrinter:
    """A streamer (HF's put/end protocol) that prints decoded text as tokens arrive.

    Text is re-decoded from all tokens so far and only the new suffix is printed; a suffix ending in U+FFFD
    (an incomplete UTF-8 sequence from byte-fallback tokens) is held back until its bytes are complete.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value) -> None:
        # A model's vocabulary may be padded beyond the tokenizer's (KoGPT: 64512 vs 64000): such ids have no text.
        self.ids.extend(i for i in value.flatten().tolist() if i < len(self.tokenizer))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kogpt-fast",
        description="Generate Korean text with KoGPT (or any GPT-J checkpoint). Without --prompt, runs KoGPT's "
        "interactive loop; `kogpt-fast convert SRC DST` converts a checkpoint to safetensors.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="weight-only quantization of every projection and the lm_head (fp8: GPUs of compute "
                   "capability 8.9+, or --backend torch); a quantized checkpoint loads as it is")
    p.add_argument("-d", "--debug", action="store_true", help="print timings, the backend, and tracebacks")
    one = p.add_argument_group("one-shot mode")
    one.add_argument("--prompt", help="generate once for this prompt and exit")
    one.add_argument("--temperature", type=float, default=0.8)
    one.add_argument("--max-length", type=int, default=128, help="prompt + new tokens, as in KoGPT's loop")
    one.add_argument("--max-new-tokens", type=int, default=None, help="overrides --max-length")
    one.add_argument("--top-k", type=int, default=50)
    one.add_argument("--top-p", type=float, default=1.0)
    one.add_argument("--repetition-penalty", type=float, default=1.0)
    one.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    one.add_argument("--seed", type=int, default=None)
    return p


def convert_main(argv: list[str]) -> int:
    from .convert import convert

    p = argparse.ArgumentParser(prog="kogpt-fast convert", description="Write a safetensors copy of a checkpoint.")
    p.add_argument("src", help="checkpoint directory (pytorch_model.bin or safetensors)")
    p.add_argument("dst", help="new directory to create")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="write int8 / fp8 (E4M3) weights with per-row scales for every projection and the lm_head")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {out}")
    return 0


def load(args):
    from . import KoGPTForCausalLM, KoGPTTokenizer

    if args.debug:  # e.g. which implementation each op of the cuda backend ran on
        logging.basicConfig(format="[debug] %(name)s: %(message)s")
        logging.getLogger("kogpt_fast").setLevel(logging.DEBUG)
    start = time.perf_counter()
    tokenizer = KoGPTTokenizer.from_pretrained(args.model)
    model = KoGPTForCausalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                             quantize=args.quantize)
    if args.debug:
        from .backends import resolve

        from .quant import model_scheme

        print(f"[debug] loaded {getattr(model, 'name_or_path', args.model)} on {model.device} ({model.dtype}, "
              f"weights {model_scheme(model) or 'dense'}), backend {resolve(args.backend, model.device)}, in "
              f"{time.perf_counter() - start:.2f}s",
              file=sys.stderr)
    return tokenizer, model


def generate(tokenizer, model, prompt: str, args, **sampling) -> None:
    ids = tokenizer.encode(prompt, return_tensors="pt")
    start = time.perf_counter()
    out = model.generate(ids, streamer=TextPrinter(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         seed=args.seed, **sampling)
    if args.debug:
        new = out.shape[1] - ids.shape[1]
        took = time.perf_counter() - start
        print(f"[debug] {ids.shape[1]} prompt tokens, {new} new in {took:.2f}s ({new / took:.1f} tokens/s)",
              file=sys.stderr)


def ask(label: str) -> str:
    return input(label).strip()


def interactive(tokenizer, model, args) -> None:
    """KoGPT's loop. Empty prompt: ask again. Bad value: say why, ask again. Ctrl-C while generating: back to
    prompt>. End of input or Ctrl-C at a prompt: return."""
    while True:
        try:
            prompt = ask("prompt> ")
            if not prompt:
                continue
            temperature = ask("temperature(0.8)> ") or "0.8"
            max_length = ask("max_length(128)> ") or "128"
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            temperature, max_length = float(temperature), int(max_length)
        except ValueError:
            print(f"error: temperature must be a number and max_length an integer, got {temperature!r}, "
                  f"{max_length!r}")
            continue
        if not temperature > 0:
            print(f"error: temperature must be positive, got {temperature}")
            continue
        try:
            generate(tokenizer, model, prompt, args, do_sample=True, temperature=temperature, max_length=max_length)
        except KeyboardInterrupt:
            print("\n(interrupted)")
        except (ValueError, TypeError, RuntimeError) as e:
            print(f"error: {e}")
            if args.debug:
                traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        tokenizer, model = load(args)
        if args.prompt is None:
            interactive(tokenizer, model, args)
            return 0
        if args.greedy:
            sampling = dict(do_sample=False)
        else:
            sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        generate(tokenizer, model, args.prompt, args, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                 repetition_penalty=args.repetition_penalty, **sampling)
        return 0
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
