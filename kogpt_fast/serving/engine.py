"""The serving engine: requests join and leave a running batch over one model and one paged KV pool.

    engine = Engine(model, max_batch_tokens=512, max_running=32)
    request = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64, do_sample=True, seed=1))
    for event in engine.stream(request):        # steps the engine (every request advances) until this one ends
        print(event.token_ids, event.finish_reason)

Each `step()` admits and schedules (scheduler.py), runs one forward over every scheduled token, samples, and emits
events. Decode-only steps run the model's DecodeStep (a CUDA graph per batch-size bucket on the kernel backends);
steps with prompt chunks run one forward_step over the packed tokens, with extend attention where a sequence has
cached tokens. add_request() and abort() may be called from any thread (they only queue); step() runs on one.
The asyncio interface is async_engine.AsyncEngine.
"""
from __future__ import annotations

import itertools
import numbers
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..decode import DecodeStep, graphs_enabled
from ..generation import _as_list
from ..kv_cache import PagedKVCache, build_step_metadata
from ..stopping import StopStrings
from .block_manager import BlockManager
from .request import Request, RequestOutput, SamplingParams, Status
from .sampler import generation_config, sample, token_logprobs
from .scheduler import ScheduledSequence, Scheduler

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # decode graph batch sizes (padded rows do no harm)
CUDA_POOL_FRACTION = 0.85  # of the free GPU memory, at most, for a default-sized KV pool


class QueueFull(RuntimeError):
    """The waiting queue holds max_waiting requests already (a server answers 429 or 503)."""


@dataclass
class EngineStats:
    """A snapshot for /metrics. Blocks: used (held by requests) + cached (prefix cache, reclaimable) + free = total."""

    running: int
    waiting: int
    blocks_total: int
    blocks_used: int
    blocks_cached: int
    blocks_free: int
    prefix_cache_hit_rate: float  # prompt tokens found in the prefix cache / tokens looked up, at admission
    prompt_tokens: int  # prompt tokens of the requests accepted so far
    computed_tokens: int  # tokens run through the model (prompt chunks, recomputation, decode)
    generated_tokens: int
    preemptions: int
    requests_finished: int
    requests_aborted: int
    steps: int


class Engine:
    """Continuous batching over `model` (a KoGPTForCausalLM) with its own KV pool of num_blocks blocks.

    max_batch_tokens: tokens one step runs at most (the chunked-prefill budget); max_running: requests admitted at
    once; max_waiting: the queue bound (add_request raises QueueFull beyond it); num_blocks: the pool (default: room
    for max_running sequences of n_positions tokens, within CUDA_POOL_FRACTION of the free GPU memory);
    decode_buckets: the batch sizes decode-only steps are padded to (default DECODE_BUCKETS where CUDA graphs run,
    else none: the exact batch); tokenizer: the model's (KoGPTTokenizer), needed by requests with stop_strings.
    """

    def __init__(self, model, *, max_batch_tokens: int = 512, max_running: int = 32, max_waiting: int = 1024,
                 num_blocks: int | None = None, block_size: int | None = None, prefix_caching: bool = True,
                 decode_buckets: tuple[int, ...] | None = None, tokenizer=None):
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_running", max_running),
                            ("max_waiting", max_waiting)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        c = model.config
        self.model, self.tokenizer = model, tokenizer
        block_size = block_size or model.kv_block_size
        if num_blocks is None:
            num_blocks = default_num_blocks(model, max_running, block_size)
        self.cache = PagedKVCache(c.n_layer, num_blocks, block_size, c.n_head, c.head_dim, model.dtype, model.device)
        # The pool's tensors are the engine's; its blocks are owned by the block manager (cache.allocator is unused).
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_batch_tokens, max_running, prefix_caching)
        self.max_waiting = max_waiting
        self.use_graph = model.use_cuda_graph and graphs_enabled(model.backend(), model.device)
        self.decode_buckets = tuple(sorted(decode_buckets)) if decode_buckets else (
            DECODE_BUCKETS if self.use_graph else ()
        )
        self._decode_steps: dict[int, DecodeStep] = {}
        self._eos = frozenset(_as_list(model._generation_defaults().eos_token_id))
        self._inbox: deque[Request] = deque()  # added, not yet seen by step(): appends are thread-safe
        self._aborts: deque[Request] = deque()
        self._ids = itertools.count()
        self.on_work: Callable[[], None] | None = None  # called when a request or an abort arrives (AsyncEngine)
        self._counts = dict(prompt_tokens=0, computed_tokens=0, generated_tokens=0, requests_finished=0,
                            requests_aborted=0, steps=0)

    # ---- requests in ----
    def add_request(self, prompt_ids, params: SamplingParams | None = None, *, request_id: str | None = None,
                    listener: Callable[[RequestOutput], None] | None = None) -> Request:
        """Queue a request: prompt_ids a list of token ids (or a 1-D integer tensor). Raises ValueError naming the
        field for bad input and for a request that could never fit (the model's n_positions, the pool), QueueFull
        when max_waiting requests wait already; nothing runs before the checks pass. listener, if given, receives
        each of the request's events (on the engine's thread) instead of request.events."""
        prompt, params = check_request(prompt_ids, params, self.model.config, self.blocks.num_blocks,
                                       self.blocks.block_size, self.tokenizer is not None)
        if len(self.scheduler.waiting) + len(self._inbox) >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests): try again later")
        eos = frozenset(params.eos_token_ids) if params.eos_token_ids is not None else self._eos
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}", prompt_len=len(prompt),
            token_ids=prompt, params=params, eos=eos, generator=generator, listener=listener,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        request.config = generation_config(params, eos)
        if params.stop_strings:
            request.stop_strings = StopStrings(list(params.stop_strings), self.tokenizer, [len(prompt)])
        self._counts["prompt_tokens"] += len(prompt)
        if params.max_new_tokens == 0 and params.prompt_logprobs is None:
            self._finish(request, "length")  # nothing to run
            return request
        self._inbox.append(request)
        if self.on_work is not None:
            self.on_work()
        return request

    def abort(self, request: Request) -> None:
        """Stop a request at the next step: its blocks are given back, its last event has finish_reason "abort"."""
        self._aborts.append(request)
        if self.on_work is not None:
            self.on_work()

    def abort_all(self) -> None:
        """Abort every request that has not finished (shutting down)."""
        for request in [*self._inbox, *self.scheduler.waiting, *self.scheduler.running]:
            self.abort(request)

    # ---- the loop ----
    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[RequestOutput]:
        """One iteration: take new requests and aborts, schedule, run the model once, sample, emit. Returns the
        events emitted (each also delivered to its request). An error in the model aborts the step's requests
        (their events carry it) and is raised."""
        events: list[RequestOutput] = []
        self._take_inbox(events)
        step = self.scheduler.schedule()
        if not step:
            return events
        self.scheduler.check_writes(step)
        try:
            logits, prompt_rows, sample_rows = self._run(step)
            self.scheduler.finish_step(step)
            self._emit_step(step, logits, prompt_rows, sample_rows, events)
        except Exception as e:
            for seq in step:
                if not seq.request.finished:
                    events.append(self._finish(seq.request, "abort", error=f"{type(e).__name__}: {e}"))
            raise
        self._counts["steps"] += 1
        self._counts["computed_tokens"] += sum(seq.count for seq in step)
        return events

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work():
            self.step()

    def stream(self, request: Request) -> Iterator[RequestOutput]:
        """The request's events as they come, stepping the engine (all requests advance) while it has none queued.
        For one thread that drives the engine itself; with AsyncEngine, iterate AsyncEngine.generate() instead."""
        while True:
            while request.events:
                event = request.events.popleft()
                yield event
                if event.finished:
                    return
            if request.finished:
                return
            self.step()

    def _take_inbox(self, events: list[RequestOutput]) -> None:
        while self._inbox:
            request = self._inbox.popleft()
            self.scheduler.add(request)
        while self._aborts:
            request = self._aborts.popleft()
            if not request.finished:
                events.append(self._finish(request, "abort"))

    # ---- one forward step ----
    def _run(self, step: list[ScheduledSequence]) -> tuple[torch.Tensor, list[list[int]], list[int | None]]:
        """Logits for the step, and per sequence the rows that hold its prompt-logprob positions and its sample."""
        if all(seq.count == 1 and seq.samples and not seq.prompt_logits for seq in step):
            return self._decode(step), [[] for _ in step], list(range(len(step)))
        ids, positions, rows, prompt_rows, sample_rows = [], [], [], [], []
        for seq in step:
            offset = len(ids)
            ids += seq.request.token_ids[seq.start:seq.end]
            positions += range(seq.start, seq.end)
            prompt_rows.append(list(range(len(rows), len(rows) + len(seq.prompt_logits))))
            rows += [offset + j for j in seq.prompt_logits]
            sample_rows.append(len(rows) if seq.samples else None)
            if seq.samples:
                rows.append(offset + seq.count - 1)
        device = self.model.device
        meta = build_step_metadata(
            [seq.request.blocks for seq in step], [seq.start for seq in step], [seq.count for seq in step],
            torch.tensor(positions), self.cache.block_size, device, is_prefill=True, logits_indices=rows,
        )
        logits = self.model.forward_step(torch.tensor(ids, device=device), meta, self.cache)
        return logits, prompt_rows, sample_rows

    def _decode(self, step: list[ScheduledSequence]) -> torch.Tensor:
        """One token per sequence on a DecodeStep padded to the smallest bucket that holds the batch."""
        batch = len(step)
        size = next((b for b in self.decode_buckets if b >= batch), batch)
        decode = self._decode_steps.get(size)
        key = self.model._weights_key() if self.use_graph else ()  # a graph replays the weights' addresses
        if decode is None or decode.weights_key != key:
            decode = self._decode_steps[size] = DecodeStep(self.model, self.cache, size, self.use_graph)
            decode.weights_key = key
        decode.load([seq.request.blocks for seq in step], [seq.start for seq in step])
        tokens = [seq.request.token_ids[seq.start] for seq in step] + [0] * (size - batch)
        return decode(torch.tensor(tokens, device=self.model.device))[:batch]

    def _emit_step(self, step, logits, prompt_rows, sample_rows, events) -> None:
        for seq, rows in zip(step, prompt_rows):
            if rows:
                request = seq.request
                targets = [request.token_ids[seq.start + j + 1] for j in seq.prompt_logits]
                k = request.params.prompt_logprobs
                request.prompt_logprobs += token_logprobs(logits[rows], targets, [k] * len(rows))
        sampling = [(seq, row) for seq, row in zip(step, sample_rows) if row is not None]
        if sampling:
            requests = [seq.request for seq, _ in sampling]
            rows = torch.tensor([row for _, row in sampling], device=logits.device)
            tokens = sample(requests, [r.config for r in requests], logits[rows])
            wants = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
            logprobs = dict(zip(wants, token_logprobs(
                logits[rows[wants]], [tokens[i] for i in wants], [requests[i].params.logprobs for i in wants]
            ))) if wants else {}
            now = time.perf_counter()
            for i, (request, token) in enumerate(zip(requests, tokens)):
                events.append(self._append_token(request, token, logprobs.get(i), now))
        for seq in step:  # prompt-logprobs-only requests (max_new_tokens=0) end with their prompt
            request = seq.request
            if not request.finished and seq.end == len(request.token_ids) and (
                request.num_new >= request.params.max_new_tokens
            ):
                events.append(self._finish(request, "length"))

    def _append_token(self, request: Request, token: int, logprob, now: float) -> RequestOutput:
        request.token_ids.append(token)
        request.token_times.append(now)
        if request.first_token_time is None:
            request.first_token_time = now
        if logprob is not None:
            request.logprobs.append(logprob)
        self._counts["generated_tokens"] += 1
        p, n = request.params, request.num_new
        reason, stop = None, None
        if token in request.eos and n >= p.min_new_tokens:
            reason, stop = "stop", (token,)
        elif n >= p.min_new_tokens and p.stop:
            out = request.token_ids
            stop = next((tuple(s) for s in p.stop if n >= len(s) and tuple(out[-len(s):]) == tuple(s)), None)
            reason = "stop" if stop is not None else None
        if reason is None and n >= p.min_new_tokens and request.stop_strings is not None:
            matcher = request.stop_strings
            request.stop_string = matcher.match(request.token_ids[max(request.prompt_len,
                                                                      len(request.token_ids) - matcher.window):])
            reason = "stop" if request.stop_string is not None else None
        if reason is None and n >= p.max_new_tokens:
            reason = "length"
        event = RequestOutput(request.request_id, [token], logprobs=[logprob] if logprob is not None else None,
                              prompt_logprobs=self._take_prompt_logprobs(request))
        if reason is not None:
            return self._finish(request, reason, stop=stop, event=event)
        request.emit(event)
        return event

    def _take_prompt_logprobs(self, request: Request):
        if request.prompt_logprobs is None or request._prompt_logprobs_sent:
            return None
        request._prompt_logprobs_sent = True
        return list(request.prompt_logprobs)

    def _finish(self, request: Request, reason: str, *, stop=None, error=None, event=None) -> RequestOutput:
        """End a request (its blocks go back at once) and emit its last event."""
        if request.status is not Status.FINISHED:
            self.scheduler.remove(request)
        request.status, request.finish_reason, request.stop_sequence, request.error = (
            Status.FINISHED, reason, stop, error)
        self._counts["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        if event is None:
            event = RequestOutput(request.request_id, [], prompt_logprobs=self._take_prompt_logprobs(request))
        event.finished, event.finish_reason, event.stop_sequence, event.error = True, reason, stop, error
        event.stop_string = request.stop_string
        request.emit(event)
        return event

    # ---- numbers ----
    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting) + len(self._inbox), blocks_total=b.num_blocks,
            blocks_used=b.num_used, blocks_cached=b.num_cached, blocks_free=b.num_blocks - b.num_used - b.num_cached,
            prefix_cache_hit_rate=s.hit_tokens / s.queried_tokens if s.queried_tokens else 0.0,
            preemptions=s.num_preemptions, **self._counts,
        )


def check_request(prompt_ids, params: SamplingParams | None, config, num_blocks: int, block_size: int,
                  has_tokenizer: bool) -> tuple[list[int], SamplingParams]:
    """What add_request checks before anything runs: (the prompt as a list of ints, the params), or a ValueError naming
    the field (TypeError for params of another type). A function of the model's config and the pool's geometry, so
    that a front without the model (engine_process) refuses the same requests."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    prompt = check_prompt(prompt_ids, config.vocab_size)
    params.validate(config.vocab_size)
    fed = len(prompt) + max(params.max_new_tokens - 1, 0)  # every token but the last new one gets a position
    if fed > config.n_positions:
        raise ValueError(
            f"max_new_tokens: the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
            f"needs {fed} positions, beyond the model's n_positions={config.n_positions}"
        )
    blocks = -(-fed // block_size)
    if blocks > num_blocks:
        raise ValueError(
            f"max_new_tokens: the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
            f"needs {blocks} KV blocks of {block_size} tokens, more than the engine's pool of {num_blocks}"
        )
    if params.stop_strings and not has_tokenizer:
        raise ValueError("stop_strings need the model's tokenizer: Engine(model, tokenizer=...)")
    return prompt, params


def check_prompt(prompt_ids, vocab: int) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D, got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)):
        raise ValueError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
    for t in prompt_ids:
        if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab:
            raise ValueError(f"prompt_ids holds {t!r}, not a token id in the vocabulary [0, {vocab})")
    return [int(t) for t in prompt_ids]


def default_num_blocks(model, max_running: int, block_size: int) -> int:
    """Room for max_running sequences of n_positions tokens; on a GPU at most CUDA_POOL_FRACTION of the free memory."""
    c = model.config
    blocks = max_running * -(-c.n_positions // block_size)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        per_block = 2 * c.n_layer * block_size * c.n_embd * model.dtype.itemsize  # K and V
        blocks = min(blocks, int(CUDA_POOL_FRACTION * free) // per_block - 1)  # - 1: the scratch block
    return max(blocks, 1)
