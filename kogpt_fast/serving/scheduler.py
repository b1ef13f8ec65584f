"""Iteration-level scheduling: which tokens of which requests the next forward step runs.

Each step, under a token budget (max_batch_tokens) and a cap on running requests (max_running):
1. every running request that is decoding gets its one token, oldest first; when the pool cannot hold it, the most
   recently admitted running request is preempted (its blocks given back, its tokens kept) until it can;
2. running requests still in their prompt get a chunk each (chunked prefill), bounded by the budget left and by
   the free blocks, so one long prompt cannot stall the others' next tokens;
3. waiting requests are admitted first come, first served, while the budget lasts and the pool holds their whole
   prompt (none in a step that preempted). A prompt starts with the blocks the prefix cache already holds for it.
A preempted request waits at the head of the queue and is recomputed (its prompt and new tokens as a prompt) when
admitted again; its blocks often are still in the prefix cache by then.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import ROOT, BlockManager
from .request import Request, Status


@dataclass
class ScheduledSequence:
    """Tokens request.token_ids[start : start + count] run this step (start = tokens cached before it)."""

    request: Request
    start: int
    count: int
    samples: bool  # the chunk ends at the request's last token: the step samples the next one
    prompt_logits: list[int]  # indices in the chunk whose logits give prompt logprobs (prompt_logprobs requests)

    @property
    def end(self) -> int:
        return self.start + self.count


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_running: int, prefix_caching: bool = True):
        self.blocks = blocks
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.prefix_caching = prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.queried_tokens = 0  # tokens looked up in the prefix cache at admission
        self.hit_tokens = 0  # of which found there
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and give its blocks back (finished or aborted)."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        self.blocks.release(request.blocks)
        request.blocks, request.content_ids, request.num_computed = [], [], 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _room(self, request: Request) -> int:
        """How many more tokens the request's blocks plus the free ones hold."""
        return (len(request.blocks) + self.blocks.num_free) * self.blocks.block_size - request.num_computed

    def _take(self, request: Request, count: int) -> ScheduledSequence:
        """Blocks for `count` more tokens of the request (room checked by the caller) and its place in the step."""
        needed = self.blocks.blocks_for(request.num_computed + count) - len(request.blocks)
        if needed > 0:  # consecutive where the pool allows (room: what the request may grow into)
            after, room = (request.blocks[-1] if request.blocks else None), 0
            if after is None:  # a first allocation: room for what the request may grow into
                total = self.blocks.blocks_for(request.prompt_len + request.params.max_new_tokens)
                room = max(total - len(request.blocks) - needed, 0)
            request.blocks += self.blocks.allocate(needed, after=after, room=room)
        start, end = request.num_computed, request.num_computed + count
        prompt_logits = []
        if request.prompt_logprobs is not None:  # positions j predict prompt token j + 1
            first = len(request.prompt_logprobs) - 1
            prompt_logits = [j - start for j in range(max(start, first), min(end, request.prompt_len - 1))]
        samples = end == len(request.token_ids) and request.num_new < request.params.max_new_tokens
        return ScheduledSequence(request, start, count, samples, prompt_logits)

    def schedule(self) -> list[ScheduledSequence]:
        budget, step = self.max_batch_tokens, []
        scheduled: set[int] = set()
        preempted = False
        # 1. decode tokens first.
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not Status.RUNNING or len(request.token_ids) - request.num_computed != 1:
                continue
            while self._room(request) < 1:
                self._preempt(self.running[-1])  # newer than `request`, or `request` itself: not yet scheduled
                preempted = True
                if request.status is not Status.RUNNING:
                    break
            if request.status is Status.RUNNING:
                step.append(self._take(request, 1))
                scheduled.add(id(request))
                budget -= 1
        # 2. chunks of prompts already running.
        for request in list(self.running):
            if budget == 0:
                break
            remaining = len(request.token_ids) - request.num_computed
            if request.status is not Status.RUNNING or id(request) in scheduled or remaining <= 1:
                continue  # preempted above, or decoding (all of those had their turn until the budget ran out)
            while self._room(request) < 1 and self.running[-1] is not request and id(self.running[-1]) not in scheduled:
                self._preempt(self.running[-1])
                preempted = True
            count = min(remaining, budget, self._room(request))
            if count > 0:
                step.append(self._take(request, count))
                scheduled.add(id(request))
                budget -= count
        # 3. admissions.
        while self.waiting and budget > 0 and len(self.running) < self.max_running and not preempted:
            request = self.waiting[0]
            hit = self._match_prefix(request)
            remaining = len(request.token_ids) - request.num_computed
            if self._room(request) < remaining:  # the whole prompt must fit, or the request waits
                self._release(request)
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            self.queried_tokens += len(request.token_ids)
            self.hit_tokens += hit
            count = min(remaining, budget)
            step.append(self._take(request, count))
            budget -= count
        return step

    def _match_prefix(self, request: Request) -> int:
        """Start the request with the cached blocks of its longest cached prefix (at least one token is left to run,
        for its logits; none for prompt logprobs, which need every position's logits); returns the tokens found."""
        if not self.prefix_caching or request.prompt_logprobs is not None and (
            len(request.prompt_logprobs) < request.prompt_len
        ):
            return 0
        bs = self.blocks.block_size
        blocks, ids = self.blocks.match_prefix(request.token_ids, (len(request.token_ids) - 1) // bs)
        request.blocks, request.content_ids, request.num_computed = blocks, ids, len(blocks) * bs
        request.num_cached_prompt = len(blocks) * bs
        return len(blocks) * bs

    def finish_step(self, step: list[ScheduledSequence]) -> None:
        """The step ran: its tokens are cached; name every block it filled in the prefix cache."""
        bs = self.blocks.block_size
        for seq in step:
            request = seq.request
            request.num_computed = seq.end
            if not self.prefix_caching:
                continue
            while len(request.content_ids) < request.num_computed // bs:
                i = len(request.content_ids)
                parent = request.content_ids[-1] if request.content_ids else ROOT
                request.content_ids.append(
                    self.blocks.register(request.blocks[i], parent, request.token_ids[i * bs:(i + 1) * bs])
                )

    def check_writes(self, step: list[ScheduledSequence]) -> None:
        """RuntimeError if a step would write into a block that is shared or named in the prefix cache."""
        bs = self.blocks.block_size
        for seq in step:
            for i in range(seq.start // bs, (seq.end - 1) // bs + 1):
                block = seq.request.blocks[i]
                if self.blocks.ref_counts[block] != 1 or self.blocks.is_cached_content(block):
                    raise RuntimeError(f"request {seq.request.request_id} would write into shared block {block}")
