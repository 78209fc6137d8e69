"""The counters a scheduler's slot groups keep for progress bars and /metrics (`Stats`)."""

from __future__ import annotations

import threading
import time


class Stats:
    """Counters for progress bars and /metrics: tokens, finished rows, slot occupancy, and
    the speculative rounds' drafted / accepted tokens."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = self.finished = self.calls = 0
        self.slot_steps = self.busy_slot_steps = 0
        self.drafted = self.accepted = self.rounds = self.round_tokens = 0
        self.peak_rows = 0  # the most rows in flight at once, over every group
        self.pages_used = self.pages_total = self.peak_pages = 0  # KV pages, over every group
        self.moves = 0  # rows moved into lower slots (packing)
        self.preemptions = 0  # rows that gave their KV pages back, to run again later
        self.prefilled = self.shared = 0  # rows admitted with their own prefill / sharing a prompt's pages
        self.start = time.perf_counter()

    def record(self, out, *, finished: int, slots: int, speculative: bool) -> None:
        with self.lock:
            tokens = int(out.count.sum())
            self.tokens += tokens
            self.finished += finished
            self.calls += 1
            self.slot_steps += int(out.steps) * slots
            self.busy_slot_steps += int(out.rounds.sum()) if speculative else tokens
            if speculative:
                self.drafted += int(out.drafted.sum())
                self.accepted += int(out.accepted.sum())
                self.rounds += int(out.rounds.sum())
                self.round_tokens += tokens

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0

    @property
    def acceptance(self) -> float | None:
        """Share of drafted tokens the target accepted (None: no speculative round yet)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accepted_length(self) -> float | None:
        """Tokens a slot gained per speculative round (1 to γ + 1)."""
        return self.round_tokens / self.rounds if self.rounds else None
