"""generate(): HF semantics for lengths, sampling, penalties, eos, streamers, configs; argument validation."""
from __future__ import annotations

import pytest
import torch

from hf_reference import random_hf_model
from kogpt_fast import GenerationConfig, KoGPTForCausalLM

PROMPT = torch.tensor([[7, 19, 3, 44, 61, 2]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = random_hf_model(seed=11, n_embd=128, n_head=2, rotary_dim=32, n_layer=2, vocab_size=97, n_positions=64)
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, KoGPTForCausalLM.from_pretrained(path, device="cpu", backend="torch")


def hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=1, **kw)


def test_length_semantics(models):
    _, ours = models
    assert ours.generate(PROMPT).shape == (1, 20)  # HF's default max_length counts the prompt
    assert ours.generate(PROMPT, max_length=9).shape == (1, 9)
    assert ours.generate(PROMPT, max_length=9, max_new_tokens=5).shape == (1, 11)  # max_new_tokens wins
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=0), PROMPT)
    out = ours.generate(PROMPT, max_new_tokens=5)
    assert out.dtype == torch.long and torch.equal(out[:, :6], PROMPT)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(repetition_penalty=1.7, max_new_tokens=12),
        dict(min_new_tokens=6, max_new_tokens=8, eos_token_id=[4, 9]),
        dict(do_sample=True, temperature=0.7, max_new_tokens=12),
        dict(do_sample=True, top_k=5, top_p=0.8, repetition_penalty=1.2, max_new_tokens=12),
        dict(do_sample=True, top_k=0, top_p=0.5, temperature=1.3, max_new_tokens=12),
    ],
)
def test_same_tokens_as_hf(models, kwargs):
    """Greedy and sampled: the same processors in the same order draw the same tokens from the same RNG state."""
    hf, ours = models
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    torch.manual_seed(123)
    expected = hf_generate(hf, ids, **kwargs)
    torch.manual_seed(123)
    got = ours.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=1, **kwargs)
    assert torch.equal(got, expected), (expected[:, 6:], got[:, 6:])


def test_sampling_with_a_seed_is_reproducible(models):
    _, ours = models
    kw = dict(do_sample=True, temperature=1.5, max_new_tokens=16)
    a = ours.generate(PROMPT, seed=7, **kw)
    assert torch.equal(a, ours.generate(PROMPT, seed=7, **kw))
    assert torch.equal(a, ours.generate(PROMPT, generator=torch.Generator().manual_seed(7), **kw))
    assert not torch.equal(a, ours.generate(PROMPT, seed=8, **kw))


def test_top_k_1_equals_greedy(models):
    _, ours = models
    greedy = ours.generate(PROMPT, max_new_tokens=15)
    sampled = ours.generate(PROMPT, max_new_tokens=15, do_sample=True, top_k=1, temperature=2.0, seed=0)
    assert torch.equal(greedy, sampled)
    assert len(set(greedy[0, 6:].tolist())) > 2


def test_num_return_sequences(models):
    _, ours = models
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    out = ours.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=10, seed=1, temperature=2.0)
    assert out.shape == (6, 16)
    assert torch.equal(out[:3, :6], PROMPT.expand(3, -1)) and torch.equal(out[3:, :6], PROMPT.flip(1).expand(3, -1))
    assert len({tuple(r) for r in out[:3, 6:].tolist()}) > 1
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(ids, num_return_sequences=2)


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_receives_prompt_then_each_new_token(models):
    _, ours = models
    streamer = RecordingStreamer()
    out = ours.generate(PROMPT, max_new_tokens=7, streamer=streamer)
    assert torch.equal(streamer.puts[0], PROMPT)
    assert torch.cat(streamer.puts[1:]).tolist() == out[0, 6:].tolist()
    assert all(p.shape == (1,) for p in streamer.puts[1:]) and streamer.ended == 1


def test_hf_text_streamer(models, capsys):
    from transformers import TextStreamer

    class Letters:  # TextStreamer only calls decode()
        def decode(self, ids, **kw):
            return "".join(chr(ord("a") + i % 26) + " " for i in ids)

    _, ours = models
    out = ours.generate(PROMPT, max_new_tokens=6, streamer=TextStreamer(Letters(), skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == Letters().decode(out[0, 6:].tolist()).strip()


def test_generation_config_objects(models):
    from transformers import GenerationConfig as HFGenerationConfig

    _, ours = models
    ref = ours.generate(PROMPT, max_new_tokens=9)
    assert torch.equal(ours.generate(PROMPT, generation_config=HFGenerationConfig(max_new_tokens=9)), ref)
    assert torch.equal(ours.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=9)), ref)
    # keyword arguments override the config
    assert ours.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=9), max_new_tokens=3).shape[1] == 9


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(do_sample=True, temperature=-1.0), ValueError, "temperature"),
        (dict(do_sample=True, top_p=0.0), ValueError, "top_p"),
        (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
        (dict(do_sample=True, top_k=-1), ValueError, "top_k"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=100), ValueError, "n_positions=64"),
        (dict(eos_token_id=97), ValueError, "eos_token_id=97"),
        (dict(num_beams=4), NotImplementedError, "beam search"),
        (dict(max_new_token=5), TypeError, "max_new_token"),
    ],
)
def test_bad_arguments_are_refused_and_the_model_still_works(models, kwargs, error, message):
    _, ours = models
    ref = ours.generate(PROMPT, max_new_tokens=5)
    with pytest.raises(error, match=message):
        ours.generate(PROMPT, **kwargs)
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=5), ref)


@pytest.mark.parametrize(
    "ids, mask, error, message",
    [
        (None, None, ValueError, "input_ids"),
        ([[1, 2, 3]], None, TypeError, "torch.Tensor"),
        (torch.tensor([[1.0, 2.0]]), None, TypeError, "dtype"),
        (torch.tensor([1, 2, 3]), None, ValueError, "2-D"),
        (torch.zeros(1, 0, dtype=torch.long), None, ValueError, "empty"),
        (torch.tensor([[1, 97]]), None, ValueError, "token id 97"),
        (torch.tensor([[-3, 5]]), None, ValueError, "token id -3"),
        (torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.long), ValueError, "shape"),
        (torch.tensor([[1, 2]]), torch.tensor([[0, 2]]), ValueError, "0 and 1"),
        (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [0, 0]]), ValueError, r"rows \[1\] have no tokens"),
    ],
)
def test_bad_inputs(models, ids, mask, error, message):
    _, ours = models
    with pytest.raises(error, match=message):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_none_means_not_given(models):
    _, ours = models
    ref = ours.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3)
    same = ours.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, temperature=None, top_k=None, top_p=None)
    assert torch.equal(ref, same)
