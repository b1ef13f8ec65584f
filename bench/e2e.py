"""End-to-end generation: kogpt-fast on each backend against HF transformers and a compiled-PyTorch GPT-J.

Every system runs the same greedy work on the same weights (one set of tensors on the device, shared, HF names)
and the same random prompts: `generate(ids [B, T], n)` makes exactly n new tokens (eos suppressed, as HF's
min_new_tokens=n does, so no run stops early). What is measured, each a median over runs after a warm-up run:
  time_to_first_token   generate(prompt, 1): prefill plus the first token, batch 1
  decode_ms_per_token   (T(n) - T(1)) / (n - 1) at batch 1: the cost of one more token
  tokens_per_s          B * n / T(n) at batch B: the whole request, prefill included
  decode_tokens_per_s   B * (n - 1) / (T(n) - T(1))
Random fp16 weights of the model's shape are made on the device (never a 6B fp32 copy in host memory);
`--model PATH` loads a real checkpoint with kogpt-fast's loader and hands the same tensors to every system.
The systems kogpt-fast[B]+int8 / +fp8 quantize those weights (kogpt_fast.quant) into a model of their own and run
the batch-1 decode case; their decode_ms_per_token carries vs_dense_weights (its ratio to kogpt-fast[B]'s in the
same run; the goal is 0.6 or less) and a floor from the bytes they actually read.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kogpt_fast.config import GPTJConfig
from kogpt_fast.quant import SCHEMES as QUANTIZED_SCHEMES

from .compiled_baseline import GPTJ, StaticCacheGenerator

HF_EAGER, HF_SDPA, COMPILED = "hf-eager", "hf-sdpa", "pytorch-compiled"
STATIC_EAGER = "pytorch-static"  # the compiled baseline with torch.compile off (CPU, or --no-compile)


def kogpt_name(backend: str, prefill_path: str = "kernel", quantize: str | None = None) -> str:
    # No comma in a name: --systems takes a comma-separated list of them.
    name = f"kogpt-fast[{backend}]" if prefill_path == "kernel" else f"kogpt-fast[{backend}]+{prefill_path}-prefill"
    return name if quantize is None else f"{name}+{quantize}"


# ---- weights -------------------------------------------------------------------------------------------------

def random_weights(config: GPTJConfig, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights made on the device: N(0, 1/fan_in) matrices, LayerNorm gains near 1."""
    from kogpt_fast.model import KoGPTForCausalLM

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in KoGPTForCausalLM(config).named_parameters()}
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if name.endswith(("ln_1.weight", "ln_f.weight")):
            t.normal_(1.0, 0.1, generator=g)
        elif name.endswith("bias"):
            t.normal_(0.0, 0.1, generator=g)
        elif name == "transformer.wte.weight":
            t.normal_(0.0, 1.0, generator=g)
        else:
            t.normal_(0.0, shape[-1] ** -0.5, generator=g)
        weights[name] = t
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


def checkpoint_weights(path: str, device, dtype) -> tuple[GPTJConfig, dict[str, torch.Tensor]]:
    """A real checkpoint through kogpt-fast's loader (tensor by tensor onto the device)."""
    from kogpt_fast.model import KoGPTForCausalLM

    model = KoGPTForCausalLM.from_pretrained(path, device=device, dtype=dtype, backend="torch", progress=True)
    weights = {name: p.data for name, p in model.named_parameters()}
    weights.setdefault("lm_head.weight", weights["transformer.wte.weight"])  # tied: named once
    return model.config, weights


# ---- systems -------------------------------------------------------------------------------------------------

class System:
    name: str
    info: dict
    kinds: frozenset[str] | None = None  # the case kinds it runs (None: all)

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:  # [B, T] -> [B, T + n]
        raise NotImplementedError

    def release(self) -> None:
        """Drop the KV cache between cases."""

    def close(self) -> None:
        """End what the system started outside this process (a worker), after the last case."""


class KoGPTSystem(System):
    """kogpt-fast with one backend and prefill path. The kogpt-fast systems of a run share one model (`shared`, a
    dict holding it once built): the fused GEMM weights are a copy of the checkpoint's (11 GB for KoGPT-6B), so one
    model per system would hold one copy each; each system sets the model's backend and prefill path before it
    runs, and drops the decode graphs the previous one captured with its kernels."""

    def __init__(self, config: GPTJConfig, weights: dict, backend: str, prefill_path: str = "kernel",
                 shared: dict | None = None, quantize: str | None = None):
        from kogpt_fast import quant
        from kogpt_fast.model import KoGPTForCausalLM

        shared = {} if shared is None else shared
        if quantize is not None:  # a model of its own: the quantized copy of the shared weights (6 GB for KoGPT-6B)
            self.model = quant.quantize_model(KoGPTForCausalLM.from_state_dict(config, weights, backend=backend),
                                              quantize)
        else:
            if "model" not in shared:
                shared["model"] = KoGPTForCausalLM.from_state_dict(config, weights, backend=backend)
            self.model = shared["model"]
        self.backend, self.prefill_path = backend, prefill_path
        self._select()
        self.name = kogpt_name(backend, prefill_path, quantize)
        self.info = {"backend": backend, "prefill_path": prefill_path, "quantize": quantize}
        if prefill_path != "kernel":
            self.kinds = frozenset({"ttft"})  # it differs from the kernel system in the prefill only
        if quantize is not None:
            self.kinds = frozenset({"decode"})  # what quantization is for: the batch-1 weight stream
            self.info["weight_bytes_per_token"] = weight_bytes_per_token(dict(self.model.named_parameters()))

    def _select(self) -> None:
        model = self.model
        if (model.backend_name, model.prefill_path) != (self.backend, self.prefill_path):
            model.backend_name, model.prefill_path = self.backend, self.prefill_path
            model.drop_cache()  # its decode graphs hold the other backend's kernels
        model.backend()  # raises BackendUnavailable here, at build time, for a backend that cannot run

    def generate(self, ids, n):
        self._select()
        return self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def release(self):
        self.model.drop_cache()


class HFSystem(System):
    def __init__(self, config: GPTJConfig, weights: dict, attn_implementation: str):
        import transformers
        from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

        transformers.logging.set_verbosity_error()
        dtype = weights["lm_head.weight"].dtype
        device = weights["lm_head.weight"].device
        hf_config = transformers.GPTJConfig(**config.to_dict())
        with torch.device("meta"):
            model = transformers.GPTJForCausalLM._from_config(
                hf_config, attn_implementation=attn_implementation, dtype=dtype)
        model.load_state_dict(weights, strict=True, assign=True)
        for block in model.transformer.h:  # a buffer made on the meta device: remake it where the weights are
            attn = block.attn
            attn.embed_positions = create_sinusoidal_positions(attn.max_positions, attn.pos_embd_dim).to(device)
        self.model = model.eval()
        self.eos = config.eos_token_ids[0] if config.eos_token_ids else None
        self.name = HF_EAGER if attn_implementation == "eager" else f"hf-{attn_implementation}"
        self.info = {"transformers": transformers.__version__, "attn_implementation": attn_implementation}

    def generate(self, ids, n):
        return self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=self.eos,
        )


class CompiledSystem(System):
    def __init__(self, config: GPTJConfig, weights: dict, compile: bool):
        eos = config.eos_token_ids[0] if config.eos_token_ids else None
        self.generator = StaticCacheGenerator(GPTJ.from_state_dict(config, weights), compile, suppress_token_id=eos)
        self.name = COMPILED if compile else STATIC_EAGER
        self.info = {"torch_compile": "reduce-overhead" if compile else None}

    def generate(self, ids, n):
        return self.generator.generate(ids, n)

    def release(self):
        self.generator.release()


@dataclass
class SystemSpec:
    name: str
    build: Callable[[], System]


def system_specs(config, weights, backends: list[str], wanted: set[str] | None, compile: bool) -> list[SystemSpec]:
    """kogpt-fast on each backend (and, on the fastest kernel backend, with the prefill on cuBLAS and SDPA through
    torch, for time to first token), HF eager and sdpa, the compiled baseline; `wanted` filters by name or family."""
    shared: dict = {}  # one kogpt-fast model for all its systems
    specs = [SystemSpec(kogpt_name(b), lambda b=b: KoGPTSystem(config, weights, b, shared=shared)) for b in backends]
    kernel_backends = [b for b in ("cuda", "triton") if b in backends]
    if kernel_backends:
        b = kernel_backends[0]
        specs.append(SystemSpec(kogpt_name(b, "torch"),
                                lambda: KoGPTSystem(config, weights, b, "torch", shared=shared)))
    # The quantized schemes on the fastest backend (a scheme it cannot run on this device is skipped with the reason).
    for b in (kernel_backends or [b for b in backends if b == "torch"])[:1]:
        for scheme in QUANTIZED_SCHEMES:
            specs.append(SystemSpec(kogpt_name(b, quantize=scheme),
                                    lambda b=b, s=scheme: KoGPTSystem(config, weights, b, quantize=s)))
    specs += [
        SystemSpec(HF_EAGER, lambda: HFSystem(config, weights, "eager")),
        SystemSpec(HF_SDPA, lambda: HFSystem(config, weights, "sdpa")),
        SystemSpec(COMPILED if compile else STATIC_EAGER, lambda: CompiledSystem(config, weights, compile)),
    ]
    if wanted is None:
        return specs

    def family(name):
        return "kogpt" if name.startswith("kogpt-fast") else "compiled" if name in (COMPILED, STATIC_EAGER) else name

    return [s for s in specs if s.name in wanted or family(s.name) in wanted]


# ---- cases ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class E2ECase:
    kind: str  # "ttft", "decode" (batch-1 latency) or "throughput"
    batch: int
    prompt: int
    new_tokens: int

    @property
    def params(self) -> dict:
        return {"batch": self.batch, "prompt": self.prompt, "new_tokens": self.new_tokens}


def e2e_cases(config: GPTJConfig, device: torch.device, quick: bool) -> list[E2ECase]:
    # A prompt of n_positions tokens leaves no room for a new one in kogpt_fast.generate (prompt + new tokens
    # <= n_positions), so the long prompt is n_positions - 1 tokens (2047 on KoGPT-6B).
    longest = config.n_positions - 1
    if device.type != "cuda":
        return [E2ECase("decode", 1, 8, 16), E2ECase("ttft", 1, 16, 1), E2ECase("ttft", 1, min(64, longest), 1),
                E2ECase("throughput", 4, 16, 8)]
    # Batch-1 decode is the target's own case (prompt 32, 128 new tokens: DESIGN.md's 4.4 ms/token), quick or not.
    cases = [E2ECase("decode", 1, 32, 128), E2ECase("ttft", 1, 128, 1),
             E2ECase("ttft", 1, min(2048, longest), 1)]
    if not quick:
        cases.append(E2ECase("throughput", 16, 128, 64))
    cases.append(E2ECase("throughput", 64, 128, 32 if quick else 64))
    return cases


def _timed(system: System, ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = system.generate(ids, n)
    sync()
    elapsed = time.perf_counter() - t0
    if out.shape != (ids.shape[0], ids.shape[1] + n):
        raise RuntimeError(f"{system.name} returned shape {tuple(out.shape)}, expected {(ids.shape[0], ids.shape[1] + n)}")
    return elapsed, out


def measure(system: System, case: E2ECase, ids: torch.Tensor, runs: int) -> tuple[list[dict], torch.Tensor]:
    """The figures of one case on one system, and the tokens of its first run."""
    first_s, tokens = _timed(system, ids, case.new_tokens)  # warm-up: allocation, autotuning, compilation
    full = [_timed(system, ids, case.new_tokens)[0] for _ in range(runs)]
    t_full = statistics.median(full)
    base = {"system": system.name, "kind": case.kind, "params": case.params,
            "runs_s": full, "first_run_s": first_s}
    if case.kind == "ttft":
        return [{**base, "metric": "time_to_first_token", "value": t_full * 1e3, "unit": "ms"}], tokens
    _timed(system, ids, 1)
    one = [_timed(system, ids, 1)[0] for _ in range(runs)]
    t_one = statistics.median(one)
    base["runs_first_token_s"] = one
    per_token_s = max(t_full - t_one, 1e-9) / (case.new_tokens - 1)
    b = case.batch
    if case.kind == "decode":
        return [
            {**base, "metric": "decode_ms_per_token", "value": per_token_s * 1e3, "unit": "ms/token"},
            {**base, "metric": "request_s", "value": t_full, "unit": "s"},
        ], tokens
    return [
        {**base, "metric": "tokens_per_s", "value": b * case.new_tokens / t_full, "unit": "tokens/s"},
        {**base, "metric": "decode_tokens_per_s", "value": b / per_token_s, "unit": "tokens/s"},
    ], tokens


def _release(system: System, device: torch.device) -> None:
    system.release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


BASELINES = (HF_EAGER, COMPILED, STATIC_EAGER)


def attach_baselines(records: list[dict]) -> None:
    """Each figure gets the same figure of the baseline systems measured in this run."""
    by_key = {}
    for r in records:
        if "value" in r:
            by_key[(r["metric"], tuple(sorted(r["params"].items())), r["system"])] = r
    for r in records:
        if "value" not in r:
            continue
        key = (r["metric"], tuple(sorted(r["params"].items())))
        r["baselines"] = {
            name: {"value": by_key[key + (name,)]["value"], "unit": r["unit"]}
            for name in BASELINES if name != r["system"] and key + (name,) in by_key
        }


def weight_bytes_per_token(weights: dict[str, torch.Tensor]) -> int:
    """Bytes a batch-1 decode step must read: every weight but the embedding table (one row of it is read), each
    tensor once (a tied lm_head is the embedding table, read whole by the lm_head)."""
    seen, total = set(), 0
    for name, t in weights.items():
        if name == "transformer.wte.weight" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def attach_floor(records: list[dict], weights: dict[str, torch.Tensor], copy_bytes_per_s: float | None) -> dict | None:
    """Each batch-1 decode_ms_per_token gets the memory-bandwidth floor measured in this run (the weights read
    once per token at the copy rate of this run's peaks; a quantized system's own bytes) and its fraction of it:
    floor / measured. A quantized system's figure also gets vs_dense_weights: its ratio to the same backend's
    dense figure. Returns the dense floor."""
    if not copy_bytes_per_s:
        return None
    nbytes = weight_bytes_per_token(weights)
    dense = {(r.get("system"), tuple(sorted(r["params"].items()))): r["value"] for r in records
             if r.get("metric") == "decode_ms_per_token" and "value" in r}
    for r in records:
        if r.get("metric") == "decode_ms_per_token" and "value" in r and r["params"].get("batch") == 1:
            info = r.get("system_info") or {}
            floor_ms = info.get("weight_bytes_per_token", nbytes) / copy_bytes_per_s * 1e3
            r["floor"] = {"value": floor_ms, "unit": "ms/token"}
            r["fraction_of_floor"] = {"value": floor_ms / r["value"], "unit": "fraction"}
            base = dense.get((kogpt_name(info.get("backend", ""), info.get("prefill_path", "kernel")),
                              tuple(sorted(r["params"].items()))))
            if info.get("quantize") and base:
                r["vs_dense_weights"] = {"value": r["value"] / base, "unit": "x",
                                         "system": kogpt_name(info["backend"], info["prefill_path"])}
    return {"weight_bytes_per_token": nbytes, "copy_bytes_per_s": copy_bytes_per_s,
            "floor_ms_per_token": nbytes / copy_bytes_per_s * 1e3}


def agreement(tokens: dict[str, torch.Tensor], prompt_len: int) -> list[dict]:
    """How many leading new tokens each system shares with the reference (HF eager if it ran): information only,
    fp16 systems may part after a near-tie."""
    if not tokens:
        return []
    reference = HF_EAGER if HF_EAGER in tokens else next(iter(tokens))
    ref = tokens[reference][:, prompt_len:]
    out = []
    for name, t in tokens.items():
        if name == reference:
            continue
        same = (t[:, prompt_len:] == ref).cpu()
        prefix = int(same.long().cumprod(dim=1).sum(dim=1).min())
        out.append({"system": name, "reference": reference, "common_prefix_tokens": prefix,
                    "new_tokens": ref.shape[1]})
    return out


def run(config: GPTJConfig, weights: dict, specs: list[SystemSpec], cases: list[E2ECase], runs: int,
        deadline: float | None, on_record: Callable[[dict], None]) -> dict:
    """All systems are built first (they share the weights), then each case runs on each system in turn."""
    device = weights["lm_head.weight"].device
    systems: list[System] = []
    skipped = []
    for spec in specs:
        try:
            systems.append(spec.build())
        except Exception as e:  # e.g. HF refuses attn_implementation="sdpa" for GPT-J, or transformers is absent
            skipped.append({"system": spec.name, "reason": _one_line(e)})
    agree = []
    for index, case in enumerate(cases):
        g = torch.Generator().manual_seed(1000 + index)
        ids = torch.randint(2, config.vocab_size, (case.batch, case.prompt), generator=g).to(device)
        first_tokens = {}
        for system in systems:
            if system.kinds is not None and case.kind not in system.kinds:
                continue
            if deadline is not None and time.monotonic() > deadline:
                on_record({"system": system.name, "kind": case.kind, "params": case.params,
                           "skipped": "time budget exhausted"})
                continue
            try:
                records, tokens = measure(system, case, ids, runs)
                first_tokens[system.name] = tokens
                for r in records:
                    on_record({**r, "system_info": system.info})
            except Exception as e:
                on_record({"system": system.name, "kind": case.kind, "params": case.params, "error": _one_line(e)})
            finally:
                _release(system, device)
        if case.kind != "ttft":
            agree += [{**a, "params": case.params} for a in agreement(first_tokens, case.prompt)]
    return {"systems": [{"name": s.name, **s.info} for s in systems], "skipped_systems": skipped,
            "token_agreement": agree}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
