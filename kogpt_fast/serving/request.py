"""What a request is: its sampling parameters, its state in the engine, and the events it emits."""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

FINISH_REASONS = ("stop", "length", "abort")  # OpenAI's, plus "abort" (abort() or the engine shutting down)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat API allows 20, its completions API 5)


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. Greedy when do_sample is False or temperature is 0.

    Logits processing follows HF's order (generation.process_logits): repetition_penalty (HF's semantics, over the
    prompt and the new tokens), then temperature, top_k (0: off), top_p; presence_penalty and frequency_penalty
    (OpenAI's semantics: subtracted once per distinct new token / once per occurrence, over the new tokens only) come
    first of all. eos_token_ids None means the model's eos; () means none. A stop sequence (token ids) ends the request
    once the new tokens end with it (it is kept in the output; the final event names it); stop_strings likewise, on
    the text of the new tokens as generate(stop_strings=) matches them (kogpt_fast.stopping; the engine needs a
    tokenizer). logprobs: how many top
    alternatives each new token reports besides its own logprob (None: no logprobs); prompt_logprobs: the same for
    each prompt token after the first (echo). Logprobs are of the model's distribution, before any processing.
    A seed makes sampling reproducible whatever else runs in the batch.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    stop: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def validate(self, vocab_size: int) -> None:
        """ValueError naming the first bad field."""
        def integer(name, low, high=None):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")

        def number(name, ok, what):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not ok(value):
                raise ValueError(f"{name} must be {what}, got {value!r}")

        def token_ids(name, ids):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
                raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size}): {list(ids)!r}")

        integer("max_new_tokens", 0)
        integer("min_new_tokens", 0, self.max_new_tokens if isinstance(self.max_new_tokens, int) else None)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        number("temperature", lambda t: t >= 0 and math.isfinite(t), "a finite number >= 0 (0: greedy)")
        integer("top_k", 0)
        number("top_p", lambda p: 0 < p <= 1, "in (0, 1]")
        number("repetition_penalty", lambda p: p > 0 and math.isfinite(p), "a finite number > 0")
        number("presence_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
        number("frequency_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
        if self.seed is not None:
            integer("seed", 0, 2**63 - 1)
        if self.eos_token_ids is not None:
            token_ids("eos_token_ids", self.eos_token_ids)
        for seq in self.stop:
            if not isinstance(seq, (tuple, list)) or not seq:
                raise ValueError(f"stop must be a list of non-empty token id sequences, got {self.stop!r}")
            token_ids("stop", seq)
        if isinstance(self.stop_strings, str) or not all(isinstance(x, str) and x for x in self.stop_strings):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                integer(name, 0, MAX_LOGPROBS)


@dataclass
class TokenLogprob:
    """A token's logprob and the `top` most likely tokens at its position, (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """One event of a request: the tokens it made since the last event (usually one), and whether it is done."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the first event, when asked; None for token 0
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_sequence: tuple[int, ...] | None = None  # the stop sequence or (eos id,) that ended it
    stop_string: str | None = None  # the stop string that ended it (its text is in the output: trim it)
    error: str | None = None  # the engine failed; the request was aborted


class Status(Enum):
    WAITING = "waiting"  # queued, or preempted (its blocks given back, its tokens kept)
    RUNNING = "running"  # holds blocks in the pool
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request's state. `token_ids` is the prompt followed by the new tokens; `num_computed` of them have their K/V
    in the request's blocks (the last new token never does until it is fed back)."""

    request_id: str
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    eos: frozenset[int]
    generator: torch.Generator | None
    arrival_time: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_sequence: tuple[int, ...] | None = None
    stop_string: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each new token was emitted (perf_counter)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Engine state.
    config: object = None  # the generation.GenerationConfig the sampler reads
    stop_strings: object = None  # a stopping.StopStrings when params.stop_strings is set
    blocks: list[int] = field(default_factory=list)
    content_ids: list[int] = field(default_factory=list)  # prefix-cache names of blocks[:len(content_ids)]
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at the last admission
    num_preemptions: int = 0
    events: deque = field(default_factory=deque)  # RequestOutputs not yet consumed (without a listener)
    listener: Callable[[RequestOutput], None] | None = None  # called (on the engine's thread) instead of queuing
    _prompt_logprobs_sent: bool = False

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_new(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, event: RequestOutput) -> None:
        if self.listener is not None:
            self.listener(event)
        else:
            self.events.append(event)
