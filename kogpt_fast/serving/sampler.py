"""Per-request sampling over a batch of logits, on generate()'s sampler (generation.process_logits / choose_tokens).

Each row is processed with its own request's parameters and drawn from its own generator, so a seeded request
draws the same tokens whatever else is in the batch. Rows that need no processing (greedy, no penalties, eos not
suppressed) take one argmax together.
"""
from __future__ import annotations

import torch

from ..generation import GenerationConfig, choose_tokens, process_logits
from .request import Request, SamplingParams, TokenLogprob


def generation_config(params: SamplingParams, eos: frozenset[int]) -> GenerationConfig:
    """The HF-shaped config process_logits reads (max_length and the like are the engine's business)."""
    return GenerationConfig(
        do_sample=not params.greedy, temperature=params.temperature if not params.greedy else 1.0,
        top_k=params.top_k or None, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_new_tokens or None, eos_token_id=sorted(eos),
    )


def _group_key(request: Request, config: GenerationConfig) -> tuple | None:
    """Rows whose processing needs nothing of their own sequence share a key (None: processed alone)."""
    p = request.params
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        return None
    suppress_eos = bool(request.eos) and request.num_new < p.min_new_tokens
    if p.greedy and not suppress_eos:
        return ("argmax",)  # no processing at all
    return (config.do_sample, config.temperature, config.top_k, config.top_p, tuple(config.eos_token_id),
            suppress_eos)


def _openai_penalties(request: Request, logits: torch.Tensor) -> torch.Tensor:
    """logits [1, V] - presence * [token occurred] - frequency * count, over the request's new tokens (OpenAI)."""
    p = request.params
    if (p.presence_penalty == 0 and p.frequency_penalty == 0) or request.num_new == 0:
        return logits
    new = torch.tensor(request.output_ids, device=logits.device)
    counts = torch.bincount(new, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


def sample(requests: list[Request], configs: list[GenerationConfig], logits: torch.Tensor) -> list[int]:
    """The next token of each request from its row of fp32 logits [B, V] (raw model output).

    Rows with the same parameters (and no penalty that reads their own tokens) are processed together; each row
    is drawn from its own generator."""
    groups: dict[tuple, list[int]] = {}
    for i, (request, config) in enumerate(zip(requests, configs)):
        groups.setdefault(_group_key(request, config) or ("alone", i), []).append(i)
    chosen: list[torch.Tensor | None] = [None] * len(requests)
    for key, rows in groups.items():
        index = torch.tensor(rows, device=logits.device) if len(rows) < len(requests) else slice(None)
        first = requests[rows[0]]
        if key == ("argmax",):
            tokens = torch.argmax(logits[index], dim=-1)
            for i, token in zip(rows, tokens):
                chosen[i] = token
            continue
        scores = logits[index]
        if key[0] == "alone":
            scores = _openai_penalties(first, scores)
        sequences = torch.tensor([first.token_ids], device=logits.device) if key[0] == "alone" else scores[:, :0].long()
        scores = process_logits(configs[rows[0]], sequences, scores, first.num_new)
        for j, i in enumerate(rows):
            chosen[i] = choose_tokens(configs[i], scores[j:j + 1], requests[i].generator)[0]
    return torch.stack(chosen).tolist()


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: list[int]) -> list[TokenLogprob]:
    """logits [M, V] fp32 -> each row's logprob of token_ids[m] and its top[m] most likely tokens."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    k = max(top, default=0)
    values, indices = (logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long()))
    values, indices = values.tolist(), indices.tolist()
    return [
        TokenLogprob(token, lp, list(zip(indices[m][:top[m]], values[m][:top[m]])))
        for m, (token, lp) in enumerate(zip(token_ids, chosen))
    ]
