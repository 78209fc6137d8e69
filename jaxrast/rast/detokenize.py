"""A row's text, grown one decode call at a time at O(1) host cost per token.

Re-decoding a row's whole token list after every call costs O(n) per call, O(n²) per
stream. Here each token decodes only a window: the tokens since the last complete
character, after the tokens of the piece before them (context: a tokenizer may spell a
token differently at the start of a decode, e.g. without its leading space). The stop-string
search and the streamed pieces look only at the text's tail.
"""

from __future__ import annotations

import bisect
from typing import Callable, Sequence

PARTIAL = "\ufffd"  # what a tokenizer decodes an incomplete multi-byte character to


class TextStream:
    """The text of a row's tokens so far. `extend` takes a call's new tokens; `stop_in_call`
    finds a stop string they completed; `safe_end` bounds what a stream may show."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, tuple(stops)
        self.keep = max(map(len, self.stops), default=1) - 1  # tail characters a stop string may start in
        self.pieces: list[str] = []  # the text, joined only when asked for whole
        self.length = 0
        self.ends: list[int] = []  # text length after each token
        self.window: list[int] = []  # tokens decoded together: context, then tokens not yet text
        self.context = 0  # how many of `window` are context (their text is `context_text`)
        self.context_text = ""
        self.tail, self.tail_start = "", 0  # text[tail_start:]: the last call's text and `keep` before it
        self.call_start = 0  # text length before the last call

    def extend(self, ids: Sequence[int]) -> None:
        """Adds a decode call's new tokens."""
        self.call_start = self.length
        added = []
        for token in ids:
            self.window.append(int(token))
            text = self.decode(self.window)
            if not text.endswith(PARTIAL):  # complete: the piece after the context is new text
                added.append(text[len(self.context_text):])
                self.length += len(added[-1])
                self.window = self.window[self.context:]
                self.context = len(self.window)
                self.context_text = self.decode(self.window)
            self.ends.append(self.length)
        self.pieces += added
        keep = self.tail[max(0, len(self.tail) - self.keep):]
        self.tail = keep + "".join(added)
        self.tail_start = self.length - len(self.tail)

    def text(self) -> str:
        """All of the tokens' text; a trailing incomplete character as the tokenizer spells it."""
        pending = self.decode(self.window)[len(self.context_text):] if self.context < len(self.window) else ""
        return "".join(self.pieces) + pending

    def text_between(self, start: int, end: int) -> str:
        """text[start:end], for `start` within the tail."""
        return self.tail[start - self.tail_start:end - self.tail_start]

    def safe_end(self) -> int:
        """How much of the text a stream may show: not a trailing start of a stop string,
        which must never be shown if the stop string completes."""
        for n in range(min(self.keep, len(self.tail)), 0, -1):
            if any(self.tail.endswith(s[:n]) for s in self.stops if len(s) > n):
                return self.length - n
        return self.length

    def stop_in_call(self, after_tokens: int = 0) -> tuple[int, str] | None:
        """(tokens up to and including the one completing the first stop string, the text
        before it), or None. Only occurrences completed in the last call (earlier ones
        ended the row then) and after the first `after_tokens` tokens (min_tokens) count."""
        if not self.stops or len(self.ends) <= after_tokens:
            return None
        floor = self.ends[after_tokens - 1] if after_tokens else 0
        search_from = max(self.tail_start, self.call_start - self.keep)
        found = []
        for s in self.stops:
            i = self.tail.find(s, max(search_from, floor - len(s) + 1) - self.tail_start)
            if i >= 0:
                found.append((i + self.tail_start, len(s)))
        if not found:
            return None
        first = min(i for i, _ in found)
        end = first + min(n for i, n in found if i == first)  # the shortest stop string there ends first
        count = max(bisect.bisect_left(self.ends, end) + 1, after_tokens + 1)
        return count, "".join(self.pieces)[:first]
