"""The whole model on backend="triton" gives HF's greedy tokens, and the backend is chosen as documented.

On the CPU the kernels run under TRITON_INTERPRET=1 in fp32 (tl.dot in IEEE precision) and must give HF eager's
greedy tokens exactly, as the torch backend does; the GPU tests (marked gpu) do the same on CUDA, and compare the
demo checkpoint in fp16 with HF fp16 eager on the same GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU interpreter
pytest.importorskip("triton", reason="triton is not installed")

from hf_reference import hf_greedy, random_hf_model  # noqa: E402
from hf_reference import left_padded_batch as _left_padded_batch  # noqa: E402
from kogpt_fast import KoGPTForCausalLM, backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KOGPT_HEADS = dict(n_embd=512, n_head=2, rotary_dim=64, n_layer=2)  # head_dim 256, rotary_dim 64, as KoGPT-6B
NEW_TOKENS = 8  # the interpreter runs about a second per step


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF reference model, our model on the triton backend, loaded from the reference's saved checkpoint)."""
    hf = random_hf_model(seed=3, **KOGPT_HEADS)
    path = tmp_path_factory.mktemp("kogpt_heads")
    hf.save_pretrained(path)
    ours = KoGPTForCausalLM.from_pretrained(path, device=DEVICE, dtype=torch.float32, backend="triton")
    assert ours.ops() is backends.triton_kernels("ops")
    return hf.to(DEVICE), ours


def left_padded_batch(lengths, vocab, pad, seed=0):
    return _left_padded_batch(lengths, vocab, pad, seed, device=DEVICE)


def assert_same_tokens(expected, got, prompt_len):
    new = expected[:, prompt_len:]
    assert len(set(new.flatten().tolist())) > 2, f"reference output is degenerate: {new.tolist()}"
    assert got.shape == expected.shape and torch.equal(got, expected), (
        f"tokens differ:\nexpected {new.tolist()}\ngot      {got[:, prompt_len:].tolist()}"
    )


@pytest.mark.parametrize("prompt_len, batch", [(1, 2), (7, 3)])
def test_greedy_equals_hf(pair, prompt_len, batch):
    hf, ours = pair
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(2, hf.config.vocab_size, (batch, prompt_len), generator=g).to(DEVICE)
    expected = hf_greedy(hf, ids, torch.ones_like(ids), max_new_tokens=NEW_TOKENS)
    assert_same_tokens(expected, ours.generate(ids, max_new_tokens=NEW_TOKENS), prompt_len)


def test_greedy_left_padded_batch_equals_hf(pair):
    """Prompts of 5, 1, 17 and 9 tokens: packed varlen prefill, then decode over pages of different lengths."""
    hf, ours = pair
    ids, mask = left_padded_batch([5, 1, 17, 9], hf.config.vocab_size, pad=hf.config.eos_token_id)
    expected = hf_greedy(hf, ids, mask, max_new_tokens=NEW_TOKENS)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    assert_same_tokens(expected, got, ids.shape[1])


def test_fused_gemms_on_triton_give_the_same_greedy_tokens(pair):
    """The fast path's two fused GEMMs (on by default only in fp16/bf16), forced on here in fp32."""
    hf, ours = pair
    ids, mask = left_padded_batch([5, 1, 9], hf.config.vocab_size, pad=hf.config.eos_token_id, seed=4)
    expected = hf_greedy(hf, ids, mask, max_new_tokens=NEW_TOKENS)
    ours.fuse_projections = True
    try:
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    finally:
        ours.fuse_projections = None
    assert_same_tokens(expected, got, ids.shape[1])


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_torch_prefill_gives_the_same_greedy_tokens(pair, fused, monkeypatch):
    """prefill_path="torch": the prefill's projections on torch's matmul and its attention on SDPA
    (kogpt_fast.torch_prefill), decode on the kernels; the cache the prefill leaves is the decode's input, so the
    later tokens check it too."""
    from kogpt_fast import torch_prefill

    hf, ours = pair
    ids, mask = left_padded_batch([6, 2, 11], hf.config.vocab_size, pad=hf.config.eos_token_id, seed=6)
    expected = hf_greedy(hf, ids, mask, max_new_tokens=NEW_TOKENS)
    calls = []
    for name in ("linear", "linear_gelu", "layer_norm_linear_split_gelu", "linear_split_gelu",
                 "linear_concat_residual", "prefill_attention"):
        original = getattr(torch_prefill, name)
        monkeypatch.setattr(torch_prefill, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ours.fuse_projections, ours.prefill_path = fused, "torch"
    try:
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    finally:
        ours.fuse_projections, ours.prefill_path = None, "kernel"
    assert_same_tokens(expected, got, ids.shape[1])
    layers = hf.config.n_layer
    if fused:  # the prefill step only: 2 GEMMs and the attention a layer
        layer = ["layer_norm_linear_split_gelu", "linear_split_gelu", "prefill_attention", "linear_concat_residual"]
    else:  # q, k, v, attention, out_proj, fc_in, fc_out
        layer = ["linear"] * 3 + ["prefill_attention", "linear", "linear_gelu", "linear"]
    assert calls == layer * layers


def test_bad_prefill_path_raises(pair):
    _, ours = pair
    ours.prefill_path = "cublas"
    try:
        with pytest.raises(ValueError, match="prefill_path='cublas' is not one of"):
            ours.generate(torch.tensor([[3, 4]], device=DEVICE), max_new_tokens=1)
    finally:
        ours.prefill_path = "kernel"


# Backend choice (kogpt_fast.backends): the triton backend where it can run, torch by default on the CPU.


def test_auto_stays_on_torch_on_the_cpu(monkeypatch):
    monkeypatch.delenv("KOGPT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve("auto", torch.device("cpu")) == "torch"  # the interpreter is for tests
    monkeypatch.setenv("KOGPT_BACKEND", "triton")
    assert backends.resolve("auto", torch.device("cpu")) == "triton"
    assert backends.get_ops("auto", torch.device("cpu")) is backends.triton_kernels("ops")


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", torch.device("cpu"))
    monkeypatch.setenv("KOGPT_BACKEND", "triton")
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.get_ops("auto", torch.device("cpu"))


def test_triton_is_unavailable_off_cuda_and_cpu():
    with pytest.raises(backends.BackendUnavailable, match="CUDA devices"):
        backends.resolve("triton", torch.device("meta"))


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_cuda_then_triton_on_a_gpu(monkeypatch):
    """cuda > triton > torch: the compiled library where it loads (gpu_check.sh builds it), else Triton."""
    from kogpt_fast import cuda_lib

    monkeypatch.delenv("KOGPT_BACKEND", raising=False)
    expected = "cuda" if cuda_lib.is_available() else "triton"
    assert backends.resolve("auto", torch.device("cuda")) == expected
    monkeypatch.setattr(cuda_lib, "is_available", lambda: False)
    assert backends.resolve("auto", torch.device("cuda")) == "triton"


def test_importing_kogpt_fast_does_not_import_triton():
    code = (
        "import sys, torch\n"
        "before = 'triton' in sys.modules  # (a torch build may import it itself)\n"
        "import kogpt_fast, kogpt_fast.model, kogpt_fast.backends, kogpt_fast.generation\n"
        "kogpt_fast.backends.resolve('auto', torch.device('cpu'))\n"
        "assert before or 'triton' not in sys.modules, 'importing kogpt_fast imported triton'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KOGPT_BACKEND"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


# On a GPU: fp32 parity as above, and the demo checkpoint in fp16 against HF fp16 eager on the same GPU.


@pytest.mark.gpu
@needs_cuda
def test_greedy_equals_hf_on_gpu_fp32_longer(pair):
    hf, ours = pair
    ids, mask = left_padded_batch([5, 1, 17, 40, 9, 2, 33, 12], hf.config.vocab_size, pad=hf.config.eos_token_id)
    expected = hf_greedy(hf, ids, mask, max_new_tokens=32)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32)
    assert_same_tokens(expected, got, ids.shape[1])


# HF fp16 eager's own greedy path on the demo checkpoint has top-2 margins of exactly 0 at two steps and of 2 ulps
# at three more, and the fused path's logits differ from HF's by 1-2 ulps: a flip needs a margin under twice that.
DEMO_BOUND_ULPS = 4


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend, prefill_path", [("triton", "kernel"), ("cuda", "kernel"), ("cuda", "torch")])
def test_demo_checkpoint_fp16_matches_hf_fp16_eager_under_the_margin_rule(backend, prefill_path):
    """20 prompts x 64 new tokens, one at a time (no padding), fp16, on the fast path (fused GEMMs, CUDA-graph
    decode) of each kernel backend, teacher-forced on HF's greedy tokens (tests/margin_rule.py): the issues'
    acceptance check."""
    from transformers import GPTJForCausalLM

    from gpu_requirements import require_backend
    from kogpt_fast import demo_model_path
    from margin_rule import MarginReport, margin_report, teacher_forced_logits

    require_backend(backend, DEVICE)
    path = demo_model_path()
    hf = GPTJForCausalLM.from_pretrained(path, dtype=torch.float16, attn_implementation="eager").to(DEVICE).eval()
    ours = KoGPTForCausalLM.from_pretrained(path, device=DEVICE, dtype=torch.float16, backend=backend)
    ours.prefill_path = prefill_path
    assert ours.fused() and ours.backend() == backend
    g = torch.Generator().manual_seed(0)
    total = MarginReport(0, 0, [], [], 0.0)
    for i in range(20):
        prompt_len = int(torch.randint(1, 40, (1,), generator=g))
        ids = torch.randint(2, hf.config.vocab_size, (1, prompt_len), generator=g).to(DEVICE)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                              pad_token_id=hf.config.eos_token_id, output_logits=True, return_dict_in_generate=True)
        hf_logits = torch.cat(out.logits).float()  # [new, vocab]: HF may stop early at eos
        report = margin_report(teacher_forced_logits(ours, out.sequences, prompt_len), hf_logits, torch.float16,
                               DEMO_BOUND_ULPS)
        assert not report.failures, f"prompt {i}: argmax differs where HF's margin is clear at {report.failures}"
        total = total + report
    print(f"margin rule, demo fp16, {backend} prefill={prefill_path}: {total}")
    assert ours._decode_steps[1].graph is not None, "decode did not replay a CUDA graph"
