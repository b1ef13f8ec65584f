"""Small KoGPT-style tokenizers built in a tmp dir: tokenizer.json (tokenizers) or tokenizer.model (sentencepiece)."""
from __future__ import annotations

import io
import json
from itertools import product
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

KOGPT_SPECIALS = ["[BOS]", "[EOS]", "[UNK]", "[PAD]", "[MASK]"]  # ids 0..4, as in KoGPT
KOGPT_CONFIG = {  # the special tokens as KoGPT's code names them (bos_token='[BOS]', ...)
    "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]",
    "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast",
}

_KO_SUBJECTS = ["대한민국은", "서울은", "카카오브레인은", "인공지능은", "우리 가족은", "그 학생은", "오늘 날씨는",
                "이 모델은", "한국어 문장은", "제주도의 바다는", "도서관에 간 친구는", "새로 산 컴퓨터는"]
_KO_PREDICATES = ["민주공화국이다.", "정말 아름답습니다.", "새로운 언어 모델을 만들었다.", "빠르게 발전하고 있다!",
                  "행복하게 살고 있어요.", "열심히 공부했습니다.", "맑고 따뜻하네요.", "긴 문장도 잘 처리한다.",
                  "띄어쓰기가 중요하다.", "푸르고 깊습니다.", "책을 세 권 빌렸다?", "생각보다 조용하다."]
_EN_SUBJECTS = ["The model", "My friend", "KoGPT", "This tokenizer", "The weather", "A small GPU", "Our team",
                "The library", "Every sentence", "The old city"]
_EN_PREDICATES = ["is large.", "writes Korean text.", "runs fast on CPU.", "splits words into pieces.",
                  "was sunny today!", "has 80 GiB of memory.", "ships a new release.", "opens at 9 am.",
                  "ends with a period.", "is beautiful, isn't it?"]
_MIXED = ["GPT-J 모델은 6B 파라미터를 가진다.", "Hello, 안녕하세요! 😀", "KoGPT로 한국어 text를 생성합니다.",
          "오늘은 2024년 1월 1일, New Year's Day 🎉", "이메일: test@example.com 으로 보내주세요.",
          "Python 3.11 과 PyTorch 로 추론합니다.", "ㅋㅋㅋ ㅎㅎ 진짜?! lol", "“따옴표” 와 ‘작은 따옴표’ 그리고 (괄호)"]


def corpus() -> list[str]:
    """A few hundred Korean, English and mixed sentences (subject x predicate combinations)."""
    korean = [f"{s} {p}" for s, p in product(_KO_SUBJECTS, _KO_PREDICATES)]
    english = [f"{s} {p}" for s, p in product(_EN_SUBJECTS, _EN_PREDICATES)]
    return korean + english + _MIXED * 5


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_tokenizer_json(directory: Path, kind: str = "byte_level", specials=KOGPT_SPECIALS, vocab_size: int = 600,
                         config: dict | None = KOGPT_CONFIG, special_tokens_map: dict | None = None,
                         bos_template: bool = False) -> Path:
    """Train a tokenizer on `corpus()` and save tokenizer.json (+ the given configs) in `directory`; returns it.

    kind: "byte_level" (GPT-2-style byte-level BPE), "metaspace" (NFKC + Metaspace BPE with [UNK] for unseen
    characters) or "unigram" (Metaspace Unigram). bos_template: a post-processor that prepends [BOS] (id 0).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind in ("metaspace", "unigram"):
        unk = "[UNK]" if "[UNK]" in specials else None
        tok = Tokenizer(models.BPE(unk_token=unk) if kind == "metaspace" else models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = (trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials)) if kind == "metaspace"
                   else trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(specials), unk_token=unk))
    else:
        raise ValueError(kind)
    tok.train_from_iterator(corpus(), trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", pair="[BOS] $A $B",
                                                           special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))])
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        write_json(directory / "tokenizer_config.json", config)
    if special_tokens_map is not None:
        write_json(directory / "special_tokens_map.json", special_tokens_map)
    return directory


def build_sentencepiece_model(directory: Path, vocab_size: int = 700, config: dict | None = KOGPT_CONFIG) -> Path:
    """Train a byte-fallback BPE sentencepiece model with KoGPT's pieces [BOS]=0 [EOS]=1 [UNK]=2 [PAD]=3 [MASK]=4.

    normalization_rule_name="identity" and remove_extra_whitespaces=False make decode(encode(s)) == s for any text
    without "▁" (sentencepiece's own space marker, which always decodes as a space). Returns `directory`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, bos_id=0, eos_id=1, unk_id=2, pad_id=3,
        bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]", pad_piece="[PAD]", user_defined_symbols=["[MASK]"],
        minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    if config is not None:
        write_json(directory / "tokenizer_config.json", config)
    return directory
