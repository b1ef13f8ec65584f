"""The fast path (kernel backends, fp16, fused GEMMs, CUDA-graph decode) against HF fp16 eager, on a GPU.

The parity bar (tests/margin_rule.py): KoGPT-6B-shape random weights, teacher-forced on HF's greedy tokens, give
HF's argmax wherever HF's top-2 logit margin is at least BOUND_ULPS ulps of its top logit. Our tokens are fed through
the same decode steps (and graphs) that generate() uses.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from kogpt_fast import GPTJConfig, KoGPTForCausalLM
from margin_rule import margin_report, teacher_forced_logits
from gpu_requirements import require_backend

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench/ is used from the checkout, not installed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KOGPT6B = dict(vocab_size=64512, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=16384)
PROMPT, NEW = 32, 48
# 28 layers of fp16 GEMMs in another order (fused, split-K, one rounding per epilogue) move the logits by several
# ulps; with N(0, 1/fan_in) weights the top logit is about 4-5 (ulp 2^-8), so 32 ulps is about 0.125, close to the
# 0.1 of issue 6's bar. The report prints the largest difference seen, to tighten this with.
BOUND_ULPS = 32


@pytest.fixture(scope="module")
def kogpt6b():
    """KoGPT-6B-shape random fp16 weights on the GPU, shared by HF (eager) and the models under test."""
    from bench.e2e import HFSystem, random_weights

    config = GPTJConfig(**KOGPT6B)
    weights = random_weights(config, torch.device("cuda"), torch.float16, seed=0)
    return config, weights, HFSystem(config, weights, "eager").model


# prefill_path "torch": the prompt's projections on cuBLAS and its attention on SDPA (kogpt_fast.torch_prefill),
# decode on the kernels.
@pytest.mark.parametrize("backend, prefill_path", [("triton", "kernel"), ("cuda", "kernel"), ("cuda", "torch")])
def test_kogpt6b_shape_teacher_forced_argmax(kogpt6b, backend, prefill_path):
    config, weights, hf = kogpt6b
    device = torch.device("cuda")
    require_backend(backend, device)
    ids = torch.randint(2, config.vocab_size, (1, PROMPT), device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=1, output_logits=True, return_dict_in_generate=True)
    hf_logits = torch.stack(out.logits, dim=1)[0].float()  # [NEW, vocab]
    gc.collect()  # the previous case's model (its fused weights are an 11 GB copy) is garbage in a reference cycle
    torch.cuda.empty_cache()
    ours = KoGPTForCausalLM.from_state_dict(config, weights, backend=backend)
    ours.prefill_path = prefill_path
    assert ours.fused() and ours.backend() == backend
    report = margin_report(teacher_forced_logits(ours, out.sequences, PROMPT), hf_logits, torch.float16, BOUND_ULPS)
    print(f"margin rule, {backend} prefill={prefill_path}: {report}")
    assert report.under_rule < NEW * 0.75, f"{report}: too few positions with a clear margin to test anything"
    assert not report.failures, f"argmax differs from HF's where HF's margin is clear: {report.failures} ({report})"
    step = ours._decode_steps[1]
    assert step.graph is not None, "the decode step was not captured as a CUDA graph"
