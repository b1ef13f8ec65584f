"""The fast path's parity rule against HF: teacher-forced on HF's greedy tokens, our argmax must equal HF's at every
step, except where HF's own top-2 margin is below a stated number of ulps of its top logit (there the two
implementations' different but equally valid roundings may order the top two either way).

Teacher forcing feeds HF's tokens to our model through the same prefill and decode steps (and CUDA graphs) that
generate() uses, so one near-tie does not send the rest of the comparison down another path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def teacher_forced_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """fp32 logits [T - prompt_len, vocab] for each next token of ids [1, T]: one prefill, then decode steps fed ids."""
    total = ids.shape[1]
    cache = model.cache_for([total])
    try:
        first = model._prefill(cache, ids[:, :prompt_len], torch.ones_like(ids[:, :prompt_len]), [prompt_len])
        logits = [first]
        if total - prompt_len > 1:
            cache.reserve(0, total - 1)
            step = model.decode_step(cache)
            for t in range(prompt_len, total - 1):
                logits.append(step(ids[:, t]).clone())
    finally:
        cache.release()
    return torch.cat(logits)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values at |x| (fp32 tensor of the same shape)."""
    exponent = torch.floor(torch.log2(x.float().abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent) * torch.finfo(dtype).eps


@dataclass
class MarginReport:
    steps: int  # positions compared
    under_rule: int  # positions where HF's margin is below the bound (a mismatch there is allowed)
    allowed_mismatches: list[int]  # positions that differ, all under the rule
    failures: list[int]  # positions that differ with a margin above the bound
    max_diff_ulps: float  # the largest |ours - HF| over the vocabulary, in ulps of HF's top logit

    def __str__(self) -> str:
        return (f"{self.steps} steps: {len(self.failures)} failures, {len(self.allowed_mismatches)} mismatches "
                f"allowed by the margin rule ({self.under_rule} steps under it), largest logit difference "
                f"{self.max_diff_ulps:.1f} ulps")

    def __add__(self, other: "MarginReport") -> "MarginReport":
        offset = self.steps
        return MarginReport(self.steps + other.steps, self.under_rule + other.under_rule,
                            self.allowed_mismatches + [offset + i for i in other.allowed_mismatches],
                            self.failures + [offset + i for i in other.failures],
                            max(self.max_diff_ulps, other.max_diff_ulps))


def margin_report(ours: torch.Tensor, hf: torch.Tensor, dtype: torch.dtype, bound_ulps: float) -> MarginReport:
    """Compare logits [steps, vocab] position by position under the margin rule."""
    ours, hf = ours.float(), hf.float()
    top2 = hf.topk(2, dim=-1).values
    unit = ulp(top2[:, 0], dtype)
    under = (top2[:, 0] - top2[:, 1]) < bound_ulps * unit
    differ = ours.argmax(-1) != hf.argmax(-1)
    diff_ulps = ((ours - hf).abs().amax(-1) / unit).max().item() if len(hf) else 0.0
    return MarginReport(
        steps=len(hf), under_rule=int(under.sum()),
        allowed_mismatches=(differ & under).nonzero().flatten().tolist(),
        failures=(differ & ~under).nonzero().flatten().tolist(), max_diff_ulps=diff_ulps,
    )
