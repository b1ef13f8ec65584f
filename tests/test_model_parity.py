"""Greedy decoding on the torch backend (CPU, fp32) equals HF GPTJForCausalLM (eager) token for token."""
from __future__ import annotations

import pytest
import torch

from hf_reference import hf_greedy, left_padded_batch, random_hf_model
from kogpt_fast import KoGPTForCausalLM

CONFIGS = {
    # KoGPT's head geometry: head_dim 256, rotary_dim 64.
    "kogpt_heads": dict(n_embd=512, n_head=2, rotary_dim=64, n_layer=2),
    # Another geometry: head_dim 32, rotary on half of it, explicit n_inner, tied embeddings, 3 layers.
    "small_heads": dict(n_embd=96, n_head=3, rotary_dim=16, n_layer=3, n_inner=200, tie_word_embeddings=True),
    # rotary over the whole head, the other tanh-GELU spelling.
    "full_rotary": dict(n_embd=128, n_head=4, rotary_dim=32, n_layer=2, activation_function="gelu_pytorch_tanh"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(HF reference model, our model loaded from the reference's saved checkpoint)."""
    hf = random_hf_model(seed=len(request.param), **CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = KoGPTForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    return hf, ours


def assert_same_and_varied(expected: torch.Tensor, got: torch.Tensor, prompt_len: int) -> None:
    new = expected[:, prompt_len:]
    # The reference's own tokens must vary, or equality would prove little.
    assert len(set(new.flatten().tolist())) > 2, f"reference output is degenerate: {new.tolist()}"
    assert got.shape == expected.shape and torch.equal(got, expected), (
        f"tokens differ:\nexpected {expected[:, prompt_len:].tolist()}\ngot      {got[:, prompt_len:].tolist()}"
    )


@pytest.mark.parametrize("prompt_len", [1, 7, 33])
def test_greedy_unpadded_prompts(pair, prompt_len):
    hf, ours = pair
    ids = torch.randint(2, hf.config.vocab_size, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = hf_greedy(hf, ids, torch.ones_like(ids), max_new_tokens=12)
    assert_same_and_varied(expected, ours.generate(ids, max_new_tokens=12), prompt_len)


@pytest.mark.parametrize("n_new", [4, 1])
def test_greedy_prompt_near_n_positions(pair, n_new):
    """Up to n_positions + 1 tokens in all: the last new token is never fed back, so it needs no position."""
    hf, ours = pair
    prompt_len = hf.config.n_positions - n_new + 1
    ids = torch.randint(2, hf.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(5))
    expected = hf_greedy(hf, ids, torch.ones_like(ids), max_new_tokens=n_new)
    got = ours.generate(ids, max_new_tokens=n_new)
    assert torch.equal(got, expected), (expected[:, prompt_len:], got[:, prompt_len:])
    assert got.shape[1] == hf.config.n_positions + 1
    with pytest.raises(ValueError, match=rf"n_positions={hf.config.n_positions}\): at most {n_new} new tokens? fits? "
                                         rf"after this prompt \(max_new_tokens={n_new}, or max_length={prompt_len + n_new}\)"):
        ours.generate(ids, max_new_tokens=n_new + 1)


def test_greedy_left_padded_batch(pair):
    hf, ours = pair
    ids, mask = left_padded_batch([5, 1, 17, 9], hf.config.vocab_size, pad=hf.config.eos_token_id)
    expected = hf_greedy(hf, ids, mask, max_new_tokens=10)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert_same_and_varied(expected, got, ids.shape[1])
    # Each row alone gives the same tokens as inside the batch.
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        assert torch.equal(ours.generate(alone, max_new_tokens=10)[0, -10:], got[row, -10:])


def test_eos_stops_one_row_while_others_continue(pair):
    hf, ours = pair
    ids, mask = left_padded_batch([6, 3, 11], hf.config.vocab_size, pad=0, seed=3)
    free_run = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    # Declare row 0's third new token to be an end-of-sequence token.
    stop = int(free_run[0, ids.shape[1] + 2])
    kwargs = dict(max_new_tokens=10, eos_token_id=stop, pad_token_id=0)
    expected = hf_greedy_with(hf, ids, mask, **kwargs)
    got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)
    row0 = got[0, ids.shape[1]:].tolist()
    first = row0.index(stop)
    assert first <= 2 and all(t == 0 for t in row0[first + 1:]), row0
    others_continue = any(stop not in got[r, ids.shape[1]:].tolist() for r in (1, 2))
    assert others_continue and got.shape[1] > ids.shape[1] + first + 1


def hf_greedy_with(hf, ids, mask, **kwargs):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_demo_checkpoint_greedy_equals_hf(dtype):
    """fp32, and fp16 too: the reference rounds where HF eager rounds (q, k upcast; probabilities cast down)."""
    from transformers import GPTJForCausalLM

    from kogpt_fast import KoGPTTokenizer, demo_model_path

    path = demo_model_path()
    hf = GPTJForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    ours = KoGPTForCausalLM.from_pretrained(device="cpu", dtype=dtype, backend="torch")
    tokenizer = KoGPTTokenizer.from_pretrained()
    prompts = ["대한민국은", "국회는", "모든 국민은", "대통령은", "제1조", "법률안"]
    batch = tokenizer(prompts, return_tensors="pt")
    expected = hf_greedy(hf, batch.input_ids, batch.attention_mask, max_new_tokens=40)
    got = ours.generate(**batch, max_new_tokens=40, pad_token_id=hf.config.eos_token_id)
    assert_same_and_varied(expected, got, batch.input_ids.shape[1])
    for prompt, row in zip(prompts, tokenizer.batch_decode(got, skip_special_tokens=True)):
        assert row.startswith(prompt) and len(row) > len(prompt) + 10


def test_generation_stops_when_the_last_row_finishes(pair):
    """HF stops at the step where every row has produced eos; the output is cut there, whatever ran after."""
    hf, ours = pair
    ids, mask = left_padded_batch([6, 3, 11], hf.config.vocab_size, pad=0, seed=3)
    free_run = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30)
    new = free_run[:, ids.shape[1]:]
    for stop_step in (1, 9, 13):  # around the host's stop checks (every 8 steps)
        # The eos ids: each row's token at stop_step or earlier, so that every row has finished by then.
        eos = sorted({int(new[r, min(stop_step, 2 * r)]) for r in range(3)})
        kwargs = dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
        expected = hf_greedy_with(hf, ids, mask, **kwargs)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(got, expected), (stop_step, expected[:, ids.shape[1]:], got[:, ids.shape[1]:])
        assert got.shape[1] <= ids.shape[1] + stop_step + 1
