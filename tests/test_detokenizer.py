"""The server's text pieces: IncrementalDetokenizer's pieces add up to the decoded text (leading spaces, characters
split across byte-fallback tokens, special tokens, ids beyond the tokenizer), and StopStrings finds the first stop
string and holds back only what could begin one."""
from __future__ import annotations

import random

import pytest

from kogpt_fast import KoGPTTokenizer
from kogpt_fast.serving.detokenizer import WINDOW_TOKENS, IncrementalDetokenizer, StopStrings, prompt_pieces

TEXTS = ["국회는 법률에 의하여 회의 요구한 후임자 과반수의 찬성이 있거나 의장이 국가의 안전보장을 할 수 있다.",
         "대한민국은 민주공화국이다. 제2조 ① 대한민국의 국민이 되는 요건은 법률로 정한다.",
         "emoji 😀 and ÅÄÖ, 漢字, tabs\tand  double  spaces"]


@pytest.fixture(scope="module")
def tokenizer():
    return KoGPTTokenizer.from_pretrained()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_decoded_text_after_any_context(tokenizer, text):
    ids = tokenizer.encode(text * 3)
    assert len(ids) > 2 * WINDOW_TOKENS  # long enough to restart the window
    for cut in (1, 2, 5, len(ids) // 2):
        context, new = ids[:cut], ids[cut:]
        detokenizer = IncrementalDetokenizer(tokenizer, context)
        pieces = [detokenizer.add(t) for t in new]
        whole, before = tokenizer.decode(ids, skip_special_tokens=True), tokenizer.decode(context)
        assert before + "".join(pieces) == whole, cut
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in whole
    assert "".join(prompt_pieces(tokenizer, ids)) == tokenizer.decode(ids)


def test_a_character_split_over_byte_tokens_comes_whole(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # byte fallback: one character, several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("웃음 "))
    pieces = [detokenizer.add(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1].endswith("😀")


def test_special_tokens_and_unknown_ids_add_nothing(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("국회는"))
    ids = tokenizer.encode(" 법률에")
    pieces = [detokenizer.add(t) for t in [ids[0], tokenizer.eos_token_id, len(tokenizer) + 5, *ids[1:]]]
    assert pieces[1] == pieces[2] == "" and "".join(pieces) == " 법률에"


def test_peek_is_the_text_add_would_give(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("국회는"))
    rng = random.Random(0)
    for token in tokenizer.encode(TEXTS[0]):
        alternative = rng.randrange(2, len(tokenizer))
        twin = IncrementalDetokenizer(tokenizer, [])
        twin.ids, twin._start, twin._given = list(detokenizer.ids), detokenizer._start, detokenizer._given
        peeked = detokenizer.peek(alternative)
        assert peeked == twin.add(alternative) or twin.add(alternative) == "" and peeked.endswith("\ufffd")
        detokenizer.add(token)


def test_stop_strings_first_match_and_what_may_be_sent():
    stops = StopStrings(["법률", "XYZ"])
    assert stops.sendable("국회는 법") == len("국회는 ")  # "법" could begin "법률"
    assert stops.find("국회는 법") is None
    assert stops.find("국회는 법률에") == len("국회는 ")
    assert StopStrings(["XYZ"]).sendable("abcXY") == 3 and StopStrings(["XYZ"]).sendable("abcX Y") == 6
    # The earliest of several matches; one found across two calls.
    stops = StopStrings(["cd", "b"])
    assert stops.find("a") is None and stops.find("abcd") == 1
    stops = StopStrings(["hello"])
    assert stops.find("say hel") is None and stops.find("say hello") == 4


def test_matches_before_min_tokens_are_skipped():
    stops = StopStrings(["ab"])
    stops.skip("xab")  # produced before min_tokens: may not end the text
    assert stops.find("xabz") is None
    assert stops.find("xabzab") == 4
