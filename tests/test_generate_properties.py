"""Property-based tests of generate(): any argument mix either works as HF defines it or is refused by name."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis (a test extra) is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM

VOCAB, N_POSITIONS = 37, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = random_hf_model(seed=9, n_embd=32, n_head=2, rotary_dim=8, n_layer=1, vocab_size=VOCAB, n_positions=N_POSITIONS)
    path = tmp_path_factory.mktemp("prop")
    hf.save_pretrained(path)
    return KoGPTForCausalLM.from_pretrained(path, device="cpu", backend="torch")


numbers = st.one_of(st.integers(-3, 60), st.floats(-2, 3), st.just(float("nan")), st.none(), st.just("1"))
arguments = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": numbers,
        "max_length": numbers,
        "do_sample": st.booleans(),
        "temperature": numbers,
        "top_k": numbers,
        "top_p": numbers,
        "repetition_penalty": numbers,
        "num_return_sequences": st.integers(-1, 3),
        "eos_token_id": st.one_of(st.integers(-2, VOCAB + 2), st.lists(st.integers(0, VOCAB - 1), max_size=3)),
    },
)
prompts = st.lists(st.lists(st.integers(-1, VOCAB), min_size=1, max_size=8), min_size=1, max_size=3)


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=prompts, kwargs=arguments)
def test_generate_works_or_refuses_by_name(model, rows, kwargs):
    ids, mask = left_pad(rows)
    try:
        out = model.generate(ids, attention_mask=mask, seed=0, **kwargs)
    except (ValueError, TypeError, NotImplementedError) as e:
        message = str(e)
        named = [k for k in (*kwargs, "input_ids", "n_positions", "token id") if k in message]
        assert named, f"error does not name the offending argument: {message!r} for {kwargs}"
        return
    assert out.dtype == torch.long and out.shape[0] == ids.shape[0] * kwargs.get("num_return_sequences", 1)
    assert torch.equal(out[:: kwargs.get("num_return_sequences", 1), : ids.shape[1]], ids)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert model.kv_cache.allocator.num_free == model.kv_cache.num_blocks  # nothing leaked
