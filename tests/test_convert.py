"""`kogpt-fast convert`: .bin -> safetensors, dtype, shards, and atomic output."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from hf_reference import random_hf_model
from kogpt_fast import CheckpointError, KoGPTForCausalLM
from kogpt_fast.cli import main
from kogpt_fast.convert import convert
from test_loader import write_bin_with_legacy_buffers


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
    hf = random_hf_model(seed=4, n_embd=64, n_head=2, rotary_dim=16, n_layer=2, vocab_size=101, n_positions=48)
    st = tmp_path_factory.mktemp("st")
    hf.save_pretrained(st)
    out = tmp_path_factory.mktemp("bin")
    write_bin_with_legacy_buffers(st, out, n_layer=2)
    return out


def load(path):
    return KoGPTForCausalLM.from_pretrained(path, device="cpu", backend="torch")


def test_convert_bin_to_safetensors_keeps_the_weights(bin_dir, tmp_path):
    dst = tmp_path / "out"
    assert main(["convert", str(bin_dir), str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    original = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    converted = load_file(dst / "model.safetensors")
    assert set(converted) == {k for k in original if not k.endswith(("attn.bias", "attn.masked_bias"))}
    assert all(torch.equal(converted[k], original[k]) for k in converted)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    assert torch.equal(load(dst).generate(ids, max_new_tokens=8), load(bin_dir).generate(ids, max_new_tokens=8))


def test_convert_to_float16_in_shards(bin_dir, tmp_path):
    dst = convert(bin_dir, tmp_path / "half", dtype="float16", shard_bytes=20_000)
    assert (dst / "model.safetensors.index.json").is_file()
    assert len(list(dst.glob("model-*.safetensors"))) > 2
    model = KoGPTForCausalLM.from_pretrained(dst, device="cpu", dtype="float32", backend="torch")
    original = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    w = model.transformer.h[1].mlp.fc_in.weight
    assert torch.equal(w, original["transformer.h.1.mlp.fc_in.weight"].half().float())
    assert '"torch_dtype": "float16"' in (dst / "config.json").read_text()


def test_existing_destination_is_refused(bin_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        convert(bin_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_failed_conversion_leaves_nothing(bin_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bin_dir, src)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        convert(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temporary directory


def test_interrupted_conversion_leaves_nothing(bin_dir, tmp_path, monkeypatch):
    import kogpt_fast.loader as loader

    calls = []

    def interrupt(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, name)

    original = loader.CheckpointReader.get
    monkeypatch.setattr(loader.CheckpointReader, "get", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(bin_dir, tmp_path / "out", shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_error_is_a_message(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "missing" in capsys.readouterr().err


def test_cli_convert_from_the_hub_cache(tmp_path, capsys, monkeypatch):
    """`kogpt-fast convert kakaobrain/kogpt DST --revision R`: the source found in the local HF cache."""
    import huggingface_hub.constants

    from hub_fixtures import REVISIONS, build_fake_hub_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(build_fake_hub_cache(tmp_path / "hub")))
    assert main(["convert", "kakaobrain/kogpt", str(tmp_path / "out"), "--revision", "KoGPT6B-ryan1.5b"]) == 0
    assert main(["convert", "kakaobrain/kogpt", str(tmp_path / "out2"), "--revision", "nope"]) == 1
    err = capsys.readouterr().err
    assert "fetch it with:  hf download kakaobrain/kogpt --revision nope" in err and "Traceback" not in err
    model = KoGPTForCausalLM.from_pretrained(tmp_path / "out", device="cpu")
    assert model.config.n_positions == REVISIONS["KoGPT6B-ryan1.5b"][1]
