"""config.json -> GPTJConfig: KoGPT's fields, defaults, and what the runtime refuses."""
from __future__ import annotations

import json

import pytest

from kogpt_fast import ConfigError, GPTJConfig

# KoGPT6B-ryan1.5b's config.json fields (model card): n_inner null, untied lm_head, no pad id.
KOGPT = {
    "model_type": "gptj", "vocab_size": 64512, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
    "rotary_dim": 64, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "float16",
    "architectures": ["GPTJForCausalLM"], "attn_pdrop": 0.0,
}


def test_kogpt_config():
    c = GPTJConfig.from_dict(KOGPT)
    assert (c.n_inner, c.head_dim, c.rotary_dim, c.eos_token_ids, c.pad_token_id) == (16384, 256, 64, [1], None)
    assert c.torch_dtype == "float16" and c.extra["attn_pdrop"] == 0.0
    assert GPTJConfig.from_dict(c.to_dict()) == c


def test_hf5_dtype_key_and_eos_list():
    c = GPTJConfig.from_dict({**KOGPT, "torch_dtype": None, "dtype": "bfloat16", "eos_token_id": [1, 2]})
    assert c.torch_dtype == "bfloat16" and c.eos_token_ids == [1, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"rotary_dim": 63}, "rotary_dim=63 must be even"),
        ({"rotary_dim": 512}, r"rotary_dim=512 must be even and in \[2, head_dim=256\]"),
        ({"rotary_dim": None}, "rotary_dim must be an integer"),
        ({"n_head": 3}, "n_embd=4096 is not divisible by n_head=3"),
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"n_layer": 0}, "'n_layer' must be a positive integer"),
        ({"vocab_size": "big"}, "'vocab_size' must be a positive integer"),
        ({"eos_token_id": 70000}, r"eos_token_id=70000 is not a token id in \[0, vocab_size=64512\)"),
        ({"layer_norm_epsilon": -1}, "layer_norm_epsilon must be positive"),
    ],
)
def test_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        GPTJConfig.from_dict({**KOGPT, **change})


def test_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        GPTJConfig.from_json_file(tmp_path / "config.json")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPTJConfig.from_json_file(tmp_path / "config.json")
