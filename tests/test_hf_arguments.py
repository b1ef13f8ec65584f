"""HF transformers' arguments to from_pretrained (model, tokenizer) and generate(): each honoured, inert or refused
as the README's tables say; the tables match kogpt_fast.hf_compat and cover every argument of transformers 5.17."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_reference import random_hf_model
from kogpt_fast import GenerationConfig, KoGPTForCausalLM, KoGPTTokenizer
from kogpt_fast import hf_compat
from kogpt_fast.backends import DeviceUnavailable
from tokenizer_fixtures import build_tokenizer_json

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL, TOKENIZER, GENERATE = ("KoGPTForCausalLM.from_pretrained", "KoGPTTokenizer.from_pretrained", "generate")
TABLES = {MODEL: (hf_compat.MODEL_INERT, hf_compat.MODEL_REFUSED),
          TOKENIZER: (hf_compat.TOKENIZER_INERT, hf_compat.TOKENIZER_REFUSED),
          GENERATE: (hf_compat.GENERATE_INERT, hf_compat.GENERATE_REFUSED)}
PROMPT = torch.tensor([[5, 17, 33, 2, 90]])


def readme_table(title: str) -> dict[str, str]:
    """{argument name: "honoured" | "inert" | "refused"} from the README's table under `#### `title(...)``."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(f"#### `{title}("):]
    section = section[:section.index("\n\n", section.index("|---"))]
    table = {}
    for row in section.splitlines()[3:]:
        names, status = row.split("|")[1:3]
        for name in re.findall(r"`([a-z_][a-z0-9_]*)`", names):
            assert name not in table, f"{name} twice in the {title} table"
            table[name] = status.strip()
    return table


def honoured_here(title: str) -> set[str]:
    """The HF names the function itself handles (its parameters, config fields for the model, etc.)."""
    if title == MODEL:
        own = set(inspect.signature(KoGPTForCausalLM.from_pretrained).parameters) - {"path", "overrides"}
        return own - {"device", "backend", "progress", "quantize"} | {"pretrained_model_name_or_path"}
    if title == TOKENIZER:
        from kogpt_fast.tokenizer import _CONFIG_ARGUMENTS

        own = set(inspect.signature(KoGPTTokenizer.from_pretrained).parameters) - {"path", "kwargs"}
        return own | _CONFIG_ARGUMENTS | {"additional_special_tokens", "pretrained_model_name_or_path"}
    params = set(inspect.signature(KoGPTForCausalLM.generate).parameters) - {"self", "kwargs", "seed", "generator"}
    fields = {f for f in GenerationConfig.__dataclass_fields__ if f != "extra"}
    return (params | fields) - set(hf_compat.GENERATE_INERT) - set(hf_compat.GENERATE_REFUSED)


@pytest.mark.parametrize("title", list(TABLES))
def test_readme_tables_say_what_the_code_does(title):
    table = readme_table(title)
    inert, refused = TABLES[title]
    assert {n for n, s in table.items() if s == "inert"} == set(inert)
    assert {n for n, s in table.items() if s == "refused"} == set(refused)
    assert {n for n, s in table.items() if s == "honoured"} == honoured_here(title)
    assert set(table.values()) == {"honoured", "inert", "refused"}


def popped_names(*functions) -> set[str]:
    """The keyword arguments transformers' functions take from **kwargs (kwargs.pop("name") / kwargs.get(...))."""
    source = "".join(inspect.getsource(f) for f in functions)
    return {n for n in re.findall(r'kwargs\.(?:pop|get)\(\s*"(\w+)"', source) if not n.startswith("_")}


def signature_names(function) -> set[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n for n, p in inspect.signature(function).parameters.items() if p.kind not in kinds and n != "self"}


# transformers' tokenizer __init__ also reads these from its own saved config; they are not from_pretrained options
TOKENIZER_INTERNAL = {"backend", "files_loaded", "name_or_path", "max_len", "processor_class", "response_schema",
                      "response_template", "model_specific_special_tokens", "tokenizer_class", "init_inputs",
                      "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"}


def test_every_argument_of_transformers_is_in_a_table():
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    model = signature_names(PreTrainedModel.from_pretrained) | popped_names(PreTrainedModel.from_pretrained)
    assert model - set(readme_table(MODEL)) == set()
    tokenizer = (signature_names(PreTrainedTokenizerBase.from_pretrained)
                 | popped_names(PreTrainedTokenizerBase.from_pretrained, PreTrainedTokenizerBase._from_pretrained,
                                PreTrainedTokenizerBase.__init__, transformers.AutoTokenizer.from_pretrained)
                 | {f"{n}_token" for n in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")})
    assert tokenizer - TOKENIZER_INTERNAL - set(readme_table(TOKENIZER)) == set()
    fields = set(transformers.GenerationConfig().to_dict()) - {"_from_model_config", "transformers_version"}
    generate = fields | signature_names(transformers.GenerationMixin.generate)
    assert generate - set(readme_table(GENERATE)) == set()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = random_hf_model(seed=2, n_embd=64, n_head=2, rotary_dim=16, n_layer=2, vocab_size=101, n_positions=48)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return KoGPTForCausalLM.from_pretrained(checkpoint, device="cpu").generate(PROMPT, max_new_tokens=6)


def load(path, **kwargs):
    return KoGPTForCausalLM.from_pretrained(path, device=kwargs.pop("device", "cpu"), **kwargs)


MODEL_INERT_VALUES = {"local_files_only": True, "token": "hf_not_a_token", "proxies": {"https": "http://127.0.0.1:9"},
                      "trust_remote_code": True, "low_cpu_mem_usage": True, "attn_implementation": "sdpa",
                      "disable_mmap": True, "tqdm_class": object}


@pytest.mark.parametrize("name", list(hf_compat.MODEL_INERT))
def test_inert_model_arguments_change_nothing(checkpoint, reference, name):
    model = load(checkpoint, **{name: MODEL_INERT_VALUES[name]})
    assert torch.equal(model.generate(PROMPT, max_new_tokens=6), reference)


@pytest.mark.parametrize("name", list(hf_compat.MODEL_REFUSED))
def test_refused_model_arguments(checkpoint, name):
    with pytest.raises(NotImplementedError, match=name):
        load(checkpoint, **{name: "wanted"})
    for off in (None, *hf_compat.MODEL_REFUSED[name].off):  # "not used", as HF takes it
        load(checkpoint, **{name: off})


def test_unknown_and_bad_model_arguments(checkpoint):
    with pytest.raises(TypeError, match="revison"):
        load(checkpoint, revison="main")
    with pytest.raises(ValueError, match="attn_implementation='fast'"):
        load(checkpoint, attn_implementation="fast")


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}, {"transformer": "cpu", "lm_head": "cpu"}])
def test_device_map_that_names_one_device(checkpoint, reference, device_map):
    model = load(checkpoint, device=None, device_map=device_map)
    assert model.device.type == "cpu" and torch.equal(model.generate(PROMPT, max_new_tokens=6), reference)


@pytest.mark.parametrize("device_map, error", [
    ({"transformer": "cpu", "lm_head": 0}, NotImplementedError), ("balanced", NotImplementedError),
    ({"": "disk"}, NotImplementedError), ("cuda", DeviceUnavailable), ({"": 0}, DeviceUnavailable),
])
def test_device_map_that_splits_or_names_a_missing_device(checkpoint, device_map, error):
    with pytest.raises(error, match="device"):
        load(checkpoint, device=None, device_map=device_map)
    with pytest.raises(ValueError, match="different devices"):
        load(checkpoint, device="cpu", device_map="cuda:0")


def test_use_safetensors_variant_subfolder(checkpoint, reference, tmp_path):
    state = load_file(checkpoint / "model.safetensors")
    nudged = {k: v + 1 if k == "lm_head.bias" else v for k, v in state.items()}  # tells the files apart
    (tmp_path / "sub").mkdir()
    for name in ("config.json",):
        (tmp_path / "sub" / name).write_bytes((checkpoint / name).read_bytes())
    save_file(state, tmp_path / "sub" / "model.safetensors")
    torch.save(nudged, tmp_path / "sub" / "pytorch_model.bin")
    save_file(nudged, tmp_path / "sub" / "model.fp16.safetensors")
    bias = lambda m: m.lm_head.bias  # noqa: E731
    base = load(tmp_path, subfolder="sub")
    assert torch.equal(base.generate(PROMPT, max_new_tokens=6), reference)
    assert torch.equal(bias(load(tmp_path, subfolder="sub", use_safetensors=False)), bias(base) + 1)
    assert torch.equal(bias(load(tmp_path, subfolder="sub", use_safetensors=True)), bias(base))
    assert torch.equal(bias(load(tmp_path, subfolder="sub", variant="fp16")), bias(base) + 1)
    with pytest.raises(FileNotFoundError, match="model.int8.safetensors"):
        load(tmp_path, subfolder="sub", variant="int8")
    with pytest.raises(FileNotFoundError, match="no subfolder 'other'"):
        load(tmp_path, subfolder="other")


def test_generation_config_argument(checkpoint):
    for config in (transformers.GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=3)):
        assert load(checkpoint, generation_config=config).generate(PROMPT).shape == (1, 8)
    assert load(checkpoint).generation_config.eos_token_id == 1  # from config.json, as HF makes one


# --- the tokenizer ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer_json(tmp_path_factory.mktemp("tok"))


SPECIAL_CASES = [
    dict(bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]"),  # the card
    dict(pad_token="<newpad>", sep_token="[SEP]", cls_token="[CLS]", additional_special_tokens=["<x>", "[MASK]"]),
    dict(eos_token="[PAD]", extra_special_tokens=["<y>"]),
]


@pytest.mark.parametrize("kwargs", SPECIAL_CASES)
def test_special_tokens_as_hf(tokenizer_dir, kwargs):
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), **kwargs)
    ours = KoGPTTokenizer.from_pretrained(tokenizer_dir, **kwargs)
    assert len(ours) == len(hf) and ours.all_special_tokens == hf.all_special_tokens
    assert ours.all_special_ids == hf.all_special_ids
    for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
    text = "안녕 <x>하세요 [SEP] <newpad><y> [PAD]"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == hf.decode(hf.encode(text),
                                                                                 skip_special_tokens=True)


def test_config_overrides_and_sentencepiece(tokenizer_dir):
    ours = KoGPTTokenizer.from_pretrained(tokenizer_dir, model_max_length=7, clean_up_tokenization_spaces=True)
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=7,
                                                    clean_up_tokenization_spaces=True)
    assert ours.model_max_length == hf.model_max_length == 7
    long = "대한민국은 민주공화국이다. " * 5
    assert ours(long, truncation=True).input_ids == hf(long, truncation=True).input_ids
    with pytest.raises(NotImplementedError, match="add_bos_token"):
        KoGPTTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)
    demo = KoGPTTokenizer.from_pretrained(None, **SPECIAL_CASES[0])  # sentencepiece: the card's tokens are there
    assert (demo.bos_token_id, demo.eos_token_id, demo.pad_token_id) == (0, 1, 3)
    assert KoGPTTokenizer.from_pretrained(None, add_bos_token=True).encode("헌법")[0] == 0
    with pytest.raises(ValueError, match="cannot be extended"):
        KoGPTTokenizer.from_pretrained(None, sep_token="<not-in-vocab>")


TOKENIZER_INERT_VALUES = {"local_files_only": True, "token": "hf_not_a_token", "proxies": {}, "trust_remote_code": True,
                          "use_fast": False, "verbose": False, "code_revision": "main", "config": object()}


@pytest.mark.parametrize("name", list(hf_compat.TOKENIZER_INERT))
def test_inert_tokenizer_arguments_change_nothing(tokenizer_dir, name):
    base = KoGPTTokenizer.from_pretrained(tokenizer_dir)
    ours = KoGPTTokenizer.from_pretrained(tokenizer_dir, **{name: TOKENIZER_INERT_VALUES[name]})
    text = "안녕 [PAD] 세상"
    assert ours.encode(text) == base.encode(text) and ours.all_special_tokens == base.all_special_tokens


@pytest.mark.parametrize("name", list(hf_compat.TOKENIZER_REFUSED))
def test_refused_tokenizer_arguments(tokenizer_dir, name):
    with pytest.raises(NotImplementedError, match=name):
        KoGPTTokenizer.from_pretrained(tokenizer_dir, **{name: "wanted"})
    for off in (None, *hf_compat.TOKENIZER_REFUSED[name].off):
        KoGPTTokenizer.from_pretrained(tokenizer_dir, **{name: off})
    with pytest.raises(TypeError, match="pad_tokn"):
        KoGPTTokenizer.from_pretrained(tokenizer_dir, pad_tokn="[PAD]")


# --- generate() ------------------------------------------------------------------------------------------------

GENERATE_INERT_VALUES = {
    "use_cache": False, "synced_gpus": False, "use_model_defaults": True, "decoder_start_token_id": 0,
    "is_assistant": False, "cache_implementation": "static", "cache_config": {}, "max_cache_len": 64,
    "compile_config": object(), "disable_compile": True, "prefill_chunk_size": 2, "continuous_batching_config": {},
    "low_memory": True, "length_penalty": 2.0, "early_stopping": True,
}


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint)


@pytest.mark.parametrize("name", list(hf_compat.GENERATE_INERT))
def test_inert_generate_arguments_change_nothing(model, reference, name):
    assert torch.equal(model.generate(PROMPT, max_new_tokens=6, **{name: GENERATE_INERT_VALUES[name]}), reference)


@pytest.mark.parametrize("name", list(hf_compat.GENERATE_REFUSED))
def test_refused_generate_arguments(model, reference, name):
    with pytest.raises(NotImplementedError, match=name):
        model.generate(PROMPT, max_new_tokens=6, **{name: "wanted"})
    for off in (None, *hf_compat.GENERATE_REFUSED[name].off):
        assert torch.equal(model.generate(PROMPT, max_new_tokens=6, **{name: off}), reference)


def test_hf_generation_config_with_a_refused_field(model, reference):
    with pytest.raises(NotImplementedError, match="no_repeat_ngram_size"):
        model.generate(PROMPT, generation_config=transformers.GenerationConfig(no_repeat_ngram_size=2))
    config = transformers.GenerationConfig(max_new_tokens=6, use_cache=True, num_beam_groups=1)
    assert torch.equal(model.generate(PROMPT, generation_config=config), reference)
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(PROMPT, max_new_token=6)
