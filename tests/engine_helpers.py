"""Shared by the engine tests: driving an engine through a scenario, and comparing it with generate() token for token
under the margin rule (a difference is allowed only where the reference's own top-2 logit margin is below 1e-4)."""
from __future__ import annotations

import pytest
import torch

from margin_rule import teacher_forced_logits, ulp

MARGIN = 1e-4


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


class StepLog:
    """Wraps engine.scheduler.schedule to record each step's (start, count, tokens left) per request."""

    def __init__(self, engine):
        self.steps: list[list[tuple[str, int, int, int]]] = []
        schedule = engine.scheduler.schedule

        def logged():
            step = schedule()
            self.steps.append([(s.request.request_id, s.start, s.count, len(s.request.token_ids) - s.start)
                               for s in step])
            return step

        engine.scheduler.schedule = logged

    def chunked(self) -> bool:
        """Some prompt ran in more than one chunk (a chunk that stopped short of the request's tokens)."""
        return any(count < left for step in self.steps for _, _, count, left in step)

    def mixed(self) -> bool:
        """Some step ran decode tokens and a prompt chunk together."""
        return any(any(c == 1 and left == 1 for _, _, c, left in step) and any(c > 1 for _, _, c, _ in step)
                   for step in self.steps)


def run_arrivals(engine, arrivals, finish=True):
    """arrivals: [(steps to run first, [(prompt, params), ...]), ...]; then (finish) run to the end.
    -> the requests in order."""
    requests = []
    for steps_before, batch in arrivals:
        for _ in range(steps_before):
            engine.step()
        requests += [engine.add_request(prompt, params) for prompt, params in batch]
    if finish:
        engine.run()
    return requests


def generate_alone(model, request, **kwargs):
    """generate() on the request's prompt alone, with its length limits: the new tokens."""
    p = request.params
    ids = torch.tensor([request.prompt_ids], device=model.device)
    out = model.generate(ids, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens or None, **kwargs)
    return out[0, len(request.prompt_ids):].tolist()


def assert_greedy_equals_generate(model, requests, bound_ulps: float | None = None) -> int:
    """Each request's tokens equal generate()'s on its prompt alone, or first differ where the reference's top-2
    margin is below MARGIN (fp32), or below bound_ulps ulps of its top logit in the model's dtype (fp16/bf16); the
    rest is then not compared. Returns the number of such differences."""
    allowed = 0
    for request in requests:
        expected = generate_alone(model, request)
        got = request.output_ids
        if got == expected:
            continue
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        assert first < min(len(got), len(expected)), (
            f"{request.request_id}: lengths differ without a token differing: {got} vs {expected}"
        )
        ids = torch.tensor([request.prompt_ids + expected], device=model.device)
        logits = teacher_forced_logits(model, ids, request.prompt_len)[first]
        top2 = logits.topk(2).values
        margin = (top2[0] - top2[1]).item()
        bound = MARGIN if bound_ulps is None else bound_ulps * ulp(top2[:1], model.dtype).item()
        assert margin < bound, (
            f"{request.request_id} (prompt {request.prompt_len} tokens) differs from generate() at new token {first} "
            f"where the reference's top-2 margin is {margin:.3g} (bound {bound:.3g}):\n got      {got}\n"
            f" expected {expected}"
        )
        allowed += 1
    return allowed


def assert_pool_is_clean(engine):
    """Every block is free or held by the prefix cache; the block manager's states agree."""
    engine.blocks.check()
    assert engine.blocks.num_used == 0 and all(c == 0 for c in engine.blocks.ref_counts), engine.stats()
    assert not engine.scheduler.running and not engine.scheduler.waiting


def blocks_written_by_each_step(engine):
    """Step the engine to the end; per step, assert that the pool blocks whose K or V changed were held by a running
    request before the step, allocated during it, or the scratch block. Returns whether the scratch block was
    written (by padded rows)."""
    allocated = []
    allocate = engine.blocks.allocate

    def recording(n, **kw):
        blocks = allocate(n, **kw)
        allocated.extend(blocks)
        return blocks

    engine.blocks.allocate = recording
    scratch, scratch_written = engine.cache.scratch_block, False
    while engine.has_work():
        before = engine.cache.k.clone(), engine.cache.v.clone()
        owned = {b for r in engine.scheduler.running for b in r.blocks}
        allocated.clear()
        engine.step()
        changed = set()
        for pool, old in zip((engine.cache.k, engine.cache.v), before):
            changed |= set((pool != old).flatten(2).any(-1).any(0).nonzero().flatten().tolist())
        assert changed <= owned | set(allocated) | {scratch}, "a step wrote into a block no request holds"
        scratch_written |= scratch in changed
    engine.blocks.allocate = allocate
    return scratch_written


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The engine tests' tiny steps on one intra-op thread (restored after the module): on a shared 2-core machine
    OpenMP threads waiting for busy cores made them 5-50x slower (bench/run.py does the same for its CPU run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
