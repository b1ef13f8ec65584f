"""One /v1/completions call on the engine: its prompts become engine requests, their events become OpenAI's text,
logprobs and finish reasons.

Each prompt gets n choices. The first choice of a prompt is queued at once (so bad input and a full queue are
refused before any response starts); its n - 1 siblings are queued when its first event arrives, by which time the
prompt's full blocks are in the prefix cache and the siblings share them. With a seed, choice i of a prompt draws from
seed + i. Echo's prompt logprobs are computed once per prompt, by its first choice.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from .async_engine import EngineClosed
from .detokenizer import IncrementalDetokenizer, StopStrings, prompt_pieces
from .engine import QueueFull
from .protocol import APIError, CompletionRequest, bad_request, max_tokens, stop_strings
from .request import RequestOutput, SamplingParams, TokenLogprob

RETRY_AFTER_S = 1  # what a 429 (queue full) tells the client to wait


def tokenize_prompts(tokenizer, vocab_size: int, prompt) -> list[list[int]]:
    """The token ids of each prompt (a string, strings, ids, or lists of ids); 400 for an empty prompt or an id
    outside the vocabulary."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    for i, row in enumerate(ids):
        where = f"prompt[{i}]" if len(ids) > 1 else "prompt"
        if not row:
            raise bad_request(f"{where} has no tokens: give some text (or token ids) to continue", param="prompt")
        bad = next((t for t in row if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"{where} holds token id {bad}, outside the vocabulary [0, {vocab_size})",
                              param="prompt")
    return ids


def sampling_params(r: CompletionRequest, prompt_len: int, n_positions: int) -> SamplingParams:
    new = max_tokens(r)
    if prompt_len + new > n_positions:
        raise bad_request(
            f"This model's maximum context length is {n_positions} tokens, however you requested {prompt_len + new} "
            f"tokens ({prompt_len} in your prompt; {new} for the completion). Please reduce your prompt or "
            f"max_tokens.", param="max_tokens", code="context_length_exceeded")
    temperature = 1.0 if r.temperature is None else r.temperature
    return SamplingParams(
        max_new_tokens=new, min_new_tokens=r.min_tokens or 0, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0, top_k=r.top_k or 0,
        top_p=1.0 if r.top_p is None else r.top_p,
        repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
        presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0, seed=r.seed,
        logprobs=r.logprobs, prompt_logprobs=r.logprobs if r.echo and r.logprobs is not None else None,
        stop_strings=tuple(stop_strings(r)),  # the engine stops there; Completion trims the text before them
    )


def queue_error(e: Exception) -> APIError:
    """What the engine's refusals at add_request mean over HTTP."""
    if isinstance(e, QueueFull):
        return APIError(429, f"{e}", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineClosed):
        return APIError(503, f"{e}", type="server_error", code="shutting_down",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    message = str(e)  # a ValueError naming an engine field: say it with OpenAI's names
    param = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}.get(
        message.split(" ", 1)[0].rstrip(":"), None)
    for ours, theirs in (("max_new_tokens", "max_tokens"), ("min_new_tokens", "min_tokens")):
        message = message.replace(ours, theirs)
    return bad_request(message, param=param)


def interrupted() -> APIError:
    return APIError(503, "the server shut down before the request finished (its grace period ran out)",
                    type="server_error", code="shutting_down")


class Logprobs:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset (into the choice's text)."""

    def __init__(self):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def since(self, start: int) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class Choice:
    """One choice's state: the text so far (after the echoed prompt), what was streamed, and how it ended."""

    index: int
    prompt: int  # which prompt
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    echo_text: str = ""  # the prompt's text when echo, sent first
    text: str = ""
    tokens: int = 0
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    stream: object = None  # the engine's stream of this choice's events (engine_process.ProcessStream)
    sent_text: int = -1  # characters of echo_text + text already streamed; -1: nothing yet (not even the echo)
    sent_logprobs: int = 0
    echoed: bool = False  # the prompt's logprobs are in `logprobs`
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the first choice of a prompt: first event seen
    last_token_time: float | None = None

    @property
    def full_text(self) -> str:
        return self.echo_text + self.text

    @property
    def full_length(self) -> int:
        return len(self.echo_text) + len(self.text)


class Completion:
    """The choices of one request, fed from the engine. updates() yields each choice when it has changed: once per
    engine step while the server keeps up (a chunk per token, as OpenAI streams), once for all the events that
    arrived meanwhile when it has fallen behind (as vLLM's server merges them)."""

    def __init__(self, engine, tokenizer, request: CompletionRequest, prompts: list[list[int]],
                 params: list[SamplingParams], metrics, arrival: float):
        self.engine, self.tokenizer, self.request, self.prompts = engine, tokenizer, request, prompts
        self.metrics, self.arrival = metrics, arrival
        n = request.n or 1
        stops = stop_strings(request)
        self.choices: list[Choice] = []
        for p, (ids, base) in enumerate(zip(prompts, params)):
            prompt_text = tokenizer.decode(ids, skip_special_tokens=True) if request.echo else ""
            for i in range(n):
                seed = None if base.seed is None else (base.seed + i) % 2**63
                sibling = base.replace(seed=seed, prompt_logprobs=None) if i else base
                self.choices.append(Choice(
                    index=p * n + i, prompt=p, params=sibling, detokenizer=IncrementalDetokenizer(tokenizer, ids),
                    stops=StopStrings(stops), echo_text=prompt_text,
                    logprobs=Logprobs() if request.logprobs is not None else None,
                ))
        self.firsts = self.choices[::n]
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def start(self) -> None:
        """Queue every prompt's first choice; raises the APIError for a refusal (nothing stays queued)."""
        try:
            for choice in self.firsts:
                choice.stream = self.engine.add_request(self.prompts[choice.prompt], choice.params)
        except (ValueError, QueueFull, EngineClosed) as e:
            self.abort()
            raise queue_error(e) from None
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    def abort(self) -> None:
        for choice in self.choices:
            if choice.stream is not None:
                choice.stream.abort()

    async def updates(self) -> AsyncIterator[Choice]:
        """Each choice as its events arrive, until all have finished. Leaving early aborts what still runs."""
        try:
            if len(self.choices) == 1:
                choice = self.choices[0]
                async for event in choice.stream:
                    self._take(choice, event)
                    for later in choice.stream.ready():  # arrived while we were behind: one update for all
                        if choice.finish_reason is None:
                            self._take(choice, later)
                    yield choice
                    if choice.finish_reason is not None:
                        return
                raise interrupted()  # the stream ended unfinished: aborted while this coroutine was elsewhere
            async for choice in self._merged():
                yield choice
        finally:
            self.abort()
            duration = time.perf_counter() - self.arrival
            self.metrics.request_duration.observe(duration)

    async def _merged(self) -> AsyncIterator[Choice]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(choice, queue)) for choice in self.choices]
        try:
            remaining = len(self.choices)
            while remaining:
                choice, item = await queue.get()
                if choice.finish_reason is not None:
                    continue  # ended by a stop string: what the engine made since is dropped
                if isinstance(item, BaseException):
                    raise item
                self._take(choice, item)
                yield choice
                if choice.finish_reason is not None:
                    remaining -= 1
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, choice: Choice, queue: asyncio.Queue) -> None:
        first = self.firsts[choice.prompt]
        try:
            if choice is not first:
                await first.started.wait()
                try:
                    choice.stream = self.engine.add_request(self.prompts[choice.prompt], choice.params)
                except (ValueError, QueueFull, EngineClosed) as e:
                    raise queue_error(e) from None
            event = None
            async for event in choice.stream:
                queue.put_nowait((choice, event))
            if event is None or not event.finished:
                queue.put_nowait((choice, interrupted()))  # ended unfinished (ignored if a stop string ended it)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the consumer raises it
            queue.put_nowait((choice, e))

    # ---- one event ----
    def _take(self, choice: Choice, event: RequestOutput) -> None:
        now = time.perf_counter()
        if event.prompt_logprobs is not None:
            self.prompt_logprobs[choice.prompt] = event.prompt_logprobs
        if not choice.echoed and choice.logprobs is not None and self.request.echo:
            self._echo_logprobs(choice)
            choice.echoed = True
        choice.started.set()
        for i, token in enumerate(event.token_ids):
            if choice.finish_reason is not None:
                break
            self._add_token(choice, token, event.logprobs[i] if event.logprobs else None)
        if event.token_ids:
            m = self.metrics
            if choice.last_token_time is None:
                m.time_to_first_token.observe(now - self.arrival)
            else:
                m.inter_token_latency.observe(now - choice.last_token_time)
            choice.last_token_time = now
            m.generation_tokens.inc(len(event.token_ids))
        if event.finished and choice.finish_reason is None:
            if event.finish_reason == "abort":  # only a shutdown aborts a request whose answer is still awaited
                raise interrupted()
            if event.stop_string is not None and event.stop_string in choice.text:  # the engine's match, not ours
                choice.text = choice.text[:choice.text.index(event.stop_string)]
            choice.finish_reason = event.finish_reason
        if choice.finish_reason is not None:
            self.metrics.choices.labels(choice.finish_reason).inc()

    def _add_token(self, choice: Choice, token: int, logprob: TokenLogprob | None) -> None:
        if choice.logprobs is not None and logprob is not None:
            top = {}
            for alt, value in logprob.top:
                top.setdefault(choice.detokenizer.peek(alt), value)
            piece = choice.detokenizer.add(token)
            top.setdefault(piece, logprob.logprob)
            choice.logprobs.add(piece, logprob.logprob, top, choice.full_length)
        else:
            piece = choice.detokenizer.add(token)
        choice.tokens += 1
        choice.text += piece
        if not choice.stops.stops:
            return
        if choice.tokens < choice.params.min_new_tokens:
            choice.stops.skip(choice.text)
            return
        end = choice.stops.find(choice.text)
        if end is not None:
            choice.text = choice.text[:end]
            choice.finish_reason = "stop"
            choice.stream.abort()  # the engine stops it at its next step and frees its blocks

    def _echo_logprobs(self, choice: Choice) -> None:
        """The prompt tokens' logprobs, first in the choice's logprobs (the first token has none)."""
        ids = self.prompts[choice.prompt]
        logprobs = self.prompt_logprobs.get(choice.prompt, [None] * len(ids))
        pieces = prompt_pieces(self.tokenizer, ids)
        offset = 0
        for j, (piece, lp) in enumerate(zip(pieces, logprobs)):
            if lp is None:
                choice.logprobs.add(piece, None, None, offset)
            else:
                context = IncrementalDetokenizer(self.tokenizer, ids[:j])
                top = {}
                for alt, value in lp.top:
                    top.setdefault(context.peek(alt), value)
                top.setdefault(piece, lp.logprob)
                choice.logprobs.add(piece, lp.logprob, top, offset)
            offset += len(piece)

    # ---- what goes out ----
    def delta(self, choice: Choice) -> tuple[str, dict | None]:
        """The text and logprobs not yet streamed: all of it once the choice has finished, else up to where a stop
        string could begin."""
        echo = len(choice.echo_text)
        end = choice.full_length if choice.finish_reason is not None else echo + choice.stops.sendable(choice.text)
        start = max(choice.sent_text, 0)
        end = max(end, start)
        piece = choice.echo_text[start:end] + choice.text[max(start - echo, 0):end - echo]
        choice.sent_text = end
        logprobs = None
        if choice.logprobs is not None:
            logprobs = choice.logprobs.since(choice.sent_logprobs)
            choice.sent_logprobs = len(choice.logprobs)
        return piece, logprobs
