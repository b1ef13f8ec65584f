"""Checkpoint layouts (safetensors, sharded safetensors, .bin with legacy buffers), dtypes, and load errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import hf_greedy, random_hf_model
from kogpt_fast import CheckpointError, ConfigError, KoGPTForCausalLM
from kogpt_fast.loader import CheckpointReader


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(seed=3, n_embd=64, n_head=2, rotary_dim=16, n_layer=2, vocab_size=101, n_positions=48)


@pytest.fixture(scope="module")
def safetensors_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("st")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def expected_tokens(hf_model):
    ids = torch.tensor([[5, 17, 33, 2, 90]])
    return ids, hf_greedy(hf_model, ids, torch.ones_like(ids), max_new_tokens=10)


def load(path, **kw):
    return KoGPTForCausalLM.from_pretrained(path, device="cpu", backend="torch", **kw)


def check_generates_like_hf(model, expected_tokens):
    ids, expected = expected_tokens
    assert torch.equal(model.generate(ids, max_new_tokens=10), expected)


def test_safetensors(safetensors_dir, expected_tokens):
    check_generates_like_hf(load(safetensors_dir), expected_tokens)


def test_sharded_safetensors(hf_model, tmp_path, expected_tokens):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    check_generates_like_hf(load(tmp_path), expected_tokens)


def write_bin_with_legacy_buffers(src, dst, n_layer):
    """A pytorch_model.bin as old GPT-J checkpoints ship it: weights plus attn.bias / attn.masked_bias buffers."""
    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src, "model.safetensors"))
    for i in range(n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    shutil.copy(os.path.join(src, "config.json"), dst)


def test_pytorch_bin_with_legacy_buffers(safetensors_dir, tmp_path, expected_tokens, hf_model):
    write_bin_with_legacy_buffers(safetensors_dir, tmp_path, hf_model.config.n_layer)
    check_generates_like_hf(load(tmp_path), expected_tokens)


def test_bin_that_is_not_plain_weights_is_refused(safetensors_dir, tmp_path):
    shutil.copy(safetensors_dir / "config.json", tmp_path)
    torch.save({"weights": {"x": torch.zeros(1)}, "hook": shutil.rmtree}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        load(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16", "bf16"])
def test_dtype_conversion(safetensors_dir, dtype):
    model = load(safetensors_dir, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else {"float16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {p.dtype for p in model.parameters()} == {want}
    out = model.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=4)
    assert out.shape == (1, 7)


def test_torch_dtype_alias(safetensors_dir):
    assert load(safetensors_dir, torch_dtype=torch.float16).dtype == torch.float16


def test_tied_lm_head(tmp_path):
    hf = random_hf_model(seed=1, n_embd=64, n_head=2, rotary_dim=16, vocab_size=101, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(model.generate(ids, max_new_tokens=6), hf_greedy(hf, ids, torch.ones_like(ids), 6))


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load(tmp_path / "nope")


def test_missing_weights(safetensors_dir, tmp_path):
    shutil.copy(safetensors_dir / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path)


def test_config_not_json(safetensors_dir, tmp_path):
    shutil.copy(safetensors_dir / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_layer=3), "missing tensor transformer.h.2.ln_1.weight"),
        (dict(n_layer=1), "unexpected tensor transformer.h.1.attn.q_proj.weight"),
        (dict(n_inner=100), r"transformer.h.0.mlp.fc_in.weight: shape \(256, 64\) in the checkpoint, \(100, 64\)"),
    ],
)
def test_config_disagrees_with_weights(safetensors_dir, tmp_path, change, message):
    shutil.copy(safetensors_dir / "model.safetensors", tmp_path)
    config = json.loads((safetensors_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path)


def test_missing_tensor_is_never_random(safetensors_dir, tmp_path):
    shutil.copy(safetensors_dir / "config.json", tmp_path)
    state = load_file(safetensors_dir / "model.safetensors")
    del state["lm_head.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor lm_head.bias"):
        load(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(safetensors_dir, tmp_path, keep):
    shutil.copy(safetensors_dir / "config.json", tmp_path)
    data = (safetensors_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)


def test_garbage_safetensors(safetensors_dir, tmp_path):
    shutil.copy(safetensors_dir / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)


def test_unsupported_config_is_refused(safetensors_dir, tmp_path):
    shutil.copy(safetensors_dir / "model.safetensors", tmp_path)
    config = json.loads((safetensors_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"config.json: model_type='llama' is not supported"):
        load(tmp_path)


def test_reader_lists_every_tensor(safetensors_dir, hf_model):
    with CheckpointReader(safetensors_dir) as reader:
        assert set(reader.names) == set(hf_model.state_dict()) - {
            k for k in hf_model.state_dict() if k.endswith("embed_positions")
        }


def test_hf_style_config_overrides(safetensors_dir):
    model = load(safetensors_dir, pad_token_id=7, low_cpu_mem_usage=True)
    assert model.config.pad_token_id == 7
    # HF's revision with a local directory is accepted and has no effect, as in HF; a typo is still refused
    assert load(safetensors_dir, revision="KoGPT6B-ryan1.5b-float16").config == load(safetensors_dir).config
    with pytest.raises(TypeError, match="revison"):
        load(safetensors_dir, revison="KoGPT6B-ryan1.5b-float16")
    with pytest.raises(ConfigError, match="pad_token_id=1000"):
        load(safetensors_dir, pad_token_id=1000)


def test_progress_bar(safetensors_dir, capsys):
    load(safetensors_dir, progress=True)
    err = capsys.readouterr().err
    assert "loading weights" in err and err.rstrip().endswith("/".join(["25"] * 2))
    load(safetensors_dir)  # small checkpoints load quietly by default
    assert capsys.readouterr().err == ""


def test_from_state_dict_shares_the_tensors(hf_model, expected_tokens):
    from kogpt_fast import GPTJConfig

    config = GPTJConfig.from_dict(hf_model.config.to_dict())
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("embed_positions")}
    model = KoGPTForCausalLM.from_state_dict(config, state, backend="torch")
    assert model.transformer.h[1].mlp.fc_in.weight.data_ptr() == state["transformer.h.1.mlp.fc_in.weight"].data_ptr()
    check_generates_like_hf(model, expected_tokens)
    del state["transformer.h.1.ln_1.bias"]
    with pytest.raises(CheckpointError, match="missing tensor transformer.h.1.ln_1.bias"):
        KoGPTForCausalLM.from_state_dict(config, state)


def test_a_device_that_is_not_here_is_a_clear_error(safetensors_dir, expected_tokens):
    """from_pretrained(device=...), model.to(...) and model.cuda() say what is missing instead of torch's
    AssertionError("Torch not compiled with CUDA enabled"); the model stays usable."""
    from kogpt_fast.backends import DeviceUnavailable

    missing, index = ("cuda:99", 99) if torch.cuda.is_available() else ("cuda", None)
    reason = "only" if torch.cuda.is_available() else "built without CUDA|no CUDA device is visible"
    with pytest.raises(DeviceUnavailable, match=reason):
        KoGPTForCausalLM.from_pretrained(safetensors_dir, device=missing)
    model = load(safetensors_dir)
    for move in (lambda: model.to(missing), lambda: model.to(device=missing, non_blocking=True),
                 lambda: model.cuda(index)):
        with pytest.raises(DeviceUnavailable, match=reason):
            move()
    assert model.device.type == "cpu"
    check_generates_like_hf(model, expected_tokens)
