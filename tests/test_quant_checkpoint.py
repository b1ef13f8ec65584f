"""Quantized checkpoints: from_pretrained(quantize=...), `kogpt-fast convert --quantize`, loading them back, and the
errors (another scheme, foreign quantization configs, bad values, damaged quantized tensors)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import random_hf_model
from kogpt_fast import CheckpointError, ConfigError, KoGPTForCausalLM, quant
from kogpt_fast.cli import main
from kogpt_fast.convert import convert


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    hf = random_hf_model(seed=5, n_embd=64, n_head=2, rotary_dim=16, n_layer=2, vocab_size=101, n_positions=48)
    path = tmp_path_factory.mktemp("dense")
    hf.save_pretrained(path)  # float32
    return path


def load(path, **kw):
    return KoGPTForCausalLM.from_pretrained(path, device="cpu", backend="torch", **kw)


@pytest.mark.parametrize("scheme", list(quant.SCHEMES))
def test_convert_writes_a_checkpoint_that_loads_without_requantizing(dense_dir, tmp_path, scheme):
    dst = tmp_path / scheme
    assert main(["convert", str(dense_dir), str(dst), "--quantize", scheme]) == 0
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "kogpt-fast" and qc["scheme"] == scheme and qc["scale_dtype"] == "float32"
    tensors = load_file(dst / "model.safetensors")
    storage = quant.STORAGE_DTYPES[scheme]
    assert tensors["transformer.h.1.mlp.fc_in.weight"].dtype == storage
    assert tensors["lm_head.weight"].dtype == storage and tensors["lm_head.weight_scale"].shape == (101,)
    assert tensors["transformer.wte.weight"].dtype == torch.float32  # the embedding stays dense
    assert torch.equal(tensors["transformer.h.0.attn.out_proj.weight_scale"],
                       tensors["transformer.h.0.mlp.fc_out.weight_scale"])
    # Loading it gives the same weights as quantizing the dense checkpoint at load time, and never re-quantizes:
    # what the file holds is what the model holds.
    from_file, at_load = load(dst), load(dense_dir, quantize=scheme)
    assert quant.model_scheme(from_file) == scheme
    mine, theirs = from_file.state_dict(), at_load.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    data = from_file.transformer.h[0].mlp.fc_in.weight.data
    assert torch.equal(data, tensors["transformer.h.0.mlp.fc_in.weight"])
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    assert torch.equal(from_file.generate(ids, max_new_tokens=6), at_load.generate(ids, max_new_tokens=6))
    # A float16 load of the file: scales and dense tensors in float16, the quantized data as stored.
    half = load(dst, dtype="float16")
    assert half.dtype == torch.float16 and torch.equal(half.transformer.h[0].mlp.fc_in.weight.data, data)


def test_convert_quantized_in_shards_with_a_dtype(dense_dir, tmp_path):
    dst = convert(dense_dir, tmp_path / "q", dtype="float16", quantize="int8", shard_bytes=8_000)
    assert (dst / "model.safetensors.index.json").is_file() and len(list(dst.glob("model-*.safetensors"))) > 2
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["quantization_config"]["scale_dtype"] == "float16"
    model = load(dst, dtype="float16")
    assert model.lm_head.weight.scale.dtype == torch.float16
    expected = quant.quantize(load(dense_dir).lm_head.weight, "int8", torch.float16)  # from float32, scales float16
    assert torch.equal(model.lm_head.weight.data, expected.data) and torch.equal(model.lm_head.weight.scale,
                                                                                 expected.scale)


def test_another_scheme_is_refused_by_name(dense_dir, tmp_path):
    dst = convert(dense_dir, tmp_path / "int8", quantize="int8")
    assert quant.model_scheme(load(dst, quantize="int8")) == "int8"  # asking for its own scheme is fine
    with pytest.raises(ValueError, match=r"holds int8 weights .* not as quantize='fp8'"):
        load(dst, quantize="fp8")
    with pytest.raises(ValueError, match="quantized checkpoint \\(int8\\) already"):
        convert(dst, tmp_path / "again", quantize="fp8")


def test_bad_quantize_values_are_refused(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        load(dense_dir, quantize="int4")
    with pytest.raises(ValueError, match="quantize='INT8' is not supported"):
        convert(dense_dir, tmp_path / "x", quantize="INT8")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["--quantize", "int4", "--prompt", "x"], ["convert", "a", "b", "--quantize", "int4"]])
def test_cli_quantize_flag_is_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_cli_generates_with_int8_weights(capsys):
    assert main(["--device", "cpu", "--quantize", "int8", "--prompt", "국회는", "--greedy", "--max-new-tokens", "8",
                 "--debug"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("국회는") and "weights int8" in out.err


def test_foreign_quantization_configs_are_refused(dense_dir, tmp_path):
    path = tmp_path / "gptq"
    shutil.copytree(dense_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quant_method='gptq' is not supported"):
        load(path)
    config["quantization_config"] = {"quant_method": "kogpt-fast", "scheme": "int4"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="scheme='int4'"):
        load(path)


@pytest.fixture()
def int8_dir(dense_dir, tmp_path):
    return convert(dense_dir, tmp_path / "int8", quantize="int8")


def edit_tensors(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_damaged_quantized_checkpoints_are_refused(int8_dir):
    edit_tensors(int8_dir, lambda t: t.update({"transformer.h.0.attn.q_proj.weight":
                                               t["transformer.h.0.attn.q_proj.weight"].float()}))
    with pytest.raises(CheckpointError, match="q_proj.weight has dtype torch.float32; a int8 checkpoint stores"):
        load(int8_dir)


def test_missing_scales_are_listed(int8_dir):
    edit_tensors(int8_dir, lambda t: t.pop("transformer.h.1.mlp.fc_in.weight_scale"))
    with pytest.raises(CheckpointError, match="missing tensor transformer.h.1.mlp.fc_in.weight_scale"):
        load(int8_dir)


def test_unshared_out_scales_are_refused(int8_dir):
    edit_tensors(int8_dir, lambda t: t["transformer.h.1.mlp.fc_out.weight_scale"].mul_(2))
    with pytest.raises(CheckpointError, match="out_proj.weight_scale and .*fc_out.weight_scale differ"):
        load(int8_dir)
