"""Which slot and which KV pages each admitted request gets (`place`): slots in order, a row's
pages for its prompt and first decode call, and the samples of one prompt sharing its pages.

One rule for the question "do these requests fit?" (the scheduler asks it of a copy of the
page table before taking requests off its queue) and for the admission itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jaxrast.rast.pages import PagePool
from jaxrast.rast.requests import Request


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one request goes: its slot (None: a prompt only scored, no slot) and the index
    (in the placed requests) of the earlier row whose full prompt pages it shares (None:
    it prefills its own prompt)."""

    slot: int | None
    lead: int | None = None


def place(requests: Sequence[Request], free: list[int], pool: PagePool, *, chunk: int,
          positions: Callable[[Request], int], may_share: Callable[[Request], bool]) -> list[Placement]:
    """Places `requests` in order into the `free` slots (taken from its front) and `pool`'s
    pages (both changed), up to the first that does not fit: the placements of the longest
    head of `requests` that fits. A request shares the full pages
    of an earlier one of the same admit call (`chunk` requests a call) with the same prompt,
    where both `may_share` and their slots take pages from one device block: the prompt is
    prefilled once, and the sharer copies only its last, partly filled page."""
    out, leads = [], {}
    for i, req in enumerate(requests):
        if not req.params.max_tokens:
            out.append(Placement(None))
            continue
        key = (i // chunk, tuple(req.prompt_ids)) if may_share(req) else None
        lead = leads.get(key)
        full = (len(req.prompt_ids) - 1) // pool.page_size  # the prompt's full pages
        need = pool.pages_for(positions(req))
        slot = None
        if lead is not None and full:  # a free slot on the lead's device, with pages for the rest
            group = pool.group(out[lead].slot)
            slot = next((s for s in free if pool.group(s) == group and pool.free_pages(s) >= need - full), None)
            if slot is not None:
                pool.share(slot, out[lead].slot, full)
        if slot is None:  # the first free slot on a device with the pages
            lead, slot = None, next((s for s in free if pool.free_pages(s) >= need), None)
            if slot is None:
                break
        pool.grow(slot, positions(req))
        free.remove(slot)
        if key is not None and lead is None:
            leads.setdefault(key, i)
        out.append(Placement(slot, lead))
    return out
