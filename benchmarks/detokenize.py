"""Host time per token of a long stream's text (detokenizing, stop-string search, the
streamed pieces): `SlotGroup.absorb` fed fake decode-call outputs of 32 tokens, one slot,
a stop string that never completes, a streaming consumer. Not a test: timings only.

    python benchmarks/detokenize.py            # µs per token at 256 and 4,096 tokens
"""

from __future__ import annotations

import functools
import time
import types

import numpy as np

from jaxrast.rast.pages import PagePool
from jaxrast.rast.requests import Request, RequestParams
from jaxrast.rast.slot_group import SlotGroup
from jaxrast.rast.stats import Stats
from jaxrast.rast.token_rules import Record
from jaxrast.toy.tokenizer import char_tokenizer

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=#:?.\n"
CALL = 32  # tokens per decode call (the engine's steps_per_call default)


def fake_out(tokens: list[int]):
    n = len(tokens)
    return types.SimpleNamespace(count=np.array([n]), tokens=np.array([tokens + [0] * (CALL - n)]),
                                 finished=np.array([False]), stopped=np.array([False]),
                                 logprobs=np.zeros((1, CALL), np.float32), forced_pos=np.array([-1]))


def group(tok) -> SlotGroup:
    g = SlotGroup.__new__(SlotGroup)  # the host half only: no engine, no device
    g.decode_text = functools.partial(tok.decode, skip_special_tokens=True)
    g.slots, g.release, g.record, g.last_speculative, g.admitted = {}, np.zeros(1, bool), Record(), False, []
    g.engine = types.SimpleNamespace(vocab=len(tok))
    g.spec = types.SimpleNamespace(max_slots=1)
    g.stats = Stats()
    g.stats.record = lambda *a, **k: None
    g.pool, g._pages_counted = PagePool(num_pages=1, page_size=8, per_slot=1, slots=1), 0
    return g


def per_token_us(tok, length: int, repeats: int = 3) -> float:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tok), length).tolist()
    best = float("inf")
    for _ in range(repeats):
        g = group(tok)
        req = Request([3], RequestParams(max_tokens=length, stop_strings=("\nQuestion:",)), on_update=lambda u: None)
        g.slots[0] = req
        start = time.perf_counter()
        for i in range(0, length, CALL):
            g.absorb((fake_out(ids[i:i + CALL]), []))
        best = min(best, time.perf_counter() - start)
    return best / length * 1e6


def main() -> None:
    tok = char_tokenizer(CHARS)
    short, long = per_token_us(tok, 256), per_token_us(tok, 4096)
    print(f"host text time per token: {short:.1f} µs at 256 tokens, {long:.1f} µs at 4,096 tokens "
          f"({long / short:.2f}x)")


if __name__ == "__main__":
    main()
