"""KoGPTTokenizer against transformers' AutoTokenizer (tokenizer.json) and sentencepiece itself (tokenizer.model)."""
from __future__ import annotations

import copy
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers  # the reference (a test dependency); kogpt_fast itself never imports it

pytest.importorskip("hypothesis", reason="hypothesis (a test extra) is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizer_fixtures import KOGPT_CONFIG, build_sentencepiece_model, build_tokenizer_json, write_json

from kogpt_fast.tokenizer import BatchEncoding, KoGPTTokenizer

STRINGS = [
    "", " ", "  ", "\n", "\t\n ", "대한민국은 민주공화국이다.", "안녕하세요, 반갑습니다!", "Hello world",
    "KoGPT는 한국어 GPT 모델입니다 :)", "😀🎉 이모지 테스트 👍🏽", "mixed 한글 and English  두 칸  spaces ",
    " leading space", "trailing space ", "[BOS]안녕[EOS]", "[PAD] [MASK] [UNK]x", "ｆｕｌｌ－ｗｉｄｔｈ ㈜ ℃",
    "e\u0301 composed é", "中文 日本語 カタカナ", "Hello , world . I 'm here ! do n't", "tab\tnew\nline\r\n",
    "a" * 50, "가" * 30, "\u200b zero width", "ë\x00null", "오늘은 2024년 1월 1일, New Year's Day 🎉",
]
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# name -> (builder kwargs). "kogpt": byte-level BPE + KoGPT's tokenizer_config.json. "metaspace": [MASK] is not in
# the trained vocabulary (HF appends it), special_tokens_map.json (dict values) overrides tokenizer_config.json's
# pad_token, the post-processor prepends [BOS], and the config's add_eos_token=true is ignored (as HF does).
# "unigram": clean_up_tokenization_spaces=true (applied: not a BPE model).
# "no_config": no config at all: HF knows no special tokens, we recognise [BOS].. by name; ids and text still equal.
VARIANTS = {
    "kogpt": dict(kind="byte_level"),
    "metaspace": dict(
        kind="metaspace", specials=["[BOS]", "[EOS]", "[UNK]", "[PAD]"], bos_template=True,
        config={"pad_token": "[UNK]", "add_eos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"},
        special_tokens_map={name: {"content": tok, "lstrip": False, "rstrip": False, "single_word": False}
                            for name, tok in [("bos_token", "[BOS]"), ("eos_token", "[EOS]"), ("unk_token", "[UNK]"),
                                              ("pad_token", "[PAD]"), ("mask_token", "[MASK]")]}),
    "unigram": dict(kind="unigram", config={**KOGPT_CONFIG, "clean_up_tokenization_spaces": True}),
    "no_config": dict(kind="byte_level", config=None),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(ours, HF's AutoTokenizer with padding_side="left"), both loaded from the same directory."""
    directory = build_tokenizer_json(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    hf = transformers.AutoTokenizer.from_pretrained(str(directory), padding_side="left")
    return KoGPTTokenizer.from_pretrained(directory), hf


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return build_sentencepiece_model(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def sp_pair(sp_dir):
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    return KoGPTTokenizer.from_pretrained(sp_dir), sp


@pytest.fixture(scope="module")
def kogpt(tmp_path_factory):
    return KoGPTTokenizer.from_pretrained(build_tokenizer_json(tmp_path_factory.mktemp("kogpt")))


def random_ids(n_vocab: int, seed: int, count: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(n_vocab) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


def test_import_does_not_import_transformers():
    code = "import sys, kogpt_fast.tokenizer; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- tokenizer.json against transformers ------------------------------------------------------------------------------
def test_ids_equal_hf(pair):
    ours, hf = pair
    for text in STRINGS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.encode(text, return_tensors="pt").tolist() == hf.encode(text, return_tensors="pt").tolist()


def test_special_tokens_and_vocab_equal_hf(pair):
    ours, hf = pair
    assert len(ours) == len(hf) and ours.vocab_size == hf.vocab_size
    tokens = [hf.convert_ids_to_tokens(i) for i in range(len(hf))] + ["not-a-token"]
    assert ours.convert_ids_to_tokens(list(range(len(hf)))) == tokens[:-1]
    everything = list(range(len(hf)))
    if hf.bos_token is None:  # no config: HF knows no special tokens; we recognise KoGPT's by name
        assert [ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id, ours.mask_token_id] == [
            0, 1, 2, 3, 4]
        assert ours.all_special_ids == [0, 1, 2, 3, 4] and hf.all_special_ids == []
        assert ours.convert_ids_to_tokens(everything, skip_special_tokens=True) == tokens[5:-1]
        assert ours.convert_tokens_to_ids(tokens[:-1]) == hf.convert_tokens_to_ids(tokens[:-1]) == everything
        assert ours.convert_tokens_to_ids("not-a-token") == 2 and hf.convert_tokens_to_ids("not-a-token") is None
        return
    assert ours.convert_ids_to_tokens(everything, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        everything, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    for name in ("bos", "eos", "unk", "pad", "mask"):
        assert getattr(ours, f"{name}_token") == getattr(hf, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
    assert ours.all_special_tokens == hf.all_special_tokens and ours.all_special_ids == hf.all_special_ids


def test_decode_equals_hf(pair):
    ours, hf = pair
    specials = [ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.mask_token_id]
    sequences = [hf.encode(t) for t in STRINGS] + [specials + hf.encode(t) + specials[::-1] for t in STRINGS[5:10]]
    sequences += random_ids(len(hf), seed=len(hf))
    for ids in sequences:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
        assert ours.decode(ids, clean_up_tokenization_spaces=True) == hf.decode(ids, clean_up_tokenization_spaces=True)
    assert ours.batch_decode(sequences, True) == hf.batch_decode(sequences, skip_special_tokens=True)
    batch = ours(STRINGS[5:12], return_tensors="pt").input_ids  # [B, T] with pads
    assert ours.batch_decode(batch) == hf.batch_decode(batch)
    assert ours.decode(batch) == hf.decode(batch)  # 2-D -> list[str], as HF
    assert ours.decode(batch[0]) == hf.decode(batch[0])  # a 1-D tensor
    assert ours.decode(int(batch[0, -1])) == hf.decode(int(batch[0, -1]))  # an int


def test_unigram_cleanup_applies(tmp_path):
    """The "unigram" variant's clean_up_tokenization_spaces really changes text (so equality with HF means something)."""
    ours = KoGPTTokenizer.from_pretrained(build_tokenizer_json(tmp_path, **VARIANTS["unigram"]))
    ids = ours.encode("Hello , world . it 's here !")
    assert ours.decode(ids) == "Hello, world. it's here!"
    assert ours.decode(ids, clean_up_tokenization_spaces=False) == "Hello , world . it 's here !"


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_equals_hf(pair, side):
    ours, hf = pair
    if hf.pad_token_id is None:  # HF cannot pad without a pad token: compare with a copy given ours
        hf = copy.deepcopy(hf)
        hf.pad_token = ours.pad_token
    hf.padding_side = ours.padding_side = side
    try:
        texts = STRINGS[:14]
        mine, ref = ours(texts, return_tensors="pt"), hf(texts, padding=True, return_tensors="pt")
        pad = hf.pad_token_id
        assert mine.input_ids.dtype == torch.long and mine.input_ids.shape == ref["input_ids"].shape
        assert torch.equal(mine.input_ids, ref["input_ids"]) and torch.equal(mine.attention_mask, ref["attention_mask"])
        assert (mine.input_ids[mine.attention_mask == 0] == pad).all()
        assert ours(texts) == {k: v.tolist() for k, v in ref.items()}  # return_tensors=None: lists
        one = hf(texts[5], padding=True)
        assert ours(texts[5]) == dict(one)  # a single str: flat lists, as HF
        assert ours(texts[5], return_tensors="pt").input_ids.tolist() == [one["input_ids"]]
        fixed = hf(texts[5:9], padding="max_length", max_length=40, return_tensors="pt")
        assert torch.equal(ours(texts[5:9], padding="max_length", max_length=40, return_tensors="pt").input_ids,
                           fixed["input_ids"]) and fixed["input_ids"].shape == (4, 40)
        trunc = hf(texts, padding=True, truncation=True, max_length=4, return_tensors="pt")
        mine = ours(texts, truncation=True, max_length=4, return_tensors="pt")
        assert torch.equal(mine.input_ids, trunc["input_ids"]) and mine.input_ids.shape[1] == 4
        assert torch.equal(mine.attention_mask, trunc["attention_mask"])
    finally:
        hf.padding_side = ours.padding_side = "left"


@SETTINGS
@given(text=st.text(max_size=40))
def test_arbitrary_text_equals_hf(pair, text):
    ours, hf = pair
    ids = hf.encode(text)
    assert ours.encode(text) == ids
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_tokenizer_json_post_processor_decides_bos(tmp_path):
    ours = KoGPTTokenizer.from_pretrained(build_tokenizer_json(tmp_path, **VARIANTS["metaspace"]))
    assert ours.encode("안녕")[0] == ours.bos_token_id == 0 and ours.encode("안녕", add_special_tokens=False)[0] != 0
    assert ours.encode("") == [0]  # no EOS: the config's add_eos_token is ignored for a tokenizer.json
    assert ours.pad_token == "[PAD]" and ours.mask_token_id == len(ours) - 1  # special_tokens_map wins; [MASK] appended
    assert ours("안녕", truncation=True, max_length=1)["input_ids"] == [0]  # truncation keeps the BOS


# --- tokenizer.model against sentencepiece ----------------------------------------------------------------------------
def test_sentencepiece_ids_and_text_equal_sentencepiece(sp_pair):
    ours, sp = sp_pair
    assert [ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token, ours.mask_token] == [
        "[BOS]", "[EOS]", "[UNK]", "[PAD]", "[MASK]"]
    assert [ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id, ours.mask_token_id] == [
        0, 1, 2, 3, 4]
    assert ours.all_special_ids == [0, 1, 2, 3, 4] and len(ours) == ours.vocab_size == sp.get_piece_size()
    for text in STRINGS:
        ids = sp.encode(text)
        assert ours.encode(text) == ids and ours.encode(text, add_special_tokens=False) == ids  # no BOS added
        assert ours.decode(ids) == sp.decode(ids) == text, text
        assert ours.decode([0] + ids + [1, 3, 3], skip_special_tokens=True) == sp.decode([i for i in ids if i > 4])
    for ids in random_ids(len(ours), seed=1):
        assert ours.decode(ids) == sp.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == sp.decode([i for i in ids if i > 4])
    assert ours.convert_ids_to_tokens([0, 4, 200]) == [sp.id_to_piece(i) for i in (0, 4, 200)]
    assert ours.convert_tokens_to_ids(["[MASK]", sp.id_to_piece(200), "no-such-piece"]) == [4, 200, 2]


def test_sentencepiece_padding_and_bos_config(sp_dir, tmp_path):
    ours = KoGPTTokenizer.from_pretrained(sp_dir / "tokenizer.model")  # a file path works too
    texts = ["안녕", "대한민국은 민주공화국이다.", ""]
    enc = ours(texts, return_tensors="pt")
    lengths = [len(ours.encode(t)) for t in texts]
    assert enc.input_ids.shape == (3, max(lengths)) and enc.attention_mask.sum(1).tolist() == lengths
    assert enc.input_ids[0, : max(lengths) - lengths[0]].tolist() == [3] * (max(lengths) - lengths[0])  # left, [PAD]
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    write_json(tmp_path / "tokenizer_config.json", {**KOGPT_CONFIG, "add_bos_token": True, "add_eos_token": True})
    with_bos = KoGPTTokenizer.from_pretrained(tmp_path)
    assert with_bos.encode("안녕") == [0] + ours.encode("안녕") + [1]
    assert with_bos.encode("안녕", add_special_tokens=False) == ours.encode("안녕")
    assert with_bos.encode("대한민국은 민주공화국이다.", truncation=True, max_length=3)[::2] == [0, 1]
    (tmp_path / "tokenizer_config.json").unlink()  # no config: sentencepiece's own ids, [MASK] by name
    bare = KoGPTTokenizer.from_pretrained(tmp_path)
    assert bare.all_special_ids == [0, 1, 2, 3, 4] and bare.encode("안녕") == ours.encode("안녕")


@SETTINGS
@given(text=st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=60))
def test_sentencepiece_round_trip(sp_pair, text):
    """decode(encode(s)) == s: byte_fallback covers unseen characters, "identity" normalisation and
    remove_extra_whitespaces=False keep the text as is; "▁" (the space marker) is excluded, as it decodes to " "."""
    ours, sp = sp_pair
    ids = ours.encode(text)
    assert ids == sp.encode(text) and ours.decode(ids) == text


# --- padding properties -----------------------------------------------------------------------------------------------
@SETTINGS
@given(texts=st.lists(st.text(max_size=20), min_size=1, max_size=5), right=st.booleans())
def test_padding_rows_equal_length_and_masks_count_tokens(sp_pair, kogpt, texts, right):
    for tok in (sp_pair[0], kogpt):
        tok.padding_side = "right" if right else "left"
        try:
            enc = tok(texts, return_tensors="pt")
            rows = [tok.encode(t) for t in texts]
            assert enc.input_ids.shape == enc.attention_mask.shape == (len(texts), max(map(len, rows)))
            assert enc.attention_mask.sum(1).tolist() == [len(r) for r in rows]
            for row, ids, mask in zip(rows, enc.input_ids.tolist(), enc.attention_mask.tolist()):
                assert [i for i, m in zip(ids, mask) if m] == row
                assert all(i == tok.pad_token_id for i, m in zip(ids, mask) if not m)
                assert mask == sorted(mask, reverse=right)  # pads all on the chosen side
        finally:
            tok.padding_side = "left"


def test_pad_token_falls_back_to_eos_and_is_settable(tmp_path):
    config = {k: v for k, v in KOGPT_CONFIG.items() if k != "pad_token"}
    tok = KoGPTTokenizer.from_pretrained(build_tokenizer_json(tmp_path, config=config))
    assert tok.pad_token_id == tok.eos_token_id == 1 and tok.pad_token == "[EOS]"
    assert tok(["안녕하세요 반갑습니다", "a"]).input_ids[1][0] == 1
    tok.pad_token_id = 3
    assert tok.pad_token == "[PAD]" and tok(["안녕하세요 반갑습니다", "a"]).input_ids[1][0] == 3
    tok.pad_token = "[MASK]"
    assert tok.pad_token_id == 4
    with pytest.raises(ValueError, match=str(len(tok))):
        tok.pad_token_id = len(tok)


# --- the surface: inputs, BatchEncoding, streamer, loading ------------------------------------------------------------
def test_decode_accepts_lists_tensors_arrays_and_ints(kogpt):
    ids = kogpt.encode("대한민국은 민주공화국이다.")
    text = kogpt.decode(ids)
    assert text == "대한민국은 민주공화국이다."
    for form in (tuple(ids), torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), np.array(ids)):
        assert kogpt.decode(form) == text
    assert kogpt.decode(torch.tensor(ids[0])) == kogpt.decode(ids[0]) == kogpt.decode([ids[0]])
    assert kogpt.batch_decode(torch.tensor([ids, ids])) == [text, text] == kogpt.batch_decode([ids, list(ids)])
    assert kogpt.batch_decode([]) == []


def test_batch_encoding_attributes_and_to():
    enc = BatchEncoding(input_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=[[1, 1]])
    assert enc.input_ids is enc["input_ids"] and enc.to("cpu") is enc and enc.input_ids.device.type == "cpu"
    with pytest.raises(AttributeError):
        enc.token_type_ids


@pytest.mark.parametrize("which", ["tokenizers", "sentencepiece"])
def test_text_streamer_prints_the_decoded_text(kogpt, sp_pair, which):
    tok = kogpt if which == "tokenizers" else sp_pair[0]
    text = "KoGPT는 한국어 😀 모델입니다. Hello world, 안녕하세요!"
    ids = tok.encode(text)
    for kwargs in ({}, {"skip_special_tokens": True}):
        printed = []

        class Collect(transformers.TextStreamer):
            def on_finalized_text(self, chunk, stream_end=False):
                printed.append(chunk)

        streamer = Collect(tok, skip_prompt=True, **kwargs)
        streamer.put(torch.tensor([ids[:2]]))  # the prompt: skipped
        for i in ids[2:] + [tok.eos_token_id]:
            streamer.put(torch.tensor([i]))
        streamer.end()
        assert "".join(printed) == tok.decode(ids[2:] + [tok.eos_token_id], **kwargs)
        assert "".join(printed).startswith(tok.decode(ids[2:])) and len(printed) > 3


def test_directory_prefers_tokenizer_json_and_none_means_demo(tmp_path, sp_dir, monkeypatch):
    build_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert "tokenizers" in repr(KoGPTTokenizer.from_pretrained(tmp_path))
    assert "sentencepiece" in repr(KoGPTTokenizer.from_pretrained(tmp_path / "tokenizer.model"))
    import kogpt_fast.demo

    monkeypatch.setattr(kogpt_fast.demo, "demo_model_path", lambda: sp_dir)
    demo = KoGPTTokenizer.from_pretrained()
    assert demo.name_or_path == str(sp_dir / "tokenizer.model") and demo.padding_side == "left"
    assert KoGPTTokenizer.from_pretrained(padding_side="right").padding_side == "right"


# --- errors -----------------------------------------------------------------------------------------------------------
def test_loading_errors(tmp_path, sp_dir):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        KoGPTTokenizer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError) as err:
        KoGPTTokenizer.from_pretrained(tmp_path)
    assert all(s in str(err.value) for s in (str(tmp_path), "tokenizer.json", "tokenizer.model"))
    with pytest.raises(TypeError, match="int"):
        KoGPTTokenizer.from_pretrained(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        KoGPTTokenizer.from_pretrained(bad)
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        KoGPTTokenizer.from_pretrained(bad)
    (bad / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (bad / "tokenizer_config.json").write_text("[broken")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        KoGPTTokenizer.from_pretrained(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"bos_token": 5}))
    with pytest.raises(ValueError, match="bos"):
        KoGPTTokenizer.from_pretrained(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="<nope>"):  # sentencepiece cannot grow its vocabulary
        KoGPTTokenizer.from_pretrained(bad)
    with pytest.raises(ValueError, match="padding_side"):
        KoGPTTokenizer.from_pretrained(sp_dir, padding_side="middle")


def test_input_errors(kogpt):
    size = len(kogpt)
    with pytest.raises(TypeError, match="int"):
        kogpt.encode(123)
    with pytest.raises(TypeError, match="bytes"):
        kogpt.encode(b"abc")
    with pytest.raises(TypeError, match="int"):
        kogpt(123)
    with pytest.raises(TypeError, match="int"):
        kogpt(["ok", 5])
    with pytest.raises(TypeError, match="str"):
        kogpt.decode("abc")
    with pytest.raises(TypeError, match="float"):
        kogpt.decode(torch.tensor([1.0, 2.0]))
    for bad_id in (size, -1, 10**9):
        with pytest.raises(ValueError, match=rf"{bad_id}.*{size}"):
            kogpt.decode([5, bad_id])
    with pytest.raises(ValueError, match=str(size)):
        kogpt.batch_decode(torch.tensor([[1, size]]))
    with pytest.raises(ValueError, match="padding"):
        kogpt(["a", "대한민국은 민주공화국이다."], padding=False, return_tensors="pt")
    assert kogpt(["a", "b"], padding=False, return_tensors="pt").input_ids.shape == (2, 1)
    assert kogpt(["a", "대한민국"], padding=False).attention_mask == [[1], [1] * len(kogpt.encode("대한민국"))]
    with pytest.raises(ValueError, match="return_tensors"):
        kogpt.encode("a", return_tensors="np")
    with pytest.raises(ValueError, match="padding_side"):
        kogpt.padding_side = "top"
