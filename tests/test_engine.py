"""The serving engine on the torch backend in fp32: each request's greedy tokens equal generate() on that request
alone, with arrivals at different steps, chunked prefill, prefix-cache hits and preemptions forced; seeded sampling
is reproducible whatever else is in the batch; eos, stop sequences, length limits, logprobs; abort; bad input."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import one_cpu_thread  # noqa: F401  (an autouse fixture)
from engine_helpers import (
    StepLog, assert_greedy_equals_generate, assert_pool_is_clean, blocks_written_by_each_step, generate_alone,
    random_prompts, run_arrivals,
)
from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM
from kogpt_fast.kv_cache import build_step_metadata
from kogpt_fast.serving import Engine, QueueFull, SamplingParams


@pytest.fixture(scope="module")
def demo():
    return KoGPTForCausalLM.from_pretrained(None, device="cpu", dtype=torch.float32, backend="torch")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random GPT-J with KoGPT's head geometry at toy size; 4-token blocks, so prompts span many of them."""
    hf = random_hf_model(seed=5, n_positions=96, vocab_size=211, n_embd=256, n_head=1, rotary_dim=64)
    path = tmp_path_factory.mktemp("engine_small")
    hf.save_pretrained(path)
    model = KoGPTForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    model.kv_block_size = 4
    return model


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, **kw)


@pytest.mark.parametrize("engine_kwargs", [
    dict(max_batch_tokens=48, max_running=5, num_blocks=24),  # 384 tokens for the ~1200 the requests want
    dict(max_batch_tokens=33, max_running=7, num_blocks=45, block_size=8),  # 360 tokens, odd chunks
], ids=["blocks16", "blocks8"])
def test_demo_greedy_equals_generate_with_chunks_prefix_hits_and_preemptions(demo, engine_kwargs):
    """Prompts of 1 to n_positions / 2 tokens arrive over several steps into a pool too small for all of them."""
    v, half = demo.config.vocab_size, demo.config.n_positions // 2
    prompts = random_prompts([1, 17, half, 40, 100, 3, 200, 64], v, seed=1)
    engine = Engine(demo, **engine_kwargs)
    log = StepLog(engine)
    # Some may stop at eos early; the others (min_new_tokens) grow until the pool must preempt.
    params = [greedy(n, min_new_tokens=n if i % 2 else 0) for i, n in enumerate([24, 32, 16, 28, 24, 20, 24, 28])]
    requests = run_arrivals(engine, [(0, list(zip(prompts[:3], params[:3]))), (3, list(zip(prompts[3:5], params[3:5])))],
                            finish=False)
    long_prompt = requests[4]
    while long_prompt.num_computed < 96:  # its first 6 blocks are cached and in use: a later prompt shares them
        engine.step()
    shared = prompts[4][:80] + random_prompts([30], v, seed=2)[0]
    requests += run_arrivals(engine, [(0, [(shared, greedy(16)), (prompts[4], greedy(8))]),
                                      (2, list(zip(prompts[5:], params[5:])))])
    stats = engine.stats()
    assert stats.preemptions > 0 and log.chunked() and log.mixed(), stats
    assert requests[5].num_cached_prompt == 80 and requests[6].num_cached_prompt == 96, stats
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    assert sum(r.num_preemptions for r in requests) == stats.preemptions
    allowed = assert_greedy_equals_generate(demo, requests)
    assert allowed == 0, f"{allowed} near-tie differences on the demo model"
    assert_pool_is_clean(engine)


def test_small_gptj_greedy_equals_generate(small):
    v = small.config.vocab_size
    prompts = random_prompts([1, 5, 48, 23, 9, 40, 2], v, seed=3)
    engine = Engine(small, max_batch_tokens=16, max_running=4, num_blocks=24)
    log = StepLog(engine)
    params = [greedy(n, min_new_tokens=n) for n in (30, 12, 20, 8, 25, 16, 30, 10)]  # no early eos: long runs
    requests = run_arrivals(engine, [(0, list(zip(prompts[:3], params[:3])))], finish=False)
    while requests[2].num_computed < 30:
        engine.step()
    shared = prompts[2][:30] + [7, 8, 9]  # a hit of 7 blocks of 4, admitted at the next step
    requests += run_arrivals(engine, [(0, [(shared, params[7])] + list(zip(prompts[3:], params[3:7])))])
    assert engine.stats().preemptions > 0 and log.chunked() and log.mixed()
    assert requests[3].num_cached_prompt == 28
    assert assert_greedy_equals_generate(small, requests) == 0
    assert_pool_is_clean(engine)


def test_repetition_penalty_and_min_new_tokens_as_generate(small):
    prompts = random_prompts([6, 13], small.config.vocab_size, seed=4)
    engine = Engine(small, max_batch_tokens=8)
    params = [greedy(16, repetition_penalty=1.8), greedy(12, min_new_tokens=12)]
    requests = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    engine.run()
    assert requests[0].output_ids == generate_alone(small, requests[0], repetition_penalty=1.8)
    assert requests[1].output_ids == generate_alone(small, requests[1])


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(small):
    v = small.config.vocab_size
    prompt = random_prompts([11], v, seed=5)[0]
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24, do_sample=True, temperature=5.0, top_k=40,
                            top_p=0.95, seed=1234)  # hot: the random model's distributions are sharp
    alone = Engine(small)
    expected = alone.add_request(prompt, params)
    alone.run()
    # The same request among others (greedy, other seeds, penalties), arriving late, in a pool that preempts.
    busy = Engine(small, max_batch_tokens=12, max_running=4, num_blocks=20)
    others = [(p, SamplingParams(max_new_tokens=20, do_sample=True, seed=s, temperature=0.8, presence_penalty=0.5))
              for s, p in enumerate(random_prompts([30, 3, 17], v, seed=6))]
    requests = run_arrivals(busy, [(0, others), (3, [(prompt, params)]), (1, [(others[0][0], greedy(10))])])
    assert busy.stats().preemptions > 0
    assert requests[3].output_ids == expected.output_ids
    assert len(set(expected.output_ids)) > 5
    # generate() draws the same tokens from the same seed (one row: the same processors, the same RNG stream).
    assert expected.output_ids == generate_alone(small, expected, do_sample=True, temperature=5.0, top_k=40,
                                                 top_p=0.95, seed=1234)
    other_seed = Engine(small)
    different = other_seed.add_request(prompt, params.replace(seed=4321))
    other_seed.run()
    assert different.output_ids != expected.output_ids


def test_temperature_zero_is_greedy(small):
    prompt = random_prompts([9], small.config.vocab_size, seed=7)[0]
    engine = Engine(small)
    a = engine.add_request(prompt, SamplingParams(max_new_tokens=10, do_sample=True, temperature=0))
    b = engine.add_request(prompt, greedy(10))
    engine.run()
    assert a.output_ids == b.output_ids == generate_alone(small, b)


def test_eos_stop_sequences_and_lengths(small):
    prompt = random_prompts([7], small.config.vocab_size, seed=8)[0]
    engine = Engine(small)
    reference = engine.add_request(prompt, greedy(20, eos_token_ids=()))
    engine.run()
    out = reference.output_ids
    assert reference.finish_reason == "length" and len(out) == 20
    eos = out[5]  # the 6th new token as eos: the request stops with it, unless min_new_tokens holds it back
    stop_at = out.index(eos)
    stop = tuple(out[8:10])
    requests = [
        engine.add_request(prompt, greedy(20, eos_token_ids=(eos,))),
        engine.add_request(prompt, greedy(20, eos_token_ids=(), stop=(stop, (5000 % 211, 1)))),
        engine.add_request(prompt, greedy(0)),
    ]
    engine.run()
    assert requests[0].output_ids == out[:stop_at + 1] and requests[0].finish_reason == "stop"
    assert requests[0].stop_sequence == (eos,)
    first = next(i for i in range(1, 20) if tuple(out[i - 1:i + 1]) == stop)
    assert requests[1].output_ids == out[:first + 1] and requests[1].stop_sequence == stop
    assert requests[2].output_ids == [] and requests[2].finish_reason == "length" and requests[2].finished
    events = list(engine.stream(requests[2]))
    assert len(events) == 1 and events[0].finished and events[0].token_ids == []


def test_stream_yields_each_token_as_it_comes_with_timing(small):
    prompts = random_prompts([5, 30], small.config.vocab_size, seed=9)
    engine = Engine(small, max_batch_tokens=8)
    slow = engine.add_request(prompts[1], greedy(6))
    fast = engine.add_request(prompts[0], greedy(4))
    events = list(engine.stream(fast))
    assert [t for e in events for t in e.token_ids] == fast.output_ids and len(events) == 4
    assert events[-1].finished and events[-1].finish_reason == "length" and not any(e.finished for e in events[:-1])
    assert not slow.finished and slow.events  # stepping for one request advanced the other; its events wait
    assert fast.arrival_time <= fast.first_token_time == fast.token_times[0] <= fast.token_times[-1]
    rest = list(engine.stream(slow))
    assert [t for e in rest for t in e.token_ids] == slow.output_ids


def full_logits(model, ids):
    """fp32 logits [T, V] at every position of one prompt: one prefill asking for all rows (logits_indices)."""
    cache = model.cache_for([len(ids)])
    cache.start([len(ids)])
    try:
        meta = cache.plan([len(ids)], torch.arange(len(ids)), is_prefill=True)
        meta.logits_indices = torch.arange(len(ids))
        return model.forward_step(torch.tensor(ids), meta, cache)
    finally:
        cache.release()


def test_logprobs_and_prompt_logprobs(small):
    prompt = random_prompts([21], small.config.vocab_size, seed=10)[0]
    engine = Engine(small, max_batch_tokens=8)  # the prompt runs in three chunks
    request = engine.add_request(prompt, greedy(5, logprobs=3, prompt_logprobs=2))
    events = list(engine.stream(request))
    expected = torch.log_softmax(full_logits(small, prompt + request.output_ids), dim=-1)
    assert events[0].prompt_logprobs is not None and all(e.prompt_logprobs is None for e in events[1:])
    prompt_lps = events[0].prompt_logprobs
    assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None
    for i, lp in enumerate(prompt_lps[1:], start=1):
        assert lp.token_id == prompt[i]
        assert lp.logprob == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-4)
        top = expected[i - 1].topk(2)
        assert [t for t, _ in lp.top] == top.indices.tolist()
    for j, lp in enumerate(request.logprobs):
        row = len(prompt) - 1 + j
        assert lp.token_id == request.output_ids[j] == expected[row].argmax().item()
        assert lp.logprob == pytest.approx(expected[row].max().item(), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id
    assert [e.logprobs[0] for e in events] == request.logprobs
    # max_new_tokens=0 with prompt logprobs (echo, scoring a text): the prompt runs, nothing is sampled.
    scored = engine.add_request(prompt, greedy(0, prompt_logprobs=0))
    (event,) = list(engine.stream(scored))
    assert event.finished and event.finish_reason == "length" and scored.output_ids == []
    assert [lp.logprob for lp in event.prompt_logprobs[1:]] == pytest.approx(
        [lp.logprob for lp in prompt_lps[1:]], abs=1e-5)
    assert_pool_is_clean(engine)


def test_abort_frees_blocks_at_the_next_step_and_others_go_on(small):
    prompts = random_prompts([30, 12], small.config.vocab_size, seed=11)
    engine = Engine(small, max_batch_tokens=64, prefix_caching=False)
    victim = engine.add_request(prompts[0], greedy(40, min_new_tokens=40))
    other = engine.add_request(prompts[1], greedy(10, min_new_tokens=10))
    for _ in range(3):
        engine.step()
    held = engine.blocks.num_used
    assert len(victim.blocks) > 0 and held > len(victim.blocks)
    engine.abort(victim)
    engine.step()
    assert victim.finished and victim.finish_reason == "abort" and victim.blocks == []
    assert engine.blocks.num_used == len(other.blocks) and victim.events[-1].finish_reason == "abort"
    engine.abort(victim)  # again: nothing happens
    waiting = engine.add_request(prompts[0], greedy(5))
    engine.abort(waiting)  # before it ever ran
    engine.run()
    assert waiting.finish_reason == "abort" and waiting.output_ids == []
    assert other.output_ids == generate_alone(small, other)
    stats = engine.stats()
    assert stats.requests_aborted == 2 and stats.requests_finished == 1
    assert_pool_is_clean(engine)


@pytest.mark.parametrize("prompt, params, match", [
    ([], None, "prompt_ids is empty"),
    ([3, 211], None, r"prompt_ids holds 211, not a token id in the vocabulary \[0, 211\)"),
    ([3, -1], None, "prompt_ids holds -1"),
    ([3, 2.0], None, "prompt_ids holds 2.0"),
    (torch.tensor([1.0, 2.0]), None, "integer token ids"),
    ([3, 4], SamplingParams(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    ([3, 4], SamplingParams(max_new_tokens=4, min_new_tokens=5), r"min_new_tokens must be an integer in \[0, 4\]"),
    ([3] * 90, SamplingParams(max_new_tokens=8), "needs 97 positions, beyond the model's n_positions=96"),
    ([3, 4], SamplingParams(temperature=-0.5, do_sample=True), "temperature must be"),
    ([3, 4], SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([3, 4], SamplingParams(top_k=-1), "top_k must be"),
    ([3, 4], SamplingParams(repetition_penalty=0), "repetition_penalty must be"),
    ([3, 4], SamplingParams(presence_penalty=3), r"presence_penalty must be in \[-2, 2\]"),
    ([3, 4], SamplingParams(frequency_penalty=float("nan")), "frequency_penalty must be"),
    ([3, 4], SamplingParams(eos_token_ids=(300,)), "eos_token_ids holds ids outside the vocabulary"),
    ([3, 4], SamplingParams(stop=((),)), "stop must be a list of non-empty"),
    ([3, 4], SamplingParams(logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
    ([3, 4], SamplingParams(seed=-3, do_sample=True), "seed must be"),
])
def test_bad_input_is_refused_at_add_request_and_the_engine_keeps_serving(small, prompt, params, match):
    engine = Engine(small)
    good = engine.add_request([5, 6, 7], greedy(6))
    engine.step()
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    engine.run()
    assert good.output_ids == generate_alone(small, good)
    assert engine.stats().waiting == 0 and engine.stats().requests_finished == 1
    assert_pool_is_clean(engine)


def test_a_request_too_large_for_the_pool_is_refused(small):
    engine = Engine(small, num_blocks=5)  # 20 tokens
    with pytest.raises(ValueError, match="needs 6 KV blocks of 4 tokens, more than the engine's pool of 5"):
        engine.add_request(list(range(2, 20)), greedy(6))
    fits = engine.add_request(list(range(2, 16)), greedy(6))  # 14 + 5 fed tokens: 5 blocks
    engine.run()
    assert fits.output_ids == generate_alone(small, fits)


def test_the_waiting_queue_is_bounded(small):
    engine = Engine(small, max_waiting=2)
    first = [engine.add_request([3, 4], greedy(2)) for _ in range(2)]
    with pytest.raises(QueueFull, match="waiting queue is full"):
        engine.add_request([3, 4], greedy(2))
    engine.run()
    assert all(r.finished for r in first)
    engine.add_request([3, 4], greedy(2))  # room again


def test_padded_decode_rows_write_only_the_scratch_block(small):
    """Decode steps padded to a bucket (as the CUDA graphs are): the padding writes only the scratch block, and the
    tokens are those of exact-size steps."""
    prompts = random_prompts([5, 9, 14], small.config.vocab_size, seed=12)
    exact = Engine(small, prefix_caching=False)
    expected = [exact.add_request(p, greedy(12, min_new_tokens=12)) for p in prompts]
    exact.run()
    padded = Engine(small, prefix_caching=False, decode_buckets=(4, 8))
    requests = [padded.add_request(p, greedy(12, min_new_tokens=12)) for p in prompts]
    padded.step()  # the prompts
    scratch_written = blocks_written_by_each_step(padded)
    sizes = set(padded._decode_steps)
    assert scratch_written and sizes == {4} and [r.output_ids for r in requests] == [r.output_ids for r in expected]


def test_stats_count_blocks_and_tokens(small):
    engine = Engine(small, num_blocks=30, max_batch_tokens=6)
    prompt = list(range(2, 15))  # 13 tokens: 3 full blocks of 4
    engine.add_request(prompt, greedy(4, min_new_tokens=4))
    engine.step()
    s = engine.stats()
    assert (s.running, s.waiting, s.blocks_used, s.blocks_total) == (1, 0, 2, 30)  # 6 tokens of the prompt so far
    assert s.blocks_used + s.blocks_cached + s.blocks_free == 30
    engine.run()
    s = engine.stats()
    assert s.blocks_used == 0 and s.blocks_cached == 4 and s.generated_tokens == 4 and s.prompt_tokens == 13
    assert s.computed_tokens == 13 + 3 and s.requests_finished == 1
    engine.add_request(prompt, greedy(2))
    engine.run()
    s = engine.stats()
    assert s.prefix_cache_hit_rate == pytest.approx(12 / 26)  # 3 of the 13-token prompt's blocks, second time


def test_chunked_extend_logits_equal_one_prefill(small):
    """forward_step over a prompt in chunks (extend attention over the cached part) gives the logits of one prefill;
    logits_indices picks rows."""
    prompt = random_prompts([19], small.config.vocab_size, seed=13)[0]
    expected = full_logits(small, prompt)
    cache = small.cache_for([19])
    cache.start([19])
    try:
        got = []
        table = cache.tables[0]
        for start, end in [(0, 7), (7, 8), (8, 19)]:
            meta = build_step_metadata([table], [start], [end - start], torch.arange(start, end), 4, "cpu",
                                       logits_indices=list(range(end - start)))
            assert meta.has_context == (start > 0)
            got.append(small.forward_step(torch.tensor(prompt[start:end]), meta, cache))
    finally:
        cache.release()
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-5, atol=1e-5)


def test_stop_strings_as_generate(demo):
    from kogpt_fast import KoGPTTokenizer

    tokenizer = KoGPTTokenizer.from_pretrained(None)
    prompt = tokenizer.encode("국회는")
    engine = Engine(demo, tokenizer=tokenizer)
    free = engine.add_request(prompt, greedy(30, eos_token_ids=()))
    engine.run()
    text = tokenizer.decode(free.output_ids)
    stop = text[len(text) // 2:len(text) // 2 + 2].strip() or text[-2:]  # a string from the middle of the output
    stopped = engine.add_request(prompt, greedy(30, eos_token_ids=(), stop_strings=(stop, "없는문자열")))
    events = list(engine.stream(stopped))
    expected = demo.generate(torch.tensor([prompt]), max_new_tokens=30, eos_token_id=[], stop_strings=stop,
                             tokenizer=tokenizer)[0, len(prompt):].tolist()
    assert stopped.output_ids == expected and len(expected) < 30
    assert events[-1].finish_reason == "stop" and events[-1].stop_string == stop
    assert stop in tokenizer.decode(stopped.output_ids)
    with pytest.raises(ValueError, match="stop_strings need the model's tokenizer"):
        Engine(demo).add_request(prompt, greedy(4, stop_strings=("x",)))
    with pytest.raises(ValueError, match="stop_strings must be a list of non-empty strings"):
        engine.add_request(prompt, greedy(4, stop_strings="x"))
