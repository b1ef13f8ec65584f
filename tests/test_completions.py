"""Completion (one /v1/completions call) against a scripted engine: n siblings are queued only once the first choice
of their prompt has its first event (so its full blocks are in the prefix cache to share), with seeds seed + i and
the prompt's logprobs computed once; streamed text holds back what could begin a stop string and ends before it;
an engine abort (a shutdown) is a 503."""
from __future__ import annotations

import asyncio

import pytest

from kogpt_fast import KoGPTTokenizer
from kogpt_fast.serving.completions import Completion, sampling_params
from kogpt_fast.serving.engine import EngineStats
from kogpt_fast.serving.metrics import ServerMetrics
from kogpt_fast.serving.protocol import APIError, CompletionRequest
from kogpt_fast.serving.request import RequestOutput, TokenLogprob

STATS = EngineStats(*[0] * 14)


class ScriptedStream:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aborted = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.aborted:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def ready(self):
        events = []
        while not self.queue.empty() and self.queue._queue[0] is not None:
            events.append(self.queue.get_nowait())
        return events

    def abort(self):
        self.aborted = True


class ScriptedEngine:
    """add_request records (prompt, params) and returns a stream the test feeds."""

    def __init__(self):
        self.added: list[tuple[list[int], object, ScriptedStream]] = []

    def add_request(self, prompt, params):
        stream = ScriptedStream()
        self.added.append((prompt, params, stream))
        return stream


@pytest.fixture(scope="module")
def tokenizer():
    return KoGPTTokenizer.from_pretrained()


def completion(tokenizer, engine, **fields):
    request = CompletionRequest(model="m", **fields)
    prompts = [tokenizer.encode(request.prompt)]
    params = [sampling_params(request, len(prompts[0]), 512)]
    c = Completion(engine, tokenizer, request, prompts, params, ServerMetrics(lambda: STATS), arrival=0.0)
    c.start()
    return c


def event(token_ids, finished=False, reason=None, **kw):
    return RequestOutput("r", list(token_ids), finished=finished, finish_reason=reason, **kw)


def test_siblings_wait_for_the_first_choices_first_event(tokenizer):
    engine = ScriptedEngine()

    async def main():
        c = completion(tokenizer, engine, prompt="국회는 법률에", n=3, seed=10, temperature=1.0, max_tokens=2,
                       echo=True, logprobs=1)
        assert len(engine.added) == 1  # only the first choice, until it has run its prompt
        first = engine.added[0][2]
        updates = c.updates()
        consumer = asyncio.ensure_future(updates.__anext__())
        await asyncio.sleep(0.05)
        assert len(engine.added) == 1
        prompt_lp = [None] + [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in engine.added[0][0][1:]]
        first.queue.put_nowait(event([5], logprobs=[TokenLogprob(5, -0.5, [(5, -0.5)])], prompt_logprobs=prompt_lp))
        await consumer
        await asyncio.sleep(0.05)
        assert len(engine.added) == 3
        seeds = [params.seed for _, params, _ in engine.added]
        assert seeds == [10, 11, 12]
        assert [params.prompt_logprobs for _, params, _ in engine.added] == [1, None, None]
        for _, _, stream in engine.added:
            stream.queue.put_nowait(event([6], logprobs=[TokenLogprob(6, -0.25, [(6, -0.25)])], finished=True,
                                          reason="length"))
        first.queue.put_nowait(None)
        [choice async for choice in updates]
        return c

    c = asyncio.run(main())
    n_prompt = len(c.prompts[0])
    for choice in c.choices:  # every choice echoes the prompt with the first choice's prompt logprobs
        assert choice.logprobs.token_logprobs[:n_prompt] == [None] + [-1.0] * (n_prompt - 1)
        assert choice.full_text.startswith("국회는 법률에")
    assert c.completion_tokens == 2 + 1 + 1


def test_streamed_text_holds_back_a_possible_stop_string_and_ends_before_it(tokenizer):
    engine = ScriptedEngine()
    ids = tokenizer.encode(" 계엄의 해제120조 국회는")

    async def main():
        c = completion(tokenizer, engine, prompt="국회는", stop=["해제12"], max_tokens=40, stream=True)
        stream = engine.added[0][2]
        updates = c.updates()
        sent = []
        for token in ids:
            stream.queue.put_nowait(event([token]))
            choice = await updates.__anext__()
            sent.append(c.delta(choice)[0])
            if choice.finish_reason is not None:
                break
        return c, sent, stream

    c, sent, stream = asyncio.run(main())
    choice = c.choices[0]
    assert choice.finish_reason == "stop" and stream.aborted
    assert "".join(sent) == choice.text == " 계엄의 "
    assert not any("해" in piece for piece in sent)  # the stop string's beginning was never sent


def test_an_engine_abort_is_a_503(tokenizer):
    engine = ScriptedEngine()

    async def main():
        c = completion(tokenizer, engine, prompt="국회는", max_tokens=40)
        engine.added[0][2].queue.put_nowait(event([5]))
        engine.added[0][2].queue.put_nowait(event([], finished=True, reason="abort"))
        return [choice async for choice in c.updates()]

    with pytest.raises(APIError) as raised:
        asyncio.run(main())
    assert raised.value.status == 503 and raised.value.code == "shutting_down"
