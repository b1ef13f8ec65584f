"""AsyncEngine: one engine thread serves many asyncio consumers; cancellation, early exit and shutdown abort requests
and give their blocks back; bad input and a full queue are refused at add_request; an engine error reaches the
affected streams and the engine goes on."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from engine_helpers import assert_pool_is_clean, generate_alone, random_prompts
from engine_helpers import one_cpu_thread  # noqa: F401  (an autouse fixture)
from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM
from kogpt_fast.serving import AsyncEngine, Engine, EngineClosed, EngineError, QueueFull, SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = random_hf_model(seed=17, n_positions=64, vocab_size=101, n_embd=128, n_head=2, rotary_dim=16)
    path = tmp_path_factory.mktemp("async_engine")
    hf.save_pretrained(path)
    m = KoGPTForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    m.kv_block_size = 4
    return m


async def collect(stream):
    return [event async for event in stream]


async def wait_until(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_concurrent_streams_equal_generate_on_one_engine_thread(model):
    prompts = random_prompts([3, 17, 8, 30, 1, 12, 5, 21] * 2, model.config.vocab_size, seed=1)
    params = [SamplingParams(max_new_tokens=6 + i % 5, min_new_tokens=6 + i % 5) for i in range(len(prompts))]

    async def main():
        engine = AsyncEngine(Engine(model, max_batch_tokens=32, max_running=8, num_blocks=40))
        threads = threading.active_count()
        streams = [engine.add_request(p, q) for p, q in zip(prompts, params)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert threading.active_count() == threads + 1  # the engine thread, whatever the number of requests
        engine.close()
        return engine, streams, results

    engine, streams, results = asyncio.run(main())
    for stream, events in zip(streams, results):
        assert events[-1].finished and events[-1].finish_reason == "length"
        assert [t for e in events for t in e.token_ids] == stream.request.output_ids
        assert stream.request.output_ids == generate_alone(model, stream.request)
    assert engine.stats().requests_finished == len(prompts)
    assert_pool_is_clean(engine.engine)


def test_a_steps_events_reach_the_event_loop_in_one_wake_up(model):
    prompts = random_prompts([5, 9, 3, 12, 7, 4, 8, 6], model.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=10, min_new_tokens=10)

    async def main():
        loop = asyncio.get_running_loop()
        calls = {"n": 0}
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args):
            calls["n"] += 1
            return call_soon_threadsafe(*args)

        loop.call_soon_threadsafe = counted
        engine = AsyncEngine(Engine(model, max_running=8))
        streams = [engine.add_request(p, params) for p in prompts]
        results = await asyncio.gather(*(collect(s) for s in streams))
        engine.close()
        return engine, calls["n"], results

    engine, calls, results = asyncio.run(main())
    assert all(len([t for e in events for t in e.token_ids]) == 10 for events in results)
    # 8 requests x 10 tokens = 80 events, in at most one hand-over per step.
    assert calls <= engine.stats().steps < 80


def test_cancelled_consumer_aborts_its_request_and_frees_its_blocks(model):
    prompts = random_prompts([20, 6], model.config.vocab_size, seed=2)

    async def main():
        engine = AsyncEngine(Engine(model, prefix_caching=False))
        long = engine.add_request(prompts[0], SamplingParams(max_new_tokens=40, min_new_tokens=40))
        short = engine.add_request(prompts[1], SamplingParams(max_new_tokens=30, min_new_tokens=30))
        seen = []

        async def consume():
            async for event in long:
                seen.append(event)

        task = asyncio.create_task(consume())
        await wait_until(lambda: len(seen) >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: long.request.finished)
        assert long.request.finish_reason == "abort" and long.request.blocks == []
        # Only the other request holds blocks (read while the engine thread runs: at most what it will ever need).
        assert engine.engine.blocks.num_used <= engine.engine.blocks.blocks_for(len(prompts[1]) + 30)
        events = await collect(short)
        engine.close()
        return engine, short, events

    engine, short, events = asyncio.run(main())
    assert short.request.output_ids == generate_alone(model, short.request)
    assert engine.stats().requests_aborted == 1
    assert_pool_is_clean(engine.engine)


def test_leaving_the_loop_early_aborts(model):
    async def main():
        engine = AsyncEngine(Engine(model))
        async for event in engine.generate([5, 6, 7], SamplingParams(max_new_tokens=30, min_new_tokens=30)):
            break
        stream = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=30, min_new_tokens=30))
        await stream.__anext__()
        request = stream.request
        del stream  # dropped without finishing
        await wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
        engine.close()
        return engine, request

    engine, request = asyncio.run(main())
    assert request.finish_reason == "abort" and engine.stats().requests_aborted == 2
    assert_pool_is_clean(engine.engine)


def test_bad_input_and_a_full_queue_are_refused_at_once(model):
    async def main():
        engine = AsyncEngine(Engine(model, max_waiting=1, max_running=1))
        with pytest.raises(ValueError, match="prompt_ids is empty"):
            engine.add_request([], SamplingParams())
        with pytest.raises(ValueError, match="top_p"):
            engine.add_request([3], SamplingParams(top_p=2))
        long = engine.add_request([3, 4], SamplingParams(max_new_tokens=60, min_new_tokens=60))
        await wait_until(lambda: engine.stats().running == 1)
        queued = engine.add_request([3, 4], SamplingParams(max_new_tokens=3))  # max_running=1: it waits
        with pytest.raises(QueueFull, match="waiting queue is full"):
            engine.add_request([3, 4], SamplingParams(max_new_tokens=3))
        long.abort()
        events = await collect(queued)
        engine.close()
        return events

    events = asyncio.run(main())
    assert events[-1].finished and len([t for e in events for t in e.token_ids]) == 3


def test_an_engine_error_reaches_the_streams_of_its_step_and_the_engine_goes_on(model, monkeypatch):
    forward = model.forward_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward_step", flaky)

    async def main():
        engine = AsyncEngine(Engine(model))
        stream = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=5, min_new_tokens=5))
        with pytest.raises(EngineError, match="injected failure"):
            await collect(stream)
        after = await collect(engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=5, min_new_tokens=5)))
        engine.close()
        return engine, stream, after

    engine, stream, after = asyncio.run(main())
    assert stream.request.finish_reason == "abort" and stream.request.error.startswith("RuntimeError")
    assert after[-1].finish_reason == "length"
    assert_pool_is_clean(engine.engine)


def test_drain_finishes_what_runs_and_close_aborts_the_rest(model, monkeypatch):
    forward = model.forward_step

    def slow(*args, **kwargs):  # 60 steps take over half a second: longer than the drain waits
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward_step", slow)

    async def main():
        engine = AsyncEngine(Engine(model, max_running=1))
        running = engine.add_request([3, 4, 5], SamplingParams(max_new_tokens=4, min_new_tokens=4))
        assert await engine.drain(timeout=30)
        with pytest.raises(EngineClosed):
            engine.add_request([3], SamplingParams())
        engine.close()
        assert [e.finish_reason for e in await collect(running)][-1] == "length"

        engine = AsyncEngine(Engine(model, max_running=1))
        long = engine.add_request([3, 4, 5], SamplingParams(max_new_tokens=60, min_new_tokens=60))
        queued = engine.add_request([3, 4, 6], SamplingParams(max_new_tokens=5))
        assert not await engine.drain(timeout=0.05)
        engine.close()
        return engine, await collect(long), await collect(queued)

    engine, long, queued = asyncio.run(main())
    assert long[-1].finish_reason == "abort" and queued[-1].finish_reason == "abort"
    assert_pool_is_clean(engine.engine)
