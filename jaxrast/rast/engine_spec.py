"""The static shape of an engine (`EngineSpec`): everything in it is compiled in, chosen
once when the engine is made; and the platform defaults it starts from."""

from __future__ import annotations

import dataclasses

import jax


def default_prefill_chunk() -> int:
    """Prompt tokens per prefill forward: 32 on CPU (a prompt wastes at most 31 padded
    positions), 256 on accelerators (a wide forward costs about what a narrow one does)."""
    return 32 if jax.default_backend() == "cpu" else 256


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """The static shape of an engine: everything here is compiled in."""

    max_slots: int = 16
    max_len: int = 1024  # positions per slot: prompt + generated tokens (+ γ draft positions)
    steps: int = 32  # decode steps per call (fewer when a slot finishes and requests wait)
    prefill_batch: int = 8  # prompts per admit call (padding rows are dropped)
    # prompt tokens per prefill forward: every prompt length runs the one admit program; a
    # prompt wastes at most chunk - 1 padded positions
    prefill_chunk: int = 32
    max_stop_ids: int = 8
    max_forced: int = 32  # tokens of a continue text
    gamma: int = 0  # speculative rounds: the first pair's rl model drafts γ tokens (0: plain steps only)
    # slot counts a decode call is compiled for (None: powers of two up to max_slots); a call
    # runs the smallest that holds its live rows, packed in the low slots
    buckets: tuple[int, ...] | None = None
    # positions per KV page (None: one page per slot, of its whole length: the dense layout)
    page_size: int | None = None
    # pages in each model's KV pool (None: every slot's whole length, as many as max_slots
    # dense rows hold); a row takes pages as it is admitted (`rast.pages.PagePool`)
    pages: int | None = None

    def __post_init__(self):
        for name in ("max_slots", "max_len", "steps", "prefill_batch", "prefill_chunk", "max_stop_ids", "max_forced"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineSpec.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("page_size", "pages"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineSpec.{name} must be >= 1 (or None), got {getattr(self, name)}.")
        if self.page_size is not None and self.page_size % 8:
            raise ValueError(f"EngineSpec.page_size {self.page_size}: a multiple of 8 (the attention kernels' tile).")
        if self.gamma < 0:
            raise ValueError(f"EngineSpec.gamma must be >= 0, got {self.gamma}.")
        if self.buckets is None:
            object.__setattr__(self, "buckets", power_buckets(self.max_slots))
        buckets = tuple(sorted(set(int(b) for b in self.buckets)))
        if not buckets or buckets[0] < 1 or buckets[-1] != self.max_slots:
            raise ValueError(f"EngineSpec.buckets {self.buckets}: slot counts >= 1, the largest max_slots "
                             f"({self.max_slots}).")
        object.__setattr__(self, "buckets", buckets)


def power_buckets(max_slots: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `max_slots`, then `max_slots`."""
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return (*out, max_slots)
