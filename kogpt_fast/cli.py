"""`python -m kogpt_fast` / `kogpt-fast`: KoGPT's prompt loop, a one-shot mode, `convert` and `serve`.

    kogpt-fast                         # prompt> / temperature(0.8)> / max_length(128)> on the demo model
    kogpt-fast --model PATH --prompt "..." --max-new-tokens 64
    kogpt-fast convert SRC DST [--dtype float16] [--quantize int8]
    kogpt-fast serve [--model PATH] [--port 8000]     # the OpenAI-compatible HTTP server (the serve extra)
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
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


def positive_float(text: str) -> float:
    """A finite number > 0 (temperature, repetition penalty): `inf` and `nan` are refused, as 0 and negatives are."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def probability(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_model_arguments(p) -> None:
    """The model's flags, shared by the prompt loop and `kogpt-fast serve` (a parser or an argument group)."""
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or a hub id that the local Hugging Face cache holds, e.g. "
                   "kakaobrain/kogpt (default: the embedded demo model; nothing is ever downloaded)")
    p.add_argument("--revision", default=None, help="the hub revision of --model, e.g. KoGPT6B-ryan1.5b-float16")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="weight-only quantization of every projection and the lm_head (fp8: GPUs of compute "
                   "capability 8.9+, or --backend torch); a quantized checkpoint loads as it is")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kogpt-fast",
        description="Generate Korean text with KoGPT (or any GPT-J checkpoint). Without --prompt, runs KoGPT's "
        "interactive loop; `kogpt-fast convert SRC DST` converts a checkpoint to safetensors.",
    )
    add_model_arguments(p)
    p.add_argument("-d", "--debug", action="store_true", help="print timings, the backend, and tracebacks")
    one = p.add_argument_group("one-shot mode")
    one.add_argument("--prompt", help="generate once for this prompt and exit")
    one.add_argument("--temperature", type=positive_float, default=0.8)
    one.add_argument("--max-length", type=count(1), default=128, help="prompt + new tokens, as in KoGPT's loop")
    one.add_argument("--max-new-tokens", type=count(0), default=None, help="overrides --max-length")
    one.add_argument("--top-k", type=count(0), default=50, help="0: no top-k filtering")
    one.add_argument("--top-p", type=probability, default=1.0)
    one.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    one.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    one.add_argument("--seed", type=int, default=None)
    return p


def convert_main(argv: list[str]) -> int:
    from .convert import convert

    p = argparse.ArgumentParser(prog="kogpt-fast convert", description="Write a safetensors copy of a checkpoint.")
    p.add_argument("src", help="checkpoint directory (pytorch_model.bin or safetensors), or a hub id in the local "
                   "Hugging Face cache")
    p.add_argument("dst", help="new directory to create")
    p.add_argument("--revision", default=None, help="the hub revision of SRC")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="write int8 / fp8 (E4M3) weights with per-row scales for every projection and the lm_head")
    p.add_argument("-d", "--debug", action="store_true", help="print the traceback of an error")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, revision=args.revision, quantize=args.quantize)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return report(e, args.debug)
    print(f"wrote {out}")
    return 0


SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kogpt-fast serve",
        description="Serve the model over OpenAI's HTTP API (/v1/completions, /v1/models, /health, /metrics).",
    )
    add_model_arguments(p.add_argument_group("model (as for the prompt loop)"))
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=count(0), default=8000, help="0: any free port (the first line says which)")
    server.add_argument("--api-key", default=os.environ.get("KOGPT_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $KOGPT_API_KEY; none: open)")
    server.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: --model, or kogpt-fast-demo)")
    server.add_argument("--max-running", type=count(1), default=32, help="requests in the running batch at most")
    server.add_argument("--max-queue", type=count(1), default=1024,
                        help="requests waiting at most; beyond it a request gets a 429 with Retry-After")
    server.add_argument("--max-batch-tokens", type=count(1), default=512,
                        help="tokens one engine step runs at most (the chunked-prefill budget)")
    server.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds SIGTERM lets running requests finish before aborting them")
    server.add_argument("--threads", type=count(1), default=None,
                        help="on the CPU: the engine's torch threads (default: one fewer than torch would use, which "
                        "leaves a core to the HTTP server)")
    p.add_argument("-d", "--debug", action="store_true", help="access logs, timings and tracebacks")
    return p


def serve_main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: kogpt-fast serve needs {', '.join(missing)}: install the serve extra, "
              "pip install 'kogpt-fast[serve]' (from a checkout: pip install -e '.[serve]')", file=sys.stderr)
        return EXIT_ERROR
    try:
        import functools

        import torch

        from . import KoGPTTokenizer
        from .loader import check_checkpoint, model_dir
        from .serving.chat import load_chat_template
        from .serving.engine_process import EngineProcess
        from .serving.server import ServerState, listen, run

        sock = listen(args.host, args.port)
        directory = model_dir(args.model, revision=args.revision)  # checked here before the engine loads it
        check_checkpoint(directory)
        tokenizer = KoGPTTokenizer.from_pretrained(directory)
        engine = EngineProcess(
            functools.partial(load, args),
            dict(max_batch_tokens=args.max_batch_tokens, max_running=args.max_running, max_waiting=args.max_queue),
            threads=args.threads or max(1, torch.get_num_threads() - 1),
        )
        engine.start()  # the model loads in the engine's process
        name = args.served_model_name or args.model or "kogpt-fast-demo"
        state = ServerState(engine, tokenizer, name, api_key=args.api_key, chat_template=load_chat_template(directory))
        info = engine.info
        where = f"{info['device']}, {info['dtype']}" + (f", {info['threads']} torch threads" if
                                                        info["device"] == "cpu" else "")
        print(f"kogpt-fast: serving {name!r} ({where}, {info['num_blocks']} KV blocks) at "
              f"http://{args.host}:{sock.getsockname()[1]}/v1{' (API key required)' if args.api_key else ''}",
              file=sys.stderr, flush=True)
        try:
            run(state, sock, args.grace_period, access_log=args.debug)
        finally:
            engine.close()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return report(e, args.debug)


def report(error: Exception, debug: bool, out=None) -> int:
    """Print `error: ...` (and the traceback only with --debug); the exit status for it."""
    if debug:
        traceback.print_exc()
    expected = isinstance(error, (OSError, ValueError, TypeError, RuntimeError, NotImplementedError))
    text = str(error) if expected else (
        f"{type(error).__name__}: {error} (an internal error: rerun with --debug for the traceback, and report it)")
    print(f"error: {text}", file=out if out is not None else sys.stderr)
    return EXIT_ERROR


def load(args):
    """The tokenizer and the model. The checkpoint is checked first (its directory, config.json and weights), so a
    bad --model is reported as what it is before the tokenizer is looked for."""
    from . import KoGPTForCausalLM, KoGPTTokenizer
    from .backends import require_device
    from .loader import check_checkpoint, model_dir

    if args.debug:  # e.g. which implementation each op of the cuda backend ran on
        logging.basicConfig(format="[debug] %(name)s: %(message)s")
        logging.getLogger("kogpt_fast").setLevel(logging.DEBUG)
    start = time.perf_counter()
    if args.device is not None:
        require_device(args.device)
    directory = model_dir(args.model, revision=args.revision)
    check_checkpoint(directory)
    tokenizer = KoGPTTokenizer.from_pretrained(directory)
    model = KoGPTForCausalLM.from_pretrained(directory, device=args.device, dtype=args.dtype, backend=args.backend,
                                             quantize=args.quantize)
    if args.debug:
        from .backends import resolve
        from .quant import model_scheme

        print(f"[debug] loaded {directory} on {model.device} ({model.dtype}, weights "
              f"{model_scheme(model) or 'dense'}), backend {resolve(args.backend, model.device)}, in "
              f"{time.perf_counter() - start:.2f}s",
              file=sys.stderr)
    return tokenizer, model


def encode_prompt(tokenizer, prompt: str):
    ids = tokenizer.encode(prompt, return_tensors="pt")
    if ids.shape[1] == 0:
        raise ValueError(f"the prompt {prompt!r} has no tokens: give some text to continue")
    return ids


def generate(tokenizer, model, ids, args, **sampling) -> None:
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


def ask_until_valid(label: str, parse):
    """Ask until the answer parses; a bad one is refused with the reason, and the same question comes again."""
    while True:
        try:
            return parse(ask(label))
        except ValueError as e:
            print(f"error: {e}")


def loop_temperature(answer: str) -> float:
    try:
        return positive_float(answer or "0.8")
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"temperature: {e}") from None


def loop_max_length(prompt_tokens: int, n_positions: int):
    def parse(answer: str) -> int:
        try:
            value = count(1)(answer or "128")
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"max_length: {e}") from None
        if value <= prompt_tokens:
            raise ValueError(f"max_length counts the prompt too: the prompt has {prompt_tokens} tokens, so "
                             f"max_length must be above {prompt_tokens}")
        if value > n_positions:
            raise ValueError(f"max_length {value} is beyond this model's context of {n_positions} tokens "
                             "(n_positions)")
        return value

    return parse


def interactive(tokenizer, model, args) -> None:
    """KoGPT's loop. Empty prompt: ask again. A bad answer: say why, ask that question again. Ctrl-C while
    generating: back to prompt>. End of input or Ctrl-C at a question: return."""
    while True:
        try:
            prompt = ask("prompt> ")
            if not prompt:
                continue
            try:
                ids = encode_prompt(tokenizer, prompt)
            except ValueError as e:
                print(f"error: {e}")
                continue
            temperature = ask_until_valid("temperature(0.8)> ", loop_temperature)
            max_length = ask_until_valid("max_length(128)> ", loop_max_length(ids.shape[1], model.config.n_positions))
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            generate(tokenizer, model, ids, args, do_sample=True, temperature=temperature, max_length=max_length)
        except KeyboardInterrupt:
            print("\n(interrupted)")
        except Exception as e:
            report(e, args.debug, out=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty: give some text to continue")
    try:
        tokenizer, model = load(args)
        if args.prompt is None:
            interactive(tokenizer, model, args)
            return 0
        if args.greedy:
            sampling = dict(do_sample=False)
        else:
            sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        generate(tokenizer, model, encode_prompt(tokenizer, args.prompt), args, max_length=args.max_length,
                 max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty, **sampling)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return report(e, args.debug)
