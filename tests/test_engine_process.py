"""EngineProcess, the server's engine in a process of its own: the same tokens as an Engine in this process; bad input
refused at add_request with the engine's own messages, before anything is sent; aborts and cancelled consumers free
their blocks; close() ends what is left; a loading failure and a dead engine process are clear errors."""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import subprocess
import sys

import pytest

from engine_helpers import one_cpu_thread, random_prompts  # noqa: F401  (one_cpu_thread: an autouse fixture)
from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer
from kogpt_fast.cli import load
from kogpt_fast.serving import Engine, EngineClosed, EngineError, SamplingParams
from kogpt_fast.serving.engine_process import EngineProcess, EngineProcessError


def demo_loader(model=None):
    args = argparse.Namespace(model=model, revision=None, device="cpu", dtype=None, backend="torch", debug=False,
                              quantize=None)
    return functools.partial(load, args)


async def collect(stream):
    return [event async for event in stream]


async def wait_until(predicate, timeout=60.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def engine():
    process = EngineProcess(demo_loader(), dict(max_running=8, max_waiting=16), threads=1)
    process.start()
    yield process
    process.close()
    assert not process.alive


def test_tokens_equal_an_engine_in_this_process(engine):
    prompts = random_prompts([3, 17, 8, 30, 1, 12], engine.config.vocab_size, seed=1)
    params = [SamplingParams(max_new_tokens=6 + i, min_new_tokens=6 + i, logprobs=2 if i % 2 else None,
                             do_sample=i == 3, seed=5) for i in range(len(prompts))]

    async def main():
        return await asyncio.gather(*(collect(engine.add_request(p, q)) for p, q in zip(prompts, params)))

    results = asyncio.run(main())
    model = KoGPTForCausalLM.from_pretrained(device="cpu", backend="torch")
    local = Engine(model, tokenizer=KoGPTTokenizer.from_pretrained())
    requests = [local.add_request(p, q) for p, q in zip(prompts, params)]
    local.run()
    for events, request in zip(results, requests):
        assert [t for e in events for t in e.token_ids] == request.output_ids
        assert events[-1].finished and events[-1].finish_reason == "length"
        if request.params.logprobs is not None:
            got = [lp.logprob for e in events for lp in e.logprobs]
            assert got == pytest.approx([lp.logprob for lp in request.logprobs], abs=1e-5)
    stats = engine.stats()
    assert stats.requests_finished >= len(prompts) and stats.blocks_used == 0


def test_bad_input_is_refused_at_once_with_the_engines_messages(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt_ids is empty"):
            engine.add_request([], SamplingParams())
        with pytest.raises(ValueError, match="top_p"):
            engine.add_request([3], SamplingParams(top_p=2))
        with pytest.raises(ValueError, match="n_positions"):
            engine.add_request([3] * 10, SamplingParams(max_new_tokens=engine.config.n_positions))
        with pytest.raises(ValueError, match="outside|vocabulary"):
            engine.add_request([engine.config.vocab_size], SamplingParams())

    asyncio.run(main())


def test_aborts_and_cancelled_consumers_free_their_blocks(engine):
    async def main():
        stream = engine.add_request([5, 6, 7] * 10, SamplingParams(max_new_tokens=400, min_new_tokens=400))
        await stream.__anext__()
        await wait_until(lambda: engine.stats().blocks_used > 0)
        stream.abort()
        await wait_until(lambda: engine.stats().blocks_used == 0 and engine.stats().running == 0)

        cancelled = engine.add_request([8, 9] * 10, SamplingParams(max_new_tokens=400, min_new_tokens=400))
        task = asyncio.create_task(collect(cancelled))
        await wait_until(lambda: engine.stats().blocks_used > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.stats().blocks_used == 0 and engine.stats().running == 0)

    before = engine.stats().requests_aborted
    asyncio.run(main())
    assert engine.stats().requests_aborted == before + 2


def test_close_ends_what_is_left_and_a_dead_engine_is_an_error():
    async def main():
        process = EngineProcess(demo_loader(), dict(max_running=1), threads=1)
        process.start()
        running = process.add_request([5, 6], SamplingParams(max_new_tokens=400, min_new_tokens=400))
        queued = process.add_request([5, 7], SamplingParams(max_new_tokens=4))
        await running.__anext__()
        process.close()
        # Both end with finish_reason "abort" (which the server answers with a 503).
        assert [e.finish_reason for e in await collect(running)][-1] == "abort"
        assert [e.finish_reason for e in await collect(queued)][-1] == "abort"
        with pytest.raises(EngineClosed):
            process.add_request([5], SamplingParams())

        process = EngineProcess(demo_loader(), dict(), threads=1)
        process.start()
        stream = process.add_request([5, 6], SamplingParams(max_new_tokens=400, min_new_tokens=400))
        await stream.__anext__()
        os.kill(process._process.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="engine process exited"):
            await collect(stream)
        assert not process.alive
        with pytest.raises(EngineClosed):
            process.add_request([5], SamplingParams())
        process.close()

    asyncio.run(main())


def test_a_loading_failure_is_raised_by_start(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineProcessError, match="config.json"):
        EngineProcess(demo_loader(str(tmp_path)), {}).start()


def test_a_program_that_forgets_close_still_exits(tmp_path):
    script = tmp_path / "forgets.py"
    script.write_text(
        "import argparse, functools\n"
        "from kogpt_fast.cli import load\n"
        "from kogpt_fast.serving.engine_process import EngineProcess\n"
        "if __name__ == '__main__':\n"
        "    args = argparse.Namespace(model=None, revision=None, device='cpu', dtype=None, backend='torch',"
        " debug=False, quantize=None)\n"
        "    engine = EngineProcess(functools.partial(load, args), {}, threads=1)\n"
        "    engine.start()\n"
        "    print('started', flush=True)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "started", result.stderr
