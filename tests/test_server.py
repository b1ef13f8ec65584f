"""`kogpt-fast serve` on the demo model, as a user starts it (a subprocess on 127.0.0.1 and a free port), through the
real openai client: completions non-streamed and streamed, greedy text equal to generate()'s, seeds, stop strings,
logprobs equal to the engine's, echo, n, 32 concurrent streams, every bad input's status and exception, the API
key, chat without a template, and a disconnect that frees its blocks."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from engine_helpers import one_cpu_thread  # noqa: F401  (an autouse fixture: generate() and Engine in this process)
from server_helpers import (API_KEY, DEMO_NAME, ServerProcess, async_openai_client, metrics, openai_client,
                            wait_for)
from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer
from kogpt_fast.serving import Engine, SamplingParams

PROMPTS = ["국회는", "대통령은 법률에", "모든 국민은 인간으로서의 존엄과 가치를 가지며", "제1조"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server"), "--api-key", API_KEY).wait_ready()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


@pytest.fixture(scope="module")
def demo():
    """The server's model and tokenizer, loaded the same way (demo checkpoint, CPU, float32, torch backend)."""
    return KoGPTTokenizer.from_pretrained(), KoGPTForCausalLM.from_pretrained(device="cpu")


def greedy_text(demo, prompt: str, max_new_tokens: int) -> str:
    """generate()'s greedy continuation: the decoded prompt + new tokens, after the decoded prompt."""
    tokenizer, model = demo
    ids = tokenizer.encode(prompt, return_tensors="pt")
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    prompt_text = tokenizer.decode(ids[0], skip_special_tokens=True)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    assert full.startswith(prompt_text)
    return full[len(prompt_text):]


def test_greedy_completion_equals_generate(client, demo):
    for prompt in PROMPTS:
        response = client.completions.create(model=DEMO_NAME, prompt=prompt, max_tokens=24, temperature=0)
        (choice,) = response.choices
        assert choice.text == greedy_text(demo, prompt, 24), prompt
        assert choice.finish_reason in ("length", "stop") and choice.index == 0
        prompt_tokens = len(demo[0].encode(prompt))
        assert response.usage.prompt_tokens == prompt_tokens
        assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
        assert response.object == "text_completion" and response.model == DEMO_NAME


def test_streamed_completion_equals_the_unstreamed_one(client):
    kwargs = dict(model=DEMO_NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in token_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert len(token_chunks) > 5 and len({c.id for c in chunks}) == 1  # one chunk per token or so, one id
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_sse_wire_format_is_openais(server):
    body = {"model": DEMO_NAME, "prompt": "국회는", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2]) and len(events) >= 4


def test_a_seed_makes_sampling_reproducible_whatever_runs_beside_it(server, client):
    kwargs = dict(model=DEMO_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=1.0, top_p=0.95)
    first = client.completions.create(**kwargs, seed=7).choices[0].text
    assert client.completions.create(**kwargs, seed=7).choices[0].text == first
    others = {client.completions.create(**kwargs, seed=s).choices[0].text for s in (8, 9, 10)}
    assert others - {first}, "different seeds all gave the same text"

    async def beside_others():  # the same seeded request in a batch with 6 unseeded ones
        async with async_openai_client(server.url) as aclient:
            noise = [aclient.completions.create(**{**kwargs, "prompt": p}) for p in PROMPTS * 2]
            results = await asyncio.gather(aclient.completions.create(**kwargs, seed=7), *noise)
            return results[0].choices[0].text

    assert asyncio.run(beside_others()) == first


def test_n_choices_are_independent_and_seeded(client, demo):
    kwargs = dict(model=DEMO_NAME, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=12, temperature=1.0, n=3, seed=3,
                  extra_body={"min_tokens": 12})
    response = client.completions.create(**kwargs)
    assert [c.index for c in response.choices] == list(range(6))
    texts = [c.text for c in response.choices]
    assert len(set(texts[:3])) > 1 or len(set(texts[3:])) > 1  # siblings draw from seed, seed + 1, seed + 2
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts
    alone = client.completions.create(**{**kwargs, "prompt": PROMPTS[1], "n": 1, "seed": 4})
    assert alone.choices[0].text == texts[4]  # choice 1 of prompt 1 is seed 3 + 1
    tokenizer = demo[0]
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0])) + len(tokenizer.encode(PROMPTS[1]))
    assert response.usage.completion_tokens == 6 * 12


def test_stop_strings_end_the_text_before_them(client):
    full = client.completions.create(model=DEMO_NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0).choices[0].text
    assert len(full) > 20
    for start, length in ((8, 3), (15, 1), (3, 6)):  # stop strings that begin inside tokens and span several
        stop = full[start:start + length]
        expected = full[:full.index(stop)]
        for stream in (False, True):
            kwargs = dict(model=DEMO_NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "없는말"])
            if stream:
                chunks = list(client.completions.create(**kwargs, stream=True))
                text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
            else:
                choice = client.completions.create(**kwargs).choices[0]
                text, reason = choice.text, choice.finish_reason
            assert (text, reason) == (expected, "stop"), (stop, stream)
    # A stop string that never occurs changes nothing.
    choice = client.completions.create(model=DEMO_NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                       stop="없는말").choices[0]
    assert (choice.text, choice.finish_reason) == (full, "length")


def engine_logprobs(demo, prompt: str, max_tokens: int, k: int, echo: bool):
    _, model = demo
    ids = demo[0].encode(prompt)
    engine = Engine(model)
    request = engine.add_request(ids, SamplingParams(max_new_tokens=max_tokens, logprobs=k,
                                                     prompt_logprobs=k if echo else None))
    engine.run()
    return request


def test_logprobs_match_the_engines(client, demo):
    prompt, k = PROMPTS[1], 3
    response = client.completions.create(model=DEMO_NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=k)
    lp = response.choices[0].logprobs
    request = engine_logprobs(demo, prompt, 10, k, echo=False)
    assert len(lp.tokens) == len(request.logprobs) == response.usage.completion_tokens
    for got, top, want in zip(lp.token_logprobs, lp.top_logprobs, request.logprobs):
        assert got == pytest.approx(want.logprob, abs=1e-4)
        assert len(top) in (k, k + 1)  # the k most likely, and the chosen token when it is not among them
        assert sorted(top.values(), reverse=True)[:k] == pytest.approx([v for _, v in want.top], abs=1e-4)
    assert "".join(lp.tokens) == response.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_with_logprobs_gives_the_prompts_logprobs_first(client, demo):
    prompt, k = PROMPTS[2], 2
    tokenizer = demo[0]
    n_prompt = len(tokenizer.encode(prompt))
    response = client.completions.create(model=DEMO_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=k,
                                         echo=True)
    choice = response.choices[0]
    request = engine_logprobs(demo, prompt, 5, k, echo=True)
    assert choice.text.startswith(prompt) and choice.text == tokenizer.decode(request.token_ids,
                                                                              skip_special_tokens=True)
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [p.logprob for p in request.prompt_logprobs[1:]] + [p.logprob for p in request.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    chunks = list(client.completions.create(model=DEMO_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=k,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    # Scoring a text: echo with max_tokens=0 returns just the prompt and its logprobs.
    score = client.completions.create(model=DEMO_NAME, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    assert score.choices[0].text == prompt and score.usage.completion_tokens == 0
    assert score.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want[:n_prompt - 1], abs=1e-4)


def test_32_concurrent_streams_all_finish_with_the_right_usage(server, demo):
    tokenizer = demo[0]
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i % 3) + str(i) for i in range(32)]
    lengths = [8 + i % 9 for i in range(32)]

    async def one(aclient, prompt, n):
        stream = await aclient.completions.create(model=DEMO_NAME, prompt=prompt, max_tokens=n, temperature=0,
                                                  extra_body={"min_tokens": n}, stream=True,
                                                  stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        return chunks

    async def main():
        async with async_openai_client(server.url) as aclient:
            return await asyncio.gather(*(one(aclient, p, n) for p, n in zip(prompts, lengths)))

    results = asyncio.run(main())
    for prompt, n, chunks in zip(prompts, lengths, results):
        usage = chunks[-1].usage
        assert usage.completion_tokens == n and usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert chunks[-2].choices[0].finish_reason == "length"
    # The engine ran them together: more than one request per step on average.
    m = metrics(server.url)
    assert m["kogpt_requests_running"] == 0 and m["kogpt_kv_blocks_used"] == 0


BAD = [  # (what, request fields, status, parameter named)
    ("temperature < 0", dict(temperature=-0.5), 400, "temperature"),
    ("top_p = 0", dict(top_p=0), 400, "top_p"),
    ("top_p > 1", dict(top_p=1.5), 400, "top_p"),
    ("n < 1", dict(n=0), 400, "n"),
    ("max_tokens past n_positions", dict(max_tokens=600), 400, "max_tokens"),
    ("negative max_tokens", dict(max_tokens=-1), 400, "max_tokens"),
    ("unknown model", dict(model="gpt-4"), 400, "model"),
    ("unknown field", dict(extra_body={"bogus_field": 1}), 400, "bogus_field"),
    ("logprobs > 5", dict(logprobs=6), 400, "logprobs"),
    ("presence_penalty > 2", dict(presence_penalty=2.5), 400, "presence_penalty"),
    ("negative seed", dict(seed=-1), 400, "seed"),
    ("min_tokens > max_tokens", dict(max_tokens=4, extra_body={"min_tokens": 5}), 400, "min_tokens"),
    ("an empty stop string", dict(stop=[""]), 400, "stop"),
    ("best_of > n", dict(best_of=3), 400, "best_of"),
    ("an empty prompt", dict(prompt=""), 400, "prompt"),
    ("an empty prompt list", dict(prompt=[]), 400, "prompt"),
    ("a token id outside the vocabulary", dict(prompt=[5, 99999]), 400, "prompt"),
    ("a negative token id", dict(prompt=[[5, -1]]), 400, "prompt"),
    ("a prompt of the wrong type", dict(extra_body={"prompt": 5}), 400, "prompt"),
    ("a string for max_tokens", dict(extra_body={"max_tokens": "8"}), 400, "max_tokens"),
    ("a fractional n", dict(extra_body={"n": 1.5}), 400, "n"),
    ("top_k < 0", dict(extra_body={"top_k": -1}), 400, "top_k"),
    ("repetition_penalty 0", dict(extra_body={"repetition_penalty": 0}), 400, "repetition_penalty"),
    ("n too large", dict(n=1000), 400, "n"),
]


@pytest.mark.parametrize("what,fields,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_that_the_client_raises(client, what, fields, status, param):
    kwargs = dict(model=DEMO_NAME, prompt="국회는", max_tokens=4)
    kwargs.update(fields)
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**kwargs)
    error = raised.value
    assert error.status_code == status
    assert error.body["param"] == param and error.body["type"] == "invalid_request_error"
    assert param in error.message  # the message names the parameter


def test_malformed_json_and_a_non_object_are_400s(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b"", b'{"model": "x", "prompt": "\xff\xfe"}', b'{"model": "x", "prompt": "'):
        response = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_the_api_key_is_required_on_v1_only(server):
    with pytest.raises(openai.AuthenticationError) as raised:
        openai_client(server.url, api_key="wrong").completions.create(model=DEMO_NAME, prompt="국회는", max_tokens=2)
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": DEMO_NAME, "prompt": "x"}, timeout=30)
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # probes and Prometheus need no key
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200


def test_chat_completions_are_refused_without_a_chat_template(client):
    with pytest.raises(openai.BadRequestError, match="no chat template") as raised:
        client.chat.completions.create(model=DEMO_NAME, messages=[{"role": "user", "content": "안녕"}])
    assert "/v1/completions" in raised.value.message


def test_models_health_and_unknown_paths(server, client):
    assert [m.id for m in client.models.list().data] == [DEMO_NAME]
    assert client.models.retrieve(DEMO_NAME).id == DEMO_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    response = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert response.status_code == 404 and "error" in response.json()


def test_metrics_list_what_the_readme_says(server, client):
    long_prompt = list(range(10, 60))  # three full KV blocks of 16: the second time, found in the prefix cache
    for _ in range(2):
        client.completions.create(model=DEMO_NAME, prompt=long_prompt, max_tokens=3, temperature=0)
    m = metrics(server.url)
    for name in ("kogpt_prompt_tokens_total", "kogpt_generation_tokens_total", "kogpt_requests_running",
                 "kogpt_requests_waiting", "kogpt_kv_blocks_used", "kogpt_kv_blocks_free", "kogpt_kv_blocks_cached",
                 "kogpt_kv_blocks_total", "kogpt_prefix_cache_hit_rate", "kogpt_engine_preemptions_total",
                 "kogpt_time_to_first_token_seconds_count", "kogpt_inter_token_latency_seconds_count",
                 "kogpt_request_duration_seconds_count", "kogpt_engine_steps_total"):
        assert name in m, name
    assert m['kogpt_http_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m['kogpt_completion_choices_total{finish_reason="length"}'] >= 1
    assert m["kogpt_time_to_first_token_seconds_count"] >= 1 and m["kogpt_generation_tokens_total"] >= 3
    assert m["kogpt_kv_blocks_used"] + m["kogpt_kv_blocks_cached"] + m["kogpt_kv_blocks_free"] == \
        m["kogpt_kv_blocks_total"]
    assert 0 < m["kogpt_prefix_cache_hit_rate"] <= 1


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "unstreamed"])
def test_a_client_that_disconnects_aborts_its_request_and_frees_its_blocks(server, stream):
    before = metrics(server.url)
    body = json.dumps({"model": DEMO_NAME, "prompt": PROMPTS[2], "max_tokens": 400, "min_tokens": 400,
                       "stream": stream}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
        connection.sendall(request)
        if stream:  # the headers and a few tokens' events
            wait_for(lambda: connection.recv(65536).count(b"data: ") > 0)
        # Running and holding blocks (unstreamed: nothing comes until the end).
        wait_for(lambda: metrics(server.url)["kogpt_kv_blocks_used"] > 0)
    # The connection is closed, hundreds of tokens before the request would end.
    after = wait_for(lambda: (m := metrics(server.url))["kogpt_kv_blocks_used"] == 0 and m)
    assert after["kogpt_requests_running"] == 0 and after["kogpt_requests_waiting"] == 0
    assert after["kogpt_engine_requests_aborted_total"] == before["kogpt_engine_requests_aborted_total"] + 1
    assert after["kogpt_generation_tokens_total"] - before["kogpt_generation_tokens_total"] < 400


def test_the_readmes_openai_example_runs(server):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if block.startswith("# the openai client on kogpt-fast serve")]
    assert code.count("http://127.0.0.1:8000") == 1 and code.count('"sk-local"') == 1
    code = code.replace("http://127.0.0.1:8000", server.url).replace('"sk-local"', f'"{API_KEY}"')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert "completion_tokens=24" in first and len(second) > 5
