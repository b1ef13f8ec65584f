"""Text from token ids as they come, and OpenAI's text stop strings over it.

IncrementalDetokenizer turns each new token into the text it adds, so that the pieces add up to the decoded text of
the context and the tokens together: it decodes a short window of the last tokens, which starts a few tokens back,
so a sentencepiece token's leading space survives (a lone "▁foo" decodes to "foo"), and a token that ends inside a
UTF-8 character adds "" until the character is complete.

StopStrings finds the first stop string in the generated text and says how much of the text may be sent already:
a suffix that could still grow into a stop string is held back (OpenAI never sends a stop string's beginning).
"""
from __future__ import annotations

INCOMPLETE = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives
CONTEXT_TOKENS = 6  # tokens a window starts with (the prompt's last ones at first), for the next token's leading space
WINDOW_TOKENS = 24  # a window this long starts again from its last CONTEXT_TOKENS


class IncrementalDetokenizer:
    """add(token) -> the text the token adds after the context (the prompt's last tokens) and the tokens before it.

    One decode per token: a window of the last tokens is decoded, and what goes beyond the text already given out is
    the new text (decoding more tokens only appends, except where an incomplete character gets completed). Special
    tokens have no text (skip_special_tokens, as in the CLI's printer), nor have ids the tokenizer does not know (a
    vocabulary padded beyond the tokenizer's, as KoGPT's 64512 vs 64000)."""

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self._silent = frozenset(tokenizer.all_special_ids)
        self._known = len(tokenizer)
        self.ids = [t for t in context if self._speaks(t)][-CONTEXT_TOKENS:]
        self._start = 0  # the window is ids[_start:]
        self._given = len(self._decode(self.ids))  # characters of the window's text already given out

    def _speaks(self, token: int) -> bool:
        return token < self._known and token not in self._silent

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def add(self, token: int) -> str:
        if not self._speaks(token):
            return ""
        self.ids.append(token)
        text = self._decode(self.ids[self._start:])
        if len(text) <= self._given or text.endswith(INCOMPLETE):
            return ""  # nothing yet, or a character still incomplete: a later token carries it
        new = text[self._given:]
        if len(self.ids) - self._start >= WINDOW_TOKENS:  # all given out: start a shorter window
            self._start = len(self.ids) - CONTEXT_TOKENS
            self._given = len(self._decode(self.ids[self._start:]))
        else:
            self._given = len(text)
        return new

    def peek(self, token: int) -> str:
        """The text `token` would add now, without adding it (the texts of top_logprobs' alternatives)."""
        if not self._speaks(token):
            return ""
        return self._decode(self.ids[self._start:] + [token])[self._given:]


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
