"""What apps read from generate(), against HF transformers 5.17 on the same model: scores and logits
(return_dict_in_generate), stop strings, TextIteratorStreamer from a thread, HF-style logits processors and stopping
criteria in HF's order; and KoGPTForCausalLM.from_hf over an HF model's own tensors."""
from __future__ import annotations

import threading

import pytest
import torch
import transformers

from hf_reference import random_hf_model
from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer
from tokenizer_fixtures import build_tokenizer_json
from tolerance import ATOL

PROMPTS = ["대한민국은 민주공화국이다.", "The model"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hf model, ours from its checkpoint, HF's tokenizer, ours) on one byte-level BPE vocabulary."""
    directory = build_tokenizer_json(tmp_path_factory.mktemp("tok"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), padding_side="left")
    hf = random_hf_model(seed=5, n_embd=128, n_head=2, rotary_dim=32, n_layer=2, vocab_size=len(hf_tokenizer),
                         n_positions=96, attn_implementation="eager")
    hf.save_pretrained(directory)
    ours = KoGPTForCausalLM.from_pretrained(directory, device="cpu", backend="torch")
    return hf, ours, hf_tokenizer, KoGPTTokenizer.from_pretrained(directory)


def both(setup, prompts=PROMPTS, seed=None, **kwargs):
    """HF's and our generate() on the same left-padded batch, each from the same RNG state."""
    hf, ours, hf_tokenizer, tokenizer = setup
    batch = tokenizer(prompts, return_tensors="pt")
    results = []
    for model, extra in ((hf, {}), (ours, {})):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            results.append(model.generate(**batch, pad_token_id=1, **kwargs, **extra))
    return results


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)])
def test_scores_and_logits_equal_hf(setup, sampling):
    theirs, ours = both(setup, seed=3, max_new_tokens=12, return_dict_in_generate=True, output_scores=True,
                        output_logits=True, repetition_penalty=1.2, **sampling)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(theirs.scores) == len(ours.logits) == 12
    for got, want in [*zip(ours.scores, theirs.scores), *zip(ours.logits, theirs.logits)]:
        assert got.shape == want.shape and got.dtype == torch.float32
        # fp32 both, GEMMs of other shapes and layouts: a few ulps at the logits' magnitude (tests/tolerance.py's
        # fp32 bar); -inf exactly where HF has -inf (the top-k / top-p masks)
        scale = want[torch.isfinite(want)].abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL[torch.float32] * max(1.0, scale))
    if sampling:
        assert any(torch.isinf(s).any() for s in ours.scores)  # the warpers' masks are part of the scores
    assert ours.keys() == ["sequences", "scores", "logits"] and ours["scores"] is ours.scores
    assert ours[0] is ours.sequences and ours.attentions is None


def test_return_dict_without_scores_and_scores_without_return_dict(setup):
    theirs, ours = both(setup, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs.sequences) and ours.scores is None and theirs.scores is None
    theirs, ours = both(setup, max_new_tokens=4, output_scores=True)  # HF returns just the sequences
    assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs)


def middle_piece(text: str, start: int, size: int) -> str:
    for i in range(start, len(text) - size):
        piece = text[i:i + size]
        if piece.strip() and not set(piece) & set("\ufffd[]"):
            return piece
    raise AssertionError(f"no piece of {size} whole characters in {text!r}")


def test_stop_strings_stop_where_hf_stops(setup):
    hf, ours, hf_tokenizer, tokenizer = setup
    free = both(setup, max_new_tokens=30)[1]
    texts = [tokenizer.decode(row[-30:]) for row in free]
    # stop strings from the middle of each row's free-running text (whole characters, not a special token's text)
    stops = [middle_piece(texts[0], 8, 4), middle_piece(texts[1], 18, 3)]
    hf_out = hf.generate(**tokenizer(PROMPTS, return_tensors="pt"), pad_token_id=1, max_new_tokens=30,
                         stop_strings=stops, tokenizer=hf_tokenizer)
    out = ours.generate(**tokenizer(PROMPTS, return_tensors="pt"), pad_token_id=1, max_new_tokens=30,
                        stop_strings=stops, tokenizer=tokenizer)
    assert torch.equal(out, hf_out)
    assert out.shape[1] < free.shape[1]  # it stopped early, the matched text kept
    assert any(s in t for s in stops for t in tokenizer.batch_decode(out))
    with pytest.raises(ValueError, match="tokenizer="):
        ours.generate(**tokenizer(PROMPTS, return_tensors="pt"), max_new_tokens=5, stop_strings=stops)


def test_text_iterator_streamer_from_a_thread(setup):
    hf, ours, hf_tokenizer, tokenizer = setup
    texts = []
    for model, tok in ((hf, hf_tokenizer), (ours, tokenizer)):  # as in HF's docs
        inputs = tok([PROMPTS[0]], return_tensors="pt")
        streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
        thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=20,
                                                                     pad_token_id=1))
        thread.start()
        pieces = list(streamer)
        thread.join()
        texts.append("".join(pieces))
        assert len(pieces) > 1  # streamed, not delivered at the end
    assert texts[1] == texts[0] and texts[0]


def test_text_iterator_streamer_ends_when_generate_fails(setup):
    _, ours, _, tokenizer = setup
    streamer = transformers.TextIteratorStreamer(tokenizer, timeout=60)
    errors = []

    def run():
        try:
            ours.generate(tokenizer.encode("x", return_tensors="pt"), streamer=streamer, max_new_tokens=500)
        except ValueError as e:  # beyond n_positions
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert "".join(streamer) == ""  # the consumer is released at once, not by its timeout
    thread.join()
    assert len(errors) == 1 and "n_positions" in str(errors[0])


class Recorder(transformers.LogitsProcessor):
    """Records the scores it is handed and pushes token 7 up: where it runs in the chain shows in both."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        scores = scores.clone()
        scores[:, 7] += 3.0
        return scores


def test_logits_processors_run_where_hf_runs_them(setup):
    recorders = [Recorder(), Recorder()]
    suppress = transformers.SuppressTokensLogitsProcessor([9, 11], device="cpu")  # HF's own class works too
    outs = []
    for recorder, model in zip(recorders, setup[:2]):
        torch.manual_seed(4)
        outs.append(model.generate(**setup[3](PROMPTS, return_tensors="pt"), pad_token_id=1, max_new_tokens=10,
                                   do_sample=True, temperature=0.6, top_k=30, repetition_penalty=1.3,
                                   logits_processor=[recorder, suppress]))
    assert torch.equal(outs[1], outs[0])
    assert len(recorders[1].seen) == len(recorders[0].seen) == 10
    for got, want in zip(recorders[1].seen, recorders[0].seen):  # after the penalty, before temperature and top-k
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL[torch.float32] * max(1.0, want.abs().max().item()))
        assert not torch.isinf(got).any()
    assert not {9, 11} & set(outs[1][:, -10:].flatten().tolist())


class StopAfter(transformers.StoppingCriteria):
    """Row b is done once the sequence is lengths[b] long; records the scores argument HF passes."""

    def __init__(self, lengths):
        self.lengths, self.scores_seen = lengths, []

    def __call__(self, input_ids, scores, **kwargs):
        self.scores_seen.append(scores if scores is None else len(scores))
        return torch.tensor([input_ids.shape[1] >= n for n in self.lengths])


def test_stopping_criteria_as_hf(setup):
    width = setup[3](PROMPTS, return_tensors="pt").input_ids.shape[1]
    criteria = [StopAfter([width + 4, width + 7]), StopAfter([width + 4, width + 7])]
    outs = [model.generate(**setup[3](PROMPTS, return_tensors="pt"), pad_token_id=1, max_new_tokens=20,
                           stopping_criteria=[c], return_dict_in_generate=True, output_scores=True)
            for model, c in zip(setup[:2], criteria)]
    assert torch.equal(outs[1].sequences, outs[0].sequences) and outs[1].sequences.shape[1] == width + 7
    assert (outs[1].sequences[0, width + 4:] == 1).all()  # the first row is padded once it is done
    assert criteria[1].scores_seen == criteria[0].scores_seen == list(range(1, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hf_shares_the_tensors_and_gives_hf_greedy_tokens(setup, dtype):
    hf = random_hf_model(seed=8, n_embd=128, n_head=2, rotary_dim=32, n_layer=2, vocab_size=211,
                         attn_implementation="eager").to(dtype)
    ours = KoGPTForCausalLM.from_hf(hf)
    theirs = dict(hf.named_parameters())
    assert {n: p.data_ptr() for n, p in ours.named_parameters()} == {n: p.data_ptr() for n, p in theirs.items()}
    assert ours.dtype == dtype and ours.config.n_embd == 128 and ours.generation_config.eos_token_id == 1
    ids = torch.tensor([[5, 17, 33, 2, 90], [8, 8, 3, 120, 4]])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=1)
    assert torch.equal(ours.generate(ids, max_new_tokens=10), expected)
