"""Text from token ids as they come, and OpenAI's text stop strings over it.

IncrementalDetokenizer turns each new token into the text it adds, so that the pieces add up to the decoded text of
the context and the tokens together: it decodes a short window ending at the new token against the same window
without it (vLLM's prefix/read offsets), so a sentencepiece token's leading space survives (a lone "▁foo" decodes
to "foo") and a token that ends inside a UTF-8 character adds "" until the character is complete.

StopStrings finds the first stop string in the generated text and says how much of the text may be sent already:
a suffix that could still grow into a stop string is held back (OpenAI never sends a stop string's beginning).
"""
from __future__ import annotations

INCOMPLETE = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives
CONTEXT_TOKENS = 6  # prompt tokens the first new token is decoded after (for its leading space)


class IncrementalDetokenizer:
    """add(token) -> the text the token adds after the context (the prompt's last tokens) and the tokens before it.

    Ids the tokenizer does not know (a vocabulary padded beyond the tokenizer's, as KoGPT's 64512 vs 64000) have no
    text; special tokens have none either (skip_special_tokens), as in the CLI's printer."""

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self._known = len(tokenizer)
        self.ids = [t for t in context if t < self._known][-CONTEXT_TOKENS:]
        self._prefix = 0  # ids[_prefix:_read] decode to text already given out
        self._read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if token >= self._known:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""  # nothing yet, or a character still incomplete: the next token carries it
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def peek(self, token: int) -> str:
        """The text `token` would add now, without adding it (the texts of top_logprobs' alternatives)."""
        if token >= self._known:
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        return self._decode(self.ids[self._prefix:] + [token])[len(before):]


def prompt_pieces(tokenizer, prompt_ids: list[int]) -> list[str]:
    """The text each prompt token adds (echo's logprobs tokens): the pieces of the decoded prompt."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.add(t) for t in prompt_ids]


class StopStrings:
    """OpenAI's `stop`: the text ends before the first stop string found in the generated text."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._searched = 0  # matches must end after this position of the text (earlier text was searched)

    def find(self, text: str) -> int | None:
        """The position where the text must end (the earliest stop string that ends after the text searched
        before), or None. Call it each time the text grows."""
        found = None
        for stop in self.stops:
            at = text.find(stop, max(0, self._searched - len(stop) + 1))
            if at >= 0 and (found is None or at < found):
                found = at
        self._searched = len(text)
        return found

    def skip(self, text: str) -> None:
        """The text so far may not end the request (min_tokens not reached): later matches must end after it."""
        self._searched = len(text)

    def sendable(self, text: str) -> int:
        """How much of the text can be sent: all but the longest suffix that begins some stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if stop.startswith(text[-k:]):
                    held = k
                    break
        return len(text) - held
