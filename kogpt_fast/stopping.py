"""Stopping criteria beyond eos and max_length, as HF applies them: `stop_strings` (with `tokenizer=`) and the
caller's `stopping_criteria`. After each new token, every criterion gives a BoolTensor [B] (True: that row is
done); they are OR-ed with eos, and a row that is done is padded from then on, as HF does.

A stop string matches, as in HF's StopStringCriteria, when it occurs in the text of a row's last tokens and its end
lies inside the newest token: "stop" matches after ["st", "op"], ["sto", "pper"] and ["las", "topper"], not after
["stop", "at"]; the matched text stays in the output. HF matches each token's own string (bytes for byte-level
vocabularies); here the last tokens are decoded with the tokenizer given, which agrees wherever each token decodes to
whole characters (a stop string split inside one UTF-8 character is matched here, and not by HF).
"""
from __future__ import annotations

import torch


class StopStrings:
    """HF's stop_strings for rows whose real tokens start at `first_token[b]` (left padding is never decoded)."""

    def __init__(self, stop_strings, tokenizer, first_token: list[int]):
        strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(
                "stop_strings need the model's tokenizer: pass tokenizer= to generate() (as HF requires)"
            )
        self.strings, self.tokenizer, self.first_token = list(strings), tokenizer, first_token
        # Every token adds at least one byte of text, so this many last tokens hold any match (with room to spare).
        self.window = max(len(s.encode("utf-8")) for s in self.strings) + 8

    def __call__(self, sequences: torch.Tensor, scores=None) -> torch.Tensor:
        """sequences [B, T] (the newest token last) -> BoolTensor [B]."""
        rows = sequences.tolist()
        done = [self.ends_in_stop(row[max(first, len(row) - self.window):])
                for row, first in zip(rows, self.first_token)]
        return torch.tensor(done, dtype=torch.bool, device=sequences.device)

    def ends_in_stop(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        before = self.tokenizer.decode(ids[:-1]) if len(ids) > 1 else ""
        newest = common_prefix_length(before, text)  # where the newest token's text begins
        for stop in self.strings:
            last = text.rfind(stop)
            if last >= 0 and last + len(stop) > newest:
                return True
        return False


def common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Stopping:
    """The stop strings and the caller's HF-style criteria, called as HF calls them: (input_ids, scores), where
    scores is the tuple of processed scores so far when they are being returned, else None."""

    def __init__(self, criteria: list):
        self.criteria = criteria

    @classmethod
    def build(cls, stop_strings, tokenizer, stopping_criteria, first_token: list[int]) -> "Stopping | None":
        criteria = [StopStrings(stop_strings, tokenizer, first_token)] if stop_strings is not None else []
        for criterion in stopping_criteria or []:
            if not callable(criterion):
                raise TypeError(f"stopping_criteria must be callables (input_ids, scores) -> BoolTensor [batch], "
                                f"got {type(criterion).__name__}")
            criteria.append(criterion)
        return cls(criteria) if criteria else None

    def __call__(self, sequences: torch.Tensor, scores) -> torch.Tensor:
        done = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        for criterion in self.criteria:
            result = torch.as_tensor(criterion(sequences, scores), device=sequences.device)
            if result.dtype != torch.bool or result.shape not in ((), done.shape):
                raise TypeError(f"a stopping criterion must return a bool or a BoolTensor [{done.shape[0]}], got "
                                f"{result.dtype} of shape {tuple(result.shape)}")
            done = done | result
        return done
