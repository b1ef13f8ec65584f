"""`python -m kogpt_fast.quality` on the demo model: int8 and fp8 weights keep the perplexity within 2% of fp32, and
the figures mean what the module says."""
from __future__ import annotations

import json

import pytest
import torch

from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer, quality

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def demo_inputs(num_prompts=3, new_tokens=8):
    tokenizer = KoGPTTokenizer.from_pretrained()
    text = quality.DEMO_TEXT.read_text(encoding="utf-8")
    return torch.tensor(tokenizer.encode(text)), quality.text_prompts(tokenizer, text, num_prompts, 8), new_tokens


@pytest.fixture(scope="module")
def report():
    models = {s: quality.load_scheme(None, s, "cpu", torch.float32, "torch") for s in ("float32", "int8", "fp8")}
    tokens, prompts, new_tokens = demo_inputs()
    return quality.evaluate(models, tokens, prompts, window=512, new_tokens=new_tokens)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_demo_perplexity_within_2_percent_of_fp32(report, scheme):
    row = report["schemes"][scheme]
    assert row["weights"] == scheme and row["dtype"] == "float32"
    assert abs(row["vs_reference"] - 1) <= 0.02, row
    assert 0 < row["max_logit_diff"] < 2.0, row  # quantized, so not 0; a bound far below a broken kernel's
    assert row["greedy_agreement"] >= 0.9, row
    assert row["resident_bytes"] < 0.4 * report["schemes"]["float32"]["resident_bytes"]


def test_reference_row_and_counts(report):
    ref = report["schemes"]["float32"]
    assert report["reference"] == "float32" and ref["vs_reference"] == 1.0 and ref["max_logit_diff"] == 0.0
    assert ref["greedy_agreement"] == 1.0 and ref["greedy_prefix"] == 1.0
    assert report["tokens_scored"] == 351 and report["prompts"] == 3  # the demo text: 352 tokens in one window
    assert 1 < ref["perplexity"] < 2400  # better than uniform over the vocabulary


def test_token_logits_are_the_prefill_logits_at_every_position():
    model = KoGPTForCausalLM.from_pretrained(None, device="cpu", backend="torch")
    ids = torch.tensor([523, 1851, 1002, 7, 900])
    every = quality.token_logits(model, ids)
    assert every.shape == (5, model.config.vocab_size)
    for t in (1, 3, 5):
        torch.testing.assert_close(every[t - 1], model.next_token_logits(ids[None, :t])[0], rtol=1e-5, atol=1e-5)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert quality.main(["--device", "cpu", "--schemes", "float32,int8", "--num-prompts", "1", "--new-tokens", "3",
                         "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "int8" in table and "perplexity" in table
    saved = json.loads(out.read_text())
    assert set(saved["schemes"]) == {"float32", "int8"} and saved["prompts"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "float32,int4"], "not among"),
    (["--schemes", "int8,int8"], "repeat"),
    (["--model", "/nonexistent"], "--text is needed"),
])
def test_bad_arguments_are_errors(argv, message, capsys):
    assert quality.main(["--device", "cpu", *argv]) == 1
    assert message in capsys.readouterr().err


def test_bad_counts_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--window", "1"])
    assert e.value.code == 2 and "--window must be positive" in capsys.readouterr().err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_quantized_demo_on_the_kernel_backends(backend):
    """The GPU's fast path (fp16, fused GEMMs, the GEMV kernels, CUDA graphs) with int8 and fp8 weights: perplexity
    within 2% of fp32 on the same GPU. fp8 on a GPU below compute capability 8.9 is refused (tests/test_quant.py)."""
    schemes = ["float32", "int8"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
    models = {s: quality.load_scheme(None, s, "cuda", torch.float16, backend if s != "float32" else "torch")
              for s in schemes}
    tokens, prompts, new_tokens = demo_inputs(num_prompts=8, new_tokens=32)
    rows = quality.evaluate(models, tokens, prompts, window=512, new_tokens=new_tokens)["schemes"]
    for scheme in schemes[1:]:
        assert rows[scheme]["backend"] == backend and abs(rows[scheme]["vs_reference"] - 1) <= 0.02, rows[scheme]
        assert rows[scheme]["greedy_agreement"] >= 0.9, rows[scheme]
