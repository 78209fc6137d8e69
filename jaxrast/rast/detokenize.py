"""A row's text, grown one decode call at a time at O(1) host cost per token.

Re-decoding a row's whole token list after every call costs O(n) per call, O(n²) per
stream. Here a call decodes only its own tokens (and any left from a partial character),
after the previous call's tokens as context (a tokenizer may spell a token differently at
the start of a decode, e.g. without its leading space): one decode per call in the common
case. The stop-string search and the streamed pieces look only at the text's tail, and a
stop string's token is located inside the call that completed it.
"""

from __future__ import annotations

from typing import Callable, Sequence

PARTIAL = "\ufffd"  # what a tokenizer decodes an incomplete multi-byte character to
MAX_PARTIAL_TOKENS = 4  # a character is at most 4 bytes: at most 4 tokens can hold one partly


class TextStream:
    """The text of a row's tokens so far. `extend` takes a call's new tokens; `stop_in_call`
    finds a stop string they completed; `safe_end` bounds what a stream may show."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, tuple(stops)
        self.keep = max(map(len, self.stops), default=1) - 1  # tail characters a stop string may start in
        self.pieces: list[str] = []  # the text, joined only when asked for whole
        self.length = 0
        self.tokens = 0  # tokens extended so far
        self.context: list[int] = []  # the last complete tokens: decoded before new ones for their spelling
        self.context_text = ""
        self.pending: list[int] = []  # tokens after the context whose text is not complete yet
        self.tail, self.tail_start = "", 0  # text[tail_start:]: the last call's text and `keep` before it
        self.floor: int | None = None  # text length at min_tokens tokens, once past them
        # the last call: its text started at `call_start`; its tokens (pending ones first) at `call_first`
        self.call_start, self.call_first = 0, 0
        self.call_context, self.call_context_text, self.call_ids = [], "", []

    def extend(self, ids: Sequence[int]) -> None:
        """Adds a decode call's new tokens."""
        self.call_start, self.call_first = self.length, self.tokens - len(self.pending)
        self.call_context, self.call_context_text = self.context, self.context_text
        self.call_ids = new = self.pending + [int(t) for t in ids]
        self.tokens += len(ids)
        read, text = self._complete(new)
        added = text[len(self.context_text):] if read else ""
        if read:
            self.context, self.pending = new[:read], new[read:]
            self.context_text = self.decode(self.context)
        else:
            self.pending = new
        self.pieces.append(added)
        self.length += len(added)
        self.tail = self.tail[max(0, len(self.tail) - self.keep):] + added
        self.tail_start = self.length - len(self.tail)

    def _complete(self, new: list[int]) -> tuple[int, str]:
        """(how many of `new` end on a complete character, the text of context + those)."""
        for read in range(len(new), max(len(new) - MAX_PARTIAL_TOKENS, 0), -1):
            text = self.decode(self.context + new[:read])
            if not text.endswith(PARTIAL):
                return read, text
        return 0, self.context_text

    def _call_text(self, count: int) -> str:
        """The text of the last call's first `count` tokens (a partial character as the
        tokenizer spells it, as decoding a row's whole prefix would)."""
        return self.decode(self.call_context + self.call_ids[:count])[len(self.call_context_text):]

    def text(self) -> str:
        """All of the tokens' text; a trailing incomplete character as the tokenizer spells it."""
        pending = self.decode(self.context + self.pending)[len(self.context_text):] if self.pending else ""
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
        if not self.stops or self.tokens <= after_tokens:
            return None
        if self.floor is None:  # the call that passed min_tokens: the text length there
            self.floor = self.call_start + len(self._call_text(after_tokens - self.call_first)) if after_tokens else 0
        search_from = max(self.tail_start, self.call_start - self.keep)
        lows = [max(search_from, self.floor - len(s) + 1) - self.tail_start for s in self.stops]
        found = [i for s, low in zip(self.stops, lows) for i in [self.tail.find(s, low)] if i >= 0]
        if not found:
            return None
        first = min(found)
        before_call = self.tail[:self.call_start - self.tail_start]

        def holds(count: int) -> bool:  # the text of the call's first `count` tokens holds a stop at `first`
            head = before_call + self._call_text(count)
            return any(0 <= head.find(s, low) <= first for s, low in zip(self.stops, lows))

        lo, hi = max(1, after_tokens + 1 - self.call_first), len(self.call_ids)  # the completing token
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
        return self.call_first + lo, "".join(self.pieces)[:self.tail_start + first]
