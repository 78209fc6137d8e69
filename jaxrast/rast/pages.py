"""The host's page table: which pages of the engine's KV pool each slot's positions live in,
which pages are free, and how many a row needs (`PagePool`).

Every model of an engine pages its cache alike (position p of slot s is in page
table[s, p // page_size] of every model's pool), so one table serves them all. The table is
the host's: the slot group sends it with each call (`Engine.decode`, `Engine.admit`), and an
entry of `num_pages` (no page) is never written or read. Where an engine's slots are split
over devices, each device holds its own block of the pool and a slot takes pages only from
its device's block (`groups`). The samples of one prompt share its full pages (`share`):
a page is free again when the last slot holding it lets it go.
"""

from __future__ import annotations

import numpy as np


class PagePool:
    """`num_pages` pages of `page_size` positions for `slots` slots of at most `per_slot`
    pages, in `groups` equal blocks (slot s takes pages from block s // (slots / groups))."""

    def __init__(self, *, num_pages: int, page_size: int, per_slot: int, slots: int, groups: int = 1):
        if num_pages % groups or slots % groups:
            raise ValueError(f"{num_pages} pages and {slots} slots do not split into {groups} device blocks.")
        self.num_pages, self.page_size, self.per_slot, self.slots = num_pages, page_size, per_slot, slots
        self.groups = groups
        block = num_pages // groups
        self._free = [list(range(g * block, (g + 1) * block)) for g in range(groups)]  # lowest first
        self.table = np.full((slots, per_slot), num_pages, np.int32)
        self.held = np.zeros(slots, np.int32)
        self.refs = np.zeros(num_pages, np.int32)  # slots holding each page
        self.peak = 0  # the most pages in use at once

    def group(self, slot: int) -> int:
        """The device block `slot` takes its pages from."""
        return slot // (self.slots // self.groups)

    def pages_for(self, positions: int) -> int:
        """Pages that hold `positions` positions (at most a slot's table)."""
        return min(-(-int(positions) // self.page_size), self.per_slot)

    def free_pages(self, slot: int = 0) -> int:
        """Free pages where `slot` takes its pages."""
        return len(self._free[self.group(slot)])

    @property
    def used(self) -> int:
        return self.num_pages - sum(len(f) for f in self._free)

    def grow(self, slot: int, positions: int) -> bool:
        """Gives `slot` pages for its first `positions` positions; False (nothing taken) if
        too few are free."""
        need = self.pages_for(positions) - int(self.held[slot])
        free = self._free[self.group(slot)]
        if need <= 0:
            return True
        if need > len(free):
            return False
        taken, free[:] = free[:need], free[need:]
        self.table[slot, self.held[slot]:self.held[slot] + need] = taken
        self.refs[taken] += 1
        self.held[slot] += need
        self.peak = max(self.peak, self.used)
        return True

    def share(self, slot: int, source: int, pages: int) -> None:
        """Free `slot` holds the first `pages` pages of `source` too (a sample of the same
        prompt: the prompt's full pages are read, never written, by both)."""
        if self.held[slot] or self.group(slot) != self.group(source) or pages > self.held[source]:
            raise ValueError(f"slot {slot} cannot share {pages} pages of slot {source}.")
        shared = self.table[source, :pages]
        self.table[slot, :pages] = shared
        self.refs[shared] += 1
        self.held[slot] = pages

    def release(self, slot: int) -> None:
        """Lets go of `slot`'s pages: those no other slot holds are free again."""
        free = self._free[self.group(slot)]
        held = self.table[slot, :self.held[slot]]
        self.refs[held] -= 1
        free.extend(int(p) for p in held if self.refs[p] == 0)
        free.sort()
        self.table[slot] = self.num_pages
        self.held[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s pages become free slot `dst`'s (a row packed into a lower slot keeps
        its keys where they are)."""
        if self.group(src) != self.group(dst):
            raise ValueError(f"slots {src} and {dst} take pages from different devices' blocks.")
        self.table[dst], self.held[dst] = self.table[src], self.held[src]
        self.table[src], self.held[src] = self.num_pages, 0
