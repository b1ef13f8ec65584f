"""Block accounting under random traffic (hypothesis): random arrivals, aborts, pool sizes, budgets and block sizes.

After every step the block manager's states are consistent and each block's reference count is the number of running
requests that hold it; at the end, after any mix of finished, aborted and preempted requests, every block is free or
held by the prefix cache, every request has ended the way it should have, and greedy ones have generate()'s tokens.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_helpers import assert_greedy_equals_generate
from engine_helpers import one_cpu_thread  # noqa: F401  (an autouse fixture)
from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM
from kogpt_fast.serving import Engine, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = random_hf_model(seed=9, n_positions=48, vocab_size=23, n_embd=64, n_head=2, rotary_dim=16, n_layer=1)
    path = tmp_path_factory.mktemp("engine_props")
    hf.save_pretrained(path)
    return KoGPTForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")


REQUEST = st.tuples(
    st.integers(1, 30),  # prompt length
    st.integers(0, 14),  # max_new_tokens
    st.booleans(),  # sampled (else greedy)
    st.integers(0, 3),  # prompt family: prompts of one family share their beginning (prefix hits)
)
STEP = st.tuples(st.lists(REQUEST, max_size=3), st.lists(st.integers(0, 1000), max_size=2))  # arrivals, aborts


def check_holders(engine):
    engine.blocks.check()
    holders = [0] * engine.blocks.num_blocks
    for request in engine.scheduler.running:
        for block in request.blocks:
            holders[block] += 1
    assert holders == engine.blocks.ref_counts
    assert all(not r.blocks for r in engine.scheduler.waiting)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_blocks=st.integers(4, 40), block_size=st.integers(1, 5), max_batch_tokens=st.integers(1, 24),
    max_running=st.integers(1, 6), steps=st.lists(STEP, min_size=1, max_size=12), seed=st.integers(0, 99),
)
def test_blocks_are_free_or_cached_after_any_traffic(tiny, num_blocks, block_size, max_batch_tokens, max_running,
                                                     steps, seed):
    engine = Engine(tiny, num_blocks=num_blocks, block_size=block_size, max_batch_tokens=max_batch_tokens,
                    max_running=max_running)
    g = torch.Generator().manual_seed(seed)
    families = [torch.randint(0, 23, (30,), generator=g).tolist() for _ in range(4)]
    accepted, aborted = [], set()
    for arrivals, aborts in steps:
        for prompt_len, max_new, sampled, family in arrivals:
            prompt = families[family][:prompt_len - 1] + [prompt_len % 23]
            params = SamplingParams(max_new_tokens=max_new, do_sample=sampled, seed=prompt_len, temperature=2.0)
            fed = prompt_len + max(max_new - 1, 0)
            if -(-fed // block_size) > num_blocks:
                with pytest.raises(ValueError, match="KV blocks"):
                    engine.add_request(prompt, params)
                continue
            accepted.append(engine.add_request(prompt, params))
        for i in aborts:
            if accepted:
                victim = accepted[i % len(accepted)]
                if not victim.finished:
                    aborted.add(victim.request_id)
                engine.abort(victim)
        engine.step()
        check_holders(engine)
    while engine.has_work():
        engine.step()
        check_holders(engine)
    engine.blocks.check()
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == num_blocks
    stats = engine.stats()
    event(f"preempted: {stats.preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hit_rate > 0}")
    event(f"aborted: {stats.requests_aborted > 0}")
    assert stats.running == stats.waiting == 0
    assert stats.requests_finished + stats.requests_aborted == len(accepted)
    for request in accepted:
        assert request.finished and request.blocks == [] and request.events[-1].finished
        assert sum(len(e.token_ids) for e in request.events) == request.num_new
        if request.finish_reason == "abort":
            assert request.request_id in aborted
        elif request.finish_reason == "length":
            assert request.num_new == request.params.max_new_tokens
        else:
            assert request.finish_reason == "stop" and request.output_ids[-1] in request.eos
    # Whatever happened around them (preemption, prefix hits, chunks), greedy requests give generate()'s tokens.
    greedy = [r for r in accepted if r.finish_reason != "abort" and r.params.greedy and r.num_new][:3]
    assert_greedy_equals_generate(tiny, greedy)
