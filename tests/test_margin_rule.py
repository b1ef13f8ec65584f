"""The fast-path parity harness (tests/margin_rule.py) on the CPU, so that the GPU acceptance tests built on it run
on their first try: the torch backend in fp32 against HF fp32 eager (the same rounding: no mismatch at all), and a
model whose lm_head was nudged must fail it."""
from __future__ import annotations

import torch

from kogpt_fast import KoGPTForCausalLM, demo_model_path
from margin_rule import margin_report, teacher_forced_logits, ulp


def hf_greedy_with_logits(hf, ids, new):
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          pad_token_id=hf.config.eos_token_id, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.cat(out.logits).float()


def test_ulp_is_the_spacing_of_the_dtype():
    x = torch.tensor([1.0, 1.5, 4.0, -20.0])
    assert ulp(x, torch.float16).tolist() == [2 ** -10, 2 ** -10, 2 ** -8, 2 ** -6]
    assert ulp(x, torch.float32).tolist() == [2 ** -23, 2 ** -23, 2 ** -21, 2 ** -19]


def test_reference_backend_passes_and_a_nudged_model_fails():
    from transformers import GPTJForCausalLM

    path = demo_model_path()
    hf = GPTJForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = KoGPTForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    ids = torch.tensor([[5, 900, 17, 33, 1200]])
    sequences, hf_logits = hf_greedy_with_logits(hf, ids, new=12)
    report = margin_report(teacher_forced_logits(ours, sequences, ids.shape[1]), hf_logits, torch.float32, 4)
    assert report.steps == hf_logits.shape[0] > 1
    assert not report.failures and not report.allowed_mismatches, str(report)
    with torch.no_grad():  # make the second choice win at every step
        second = hf_logits.topk(2).indices[:, 1]
        ours.lm_head.bias[second] += 50.0
    try:
        nudged = margin_report(teacher_forced_logits(ours, sequences, ids.shape[1]), hf_logits, torch.float32, 4)
    finally:
        with torch.no_grad():
            ours.lm_head.bias[second] -= 50.0
    assert nudged.failures, str(nudged)
