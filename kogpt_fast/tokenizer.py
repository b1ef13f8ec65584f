"""KoGPTTokenizer: HF's tokenizer surface over a `tokenizer.json` (tokenizers) or a `tokenizer.model` (sentencepiece).

Shapes: B = batch size, T = (padded) sequence length. Ids are Python ints, or LongTensors with return_tensors="pt".

tokenizer.json: ids, text and padding equal transformers 5.17's AutoTokenizer (TokenizersBackend) on the same
directory, which is never imported here. As there: special tokens named in the config are registered as special
AddedTokens (normalized=False; appended when not in the vocabulary); special_tokens_map.json overrides
tokenizer_config.json unless that has added_tokens_decoder; BOS/EOS come from tokenizer.json's post-processor only
(HF drops the config's add_bos_token/add_eos_token when a tokenizer.json exists); decode cleans up tokenization
spaces only if the config sets clean_up_tokenization_spaces (v5's default is False), and never for a BPE model.
tokenizer.model: ids and text are sentencepiece's own `encode` / `decode` (control pieces such as [BOS] decode to "");
BOS/EOS are added only if tokenizer_config.json sets add_bos_token/add_eos_token (KoGPT adds none).
Unlike HF: padding is on the LEFT by default; pad_token(_id) falls back to EOS when the files define no pad token;
without a config, special tokens are recognised by name ([BOS], <s>, ...); decode raises ValueError for ids outside
the vocabulary (HF drops them silently).
"""
from __future__ import annotations

import json
import operator
import os
from pathlib import Path

import sentencepiece
import tokenizers
import torch

_FILES = ("tokenizer.json", "tokenizer.model")
_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # HF's SPECIAL_TOKENS_ATTRIBUTES order
_BY_NAME = {"bos": ("[BOS]", "<s>", "<|endoftext|>"), "eos": ("[EOS]", "</s>", "<|endoftext|>"),
            "unk": ("[UNK]", "<unk>", "<|endoftext|>"), "pad": ("[PAD]", "<pad>"), "mask": ("[MASK]", "<mask>")}
# from_pretrained keywords that override tokenizer_config.json (HF's meaning; None: not given)
_CONFIG_ARGUMENTS = {f"{n}_token" for n in _NAMES} | {
    "extra_special_tokens", "model_max_length", "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token"}
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # HF's clean_up_tokenization, in its order


class BatchEncoding(dict):
    """`input_ids`, `attention_mask`: [B, T] LongTensors with return_tensors="pt", else lists; keys or attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        """Moves the tensors to `device` in place (as HF) and returns self."""
        self.update({k: v.to(device) for k, v in self.items() if isinstance(v, torch.Tensor)})
        return self


def _resolve(path, revision=None, cache_dir=None, subfolder=None) -> Path:
    """The tokenizer file `path` names: the file itself, or a directory's tokenizer.json, else its tokenizer.model.
    A directory may be a hub id that the local HF cache holds (kogpt_fast.hub; nothing is downloaded)."""
    from .hub import checkpoint_dir

    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"tokenizer path must be a str or os.PathLike, got {type(path).__name__}")
    path = checkpoint_dir(path, revision=revision, cache_dir=cache_dir, subfolder=subfolder)
    for file in [path] if path.is_file() else [path / name for name in _FILES]:
        if file.is_file():
            return file
    raise FileNotFoundError(f"no tokenizer in directory {path}: looked for {' and '.join(_FILES)}")


def _read_config(directory: Path) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json (as HF), each if present; {} when neither is."""
    config = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not path.is_file() or (name == "special_tokens_map.json" and "added_tokens_decoder" in config):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        config.update(data)
    if "additional_special_tokens" in config:  # HF 4's name for HF 5's extra_special_tokens
        config.setdefault("extra_special_tokens", config.pop("additional_special_tokens"))
    return config


def _token_spec(value, where: str) -> dict | None:
    """A config's special-token entry (a string, or an AddedToken dict with "content") as AddedToken kwargs."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"content": value}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {k: value[k] for k in ("content", "single_word", "lstrip", "rstrip", "normalized") if k in value}
    if isinstance(getattr(value, "content", None), str):  # an AddedToken (tokenizers' or transformers')
        return {k: getattr(value, k) for k in ("content", "single_word", "lstrip", "rstrip", "normalized")
                if hasattr(value, k)}
    raise ValueError(f"{where}: a special token must be a string or a dict with 'content', got {value!r}")


def _to_ids(ids):
    """An int -> int; a sequence, tensor or array of ints (or of rows of ints) -> a (nested) list of ints."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()  # a tensor or numpy array (or scalar)
    if isinstance(ids, (list, tuple)):
        return [_to_ids(i) for i in ids]
    try:
        return operator.index(ids)
    except TypeError:
        raise TypeError(f"token ids must be ints, got {type(ids).__name__}: {ids!r}") from None


def _named(name: str, index: int):
    return property(lambda self: self._special.get(name, (None, None))[index],
                    doc=f"The {name} {'token' if index == 0 else 'token id'}, or None.")


class KoGPTTokenizer:
    """The KoGPT tokenizer: HF's `encode` / `decode` / `__call__` over tokenizers or sentencepiece."""

    def __init__(self, backend, file: Path, config: dict, padding_side: str = "left"):
        """Use `from_pretrained`. `backend`: a tokenizers.Tokenizer or a sentencepiece.SentencePieceProcessor."""
        self._tk = backend if isinstance(backend, tokenizers.Tokenizer) else None
        self._sp = None if self._tk is not None else backend
        self.name_or_path, self.padding_side = str(file), padding_side
        self.model_max_length = config.get("model_max_length")
        self._add_bos, self._add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))  # sp only
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        specs = {n: _token_spec(config.get(f"{n}_token"), f"{file.parent}: {n}_token") for n in _NAMES}
        specs = {n: s for n, s in specs.items() if s}
        extras = config.get("extra_special_tokens") or []
        extras = list(extras.values()) if isinstance(extras, dict) else extras  # HF 5's named extras
        if not isinstance(extras, (list, tuple)):
            raise ValueError(f"{file.parent}: extra_special_tokens must be a list of tokens, got {extras!r}")
        self._special = self._register(specs, file) if specs else self._recognise()  # name -> (token, id)
        self._extras = self._register_extras([_token_spec(t, f"{file.parent}: extra_special_tokens") for t in extras],
                                             file)
        if self._tk is not None:
            self._tk.no_padding()  # padding and truncation are done per call, as HF does
            self._tk.no_truncation()

    @classmethod
    def from_pretrained(cls, path=None, *, padding_side: str = "left", revision: str | None = None, cache_dir=None,
                        subfolder: str | None = None, **kwargs) -> "KoGPTTokenizer":
        """Load from a directory (tokenizer.json, else tokenizer.model), either file, or a hub id in the local HF
        cache (with `revision`, `cache_dir`); None: the demo checkpoint.

        As in HF, keyword arguments override tokenizer_config.json: the special tokens (bos_token, eos_token,
        unk_token, sep_token, pad_token, cls_token, mask_token, additional_special_tokens / extra_special_tokens;
        a token not in the vocabulary of a tokenizer.json is appended, as HF does), model_max_length,
        clean_up_tokenization_spaces, and (tokenizer.model only) add_bos_token / add_eos_token. HF's arguments that
        change nothing here are accepted; unknown ones raise TypeError.
        """
        from . import hf_compat

        hf_compat.pop_hf_arguments("KoGPTTokenizer.from_pretrained()", kwargs, hf_compat.TOKENIZER_INERT,
                                   hf_compat.TOKENIZER_REFUSED)
        if "additional_special_tokens" in kwargs:
            kwargs.setdefault("extra_special_tokens", kwargs.pop("additional_special_tokens"))
        unknown = sorted(set(kwargs) - _CONFIG_ARGUMENTS)
        if unknown:
            raise TypeError(f"KoGPTTokenizer.from_pretrained() got unsupported arguments: {', '.join(unknown)}")
        file = _resolve(path, revision=revision, cache_dir=cache_dir, subfolder=subfolder)
        if file.suffix == ".json" and any(kwargs.get(k) is not None for k in ("add_bos_token", "add_eos_token")):
            raise NotImplementedError(
                "add_bos_token / add_eos_token: for a tokenizer.json its post-processor decides which tokens are "
                "added (HF rewrites it; kogpt-fast does not)"
            )
        config = _read_config(file.parent)
        config.update({k: v for k, v in kwargs.items() if v is not None})  # None: not given, as in HF
        try:
            if file.suffix == ".json":
                backend = tokenizers.Tokenizer.from_file(str(file))
            else:
                backend = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except Exception as e:  # tokenizers raises a bare Exception, sentencepiece a RuntimeError or OSError
            raise ValueError(f"cannot load tokenizer file {file}: {e}") from e
        return cls(backend, file, config, padding_side)

    # --- special tokens ---------------------------------------------------------------------------------------
    def _register(self, specs: dict, file: Path) -> dict:
        """The special tokens a config names, with their ids; tokenizers: made special, appended if new (as HF)."""
        if self._tk is not None:
            self._tk.add_special_tokens([tokenizers.AddedToken(**{"normalized": False, **s}, special=True)
                                         for s in specs.values()])
        found = {}
        for name, spec in specs.items():
            if (token_id := self._token_to_id(spec["content"])) is None:
                raise ValueError(f"{file}: special token {name}_token={spec['content']!r} is not in the vocabulary"
                                 " (a sentencepiece model cannot be extended)")
            found[name] = (spec["content"], token_id)
        return found

    def _register_extras(self, extras: list[dict], file: Path) -> list[str]:
        """HF's extra (additional) special tokens, after the named ones, as `_register` does with those."""
        if self._tk is not None and extras:
            self._tk.add_special_tokens([tokenizers.AddedToken(**{"normalized": False, **s}, special=True)
                                         for s in extras])
        for spec in extras:
            if self._token_to_id(spec["content"]) is None:
                raise ValueError(f"{file}: extra special token {spec['content']!r} is not in the vocabulary "
                                 "(a sentencepiece model cannot be extended)")
        return list(dict.fromkeys(spec["content"] for spec in extras))

    def _recognise(self) -> dict:
        """Special tokens found by name (sentencepiece: first its own bos/eos/unk/pad ids, -1 meaning none)."""
        found = {}
        for name, candidates in _BY_NAME.items():
            own = getattr(self._sp, f"{name}_id", lambda: -1)() if self._sp is not None else -1
            hits = [(self._sp.id_to_piece(own), own)] if own >= 0 else []
            hits += [(t, i) for t in candidates if (i := self._token_to_id(t)) is not None]
            if hits:
                found[name] = hits[0]
        return found

    bos_token, bos_token_id = _named("bos", 0), _named("bos", 1)
    eos_token, eos_token_id = _named("eos", 0), _named("eos", 1)
    unk_token, unk_token_id = _named("unk", 0), _named("unk", 1)
    sep_token, sep_token_id = _named("sep", 0), _named("sep", 1)
    cls_token, cls_token_id = _named("cls", 0), _named("cls", 1)
    mask_token, mask_token_id = _named("mask", 0), _named("mask", 1)

    @property
    def extra_special_tokens(self) -> list[str]:
        """The special tokens beyond the named ones (HF 5's name; HF 4: additional_special_tokens)."""
        return list(self._extras)

    @property
    def pad_token(self) -> str | None:
        """The pad token; the EOS token when the files define none (KoGPT passes pad_token_id=eos_token_id)."""
        return self._special.get("pad", self._special.get("eos", (None, None)))[0]

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        if token is not None and self._token_to_id(token) is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        self.pad_token_id = None if token is None else self._token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        """The id batches are padded with; the EOS id when the files define no pad token."""
        return self._special.get("pad", self._special.get("eos", (None, None)))[1]

    @pad_token_id.setter
    def pad_token_id(self, value: int | None) -> None:
        if value is None:
            self._special.pop("pad", None)
        else:  # convert_ids_to_tokens checks the id
            self._special["pad"] = (self.convert_ids_to_tokens(operator.index(value)), operator.index(value))

    @property
    def all_special_tokens(self) -> list[str]:
        """The special tokens in HF's order (bos, eos, unk, sep, pad, cls, mask), without repeats."""
        return list(dict.fromkeys([*(self._special[n][0] for n in _NAMES if n in self._special), *self._extras]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_to_id(t) for t in self.all_special_tokens]

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self._padding_side = side

    # --- vocabulary ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The base vocabulary size, without added tokens (as HF)."""
        return self._tk.get_vocab_size(with_added_tokens=False) if self._tk is not None else self._sp.get_piece_size()

    def __len__(self) -> int:
        """The full vocabulary size, added tokens included: valid ids are [0, len(tokenizer))."""
        return self._tk.get_vocab_size(with_added_tokens=True) if self._tk is not None else self._sp.get_piece_size()

    def _token_to_id(self, token: str) -> int | None:
        if self._tk is not None:
            return self._tk.token_to_id(token)
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def _check_ids(self, ids: list) -> list[int]:
        """`ids`, a flat list, once each is checked to be an int in [0, len(self))."""
        for i in ids:
            if not isinstance(i, int):
                raise TypeError(f"expected a flat sequence of token ids, found {type(i).__name__} {i!r} in it")
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is out of the vocabulary: ids must be in [0, {len(self)}) "
                                 f"(vocab size {len(self)})")
        return ids

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """An id -> its token; a sequence of ids -> a list of tokens (special ones dropped if skip_special_tokens)."""
        ids = _to_ids(ids)
        single = isinstance(ids, int)
        skip = set(self.all_special_ids) if skip_special_tokens and not single else set()
        tokens = [self._tk.id_to_token(i) if self._tk is not None else self._sp.id_to_piece(i)
                  for i in self._check_ids([ids] if single else ids) if i not in skip]
        return tokens[0] if single else tokens

    def convert_tokens_to_ids(self, tokens):
        """A token -> its id (unk_token_id when unknown, as HF); a list of tokens -> a list of ids."""
        if isinstance(tokens, str):
            token_id = self._token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # --- encoding -----------------------------------------------------------------------------------------------
    def _encode_batch(self, texts, add_special_tokens: bool, truncation, max_length: int | None) -> list[list[int]]:
        """The ids of each text, unpadded; truncation keeps the first max_length (else model_max_length) ids,
        the added special tokens included."""
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            bad = texts if not isinstance(texts, (list, tuple)) else next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"text must be a str or a list of str, got {type(bad).__name__}")
        truncate = truncation and truncation != "do_not_truncate"
        limit = (max_length if max_length is not None else self.model_max_length) if truncate else None
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"max_length must be a positive int, got {limit!r}")
        if self._tk is not None:
            if limit is not None:
                self._tk.enable_truncation(limit)
            try:
                return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
            finally:
                self._tk.no_truncation()
        bos = [self.bos_token_id] if add_special_tokens and self._add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if add_special_tokens and self._add_eos and self.eos_token_id is not None else []
        keep = None if limit is None else max(limit - len(bos) - len(eos), 0)
        return [bos + row[:keep] + eos for row in self._sp.encode(list(texts))]

    def encode(self, text: str, return_tensors=None, add_special_tokens: bool = True, truncation=False,
               max_length: int | None = None):
        """The ids of `text`: a list [T], or a LongTensor [1, T] with return_tensors="pt"."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        _check_return_tensors(return_tensors)
        ids = self._encode_batch([text], add_special_tokens, truncation, max_length)[0]
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids

    def __call__(self, text, padding=True, return_tensors=None, add_special_tokens: bool = True, truncation=False,
                 max_length: int | None = None) -> BatchEncoding:
        """Encode a str or a list of B strs: `input_ids` and `attention_mask` (1 = token, 0 = pad), each [B, T].

        padding: True/"longest" pads to the longest row, "max_length" to max_length, False/"do_not_pad" not at all;
        pads (pad_token_id) go on `self.padding_side`. return_tensors=None gives lists (flat for a single str, as
        HF); "pt" gives LongTensors [B, T] (B = 1 for a str), for which the rows must come out of equal length.
        """
        _check_return_tensors(return_tensors)
        rows = self._encode_batch([text] if isinstance(text, str) else text, add_special_tokens, truncation, max_length)
        if padding in (True, "longest"):
            width = max(map(len, rows), default=0)
        elif padding == "max_length":
            width = max_length if max_length is not None else self.model_max_length
            if width is None:
                raise ValueError("padding='max_length' needs max_length (the config gives no model_max_length)")
        elif padding in (False, None, "do_not_pad"):
            width = 0
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if any(len(row) < width for row in rows) and self.pad_token_id is None:
            raise ValueError("cannot pad: the tokenizer has neither a pad token nor an EOS token; set pad_token_id")
        left = self.padding_side == "left"
        ids = [[self.pad_token_id] * (width - len(r)) + r if left else r + [self.pad_token_id] * (width - len(r))
               for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            if len(set(map(len, ids))) > 1:
                raise ValueError(f"cannot stack rows of lengths {[len(r) for r in ids]} into one tensor with "
                                 f"padding={padding!r}: pass padding=True, or return_tensors=None for lists")
            shape = (len(ids), len(ids[0]) if ids else 0)
            ids, mask = (torch.tensor(x, dtype=torch.long).reshape(shape) for x in (ids, mask))
        elif isinstance(text, str):
            ids, mask = ids[0], mask[0]
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    # --- decoding -----------------------------------------------------------------------------------------------
    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str | list[str]:
        """The text of `token_ids`: an int, a list [T] or a 1-D tensor -> str; rows [B, T] -> list[str] (as HF).

        Other HF keyword arguments (which a TextStreamer may pass on) are accepted and ignored, as HF does.
        """
        ids = _to_ids(token_ids)
        ids = [ids] if isinstance(ids, int) else ids
        if ids and isinstance(ids[0], list):
            return [self._decode_one(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """The texts of B rows of ids (a list of lists or a [B, T] tensor); an empty batch gives []."""
        rows = _to_ids(sequences)
        rows = [rows] if isinstance(rows, int) or (rows and not isinstance(rows[0], list)) else rows  # one row
        return [self.decode(row, skip_special_tokens, **kwargs) for row in rows]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        self._check_ids(ids)
        if self._sp is not None:
            skip = set(self.all_special_ids) if skip_special_tokens else set()
            return self._sp.decode([i for i in ids if i not in skip])
        text = self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        if (self._clean_up if clean_up is None else clean_up) and type(self._tk.model).__name__ != "BPE":
            for before, after in _CLEANUP:  # v5 skips this for BPE models: it would corrupt their text
                text = text.replace(before, after)
        return text

    def __repr__(self) -> str:
        specials = ", ".join(f"{n}={t!r}:{i}" for n, (t, i) in self._special.items())
        return (f"KoGPTTokenizer({self.name_or_path!r}, {'sentencepiece' if self._tk is None else 'tokenizers'}, "
                f"size={len(self)}, {specials}, padding_side={self.padding_side!r})")


def _check_return_tensors(return_tensors) -> None:
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
