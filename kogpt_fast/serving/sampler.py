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


def _plain_greedy(request: Request) -> bool:
    p = request.params
    return (p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0 and p.frequency_penalty == 0
            and (not request.eos or request.num_new >= p.min_new_tokens))


def _openai_penalties(request: Request, logits: torch.Tensor) -> torch.Tensor:
    """logits [1, V] - presence * [token occurred] - frequency * count, over the request's new tokens (OpenAI)."""
    p = request.params
    if (p.presence_penalty == 0 and p.frequency_penalty == 0) or request.num_new == 0:
        return logits
    new = torch.tensor(request.output_ids, device=logits.device)
    counts = torch.bincount(new, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


def sample(requests: list[Request], configs: list[GenerationConfig], logits: torch.Tensor) -> list[int]:
    """The next token of each request from its row of fp32 logits [B, V] (raw model output)."""
    chosen: list[torch.Tensor | None] = [None] * len(requests)
    plain = [i for i, r in enumerate(requests) if _plain_greedy(r)]
    if plain:
        rows = torch.tensor(plain, device=logits.device) if len(plain) < len(requests) else slice(None)
        for i, token in zip(plain, torch.argmax(logits[rows], dim=-1)):
            chosen[i] = token
    for i, request in enumerate(requests):
        if chosen[i] is not None:
            continue
        scores = _openai_penalties(request, logits[i:i + 1])
        sequence = torch.tensor([request.token_ids], device=logits.device)
        scores = process_logits(configs[i], sequence, scores, request.num_new)
        chosen[i] = choose_tokens(configs[i], scores, request.generator)[0]
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
