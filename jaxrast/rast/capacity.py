"""How many rows an engine decodes at once: what the work needs, capped by the KV memory the
devices hold for dense slots (each slot keeps `max_len` positions in every model) and by a
ceiling past which a bigger step stops paying on the platform.

The engine's shape is fixed when it is built, so the slot count comes from memory and the
ceiling; each decode call then runs at the smallest compiled bucket holding its live rows
(`EngineSpec.buckets`), so slots no call uses cost memory, not time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from jaxrast.models.attention import cache_length
from jaxrast.plan.concurrency import kv_bytes_per_token

# the share of free memory the KV caches may take: on a CPU the host's RAM is shared with
# the process and everyone else; an accelerator's is free after the weights are loaded
KV_SHARE = {"cpu": 0.5}
DEFAULT_KV_SHARE = 0.9
# slots at most: on 2 CPU cores a 64-row step of SmolLM2-135M reaches 2.8x the tokens/s of a
# 16-row one, and beyond that a step mostly waits on memory
CEILING = {"cpu": 64}
DEFAULT_CEILING = 256


@dataclasses.dataclass(frozen=True)
class Capacity:
    """An engine's slot count and why: `reason` is 'explicit' (the caller's count), 'memory'
    (the KV memory holds no more) or 'ceiling' (the platform's useful most)."""

    slots: int
    reason: str
    fit: int  # slots the KV memory holds
    slot_bytes: int  # KV bytes one slot holds across every model
    kv_bytes: int  # KV memory given to the caches
    pages: int | None = None  # paged: pages of `page_size` positions in each model's pool (None: dense slots)
    page_size: int | None = None

    def describe(self) -> str:
        gib = self.slot_bytes / 2**30
        why = {"explicit": "as asked", "memory": "all the KV memory holds", "work": "every row of the work",
               "ceiling": f"the platform's ceiling; memory holds {self.fit}"}[self.reason]
        if self.pages is not None:
            return (f"{self.slots} rows in flight at most ({why}), on {self.pages} KV pages of {self.page_size} "
                    f"positions ({self.pages * self.page_size:,} positions; a full row holds "
                    f"{gib * 1024:.1f} MiB)")
        return f"{self.slots} rows in flight ({why}; {gib * 1024:.1f} MiB of KV cache a row)"


def slot_bytes(models: Sequence, max_len: int) -> int:
    """KV bytes of one dense slot of `max_len` positions across `models` (keys, values, mask)."""
    positions = cache_length(max_len)
    return sum(positions * (kv_bytes_per_token(m.cfg, np.dtype(m.dtype).itemsize) + 1) for m in models)


def free_memory(device=None) -> int:
    """Bytes free on `device` (default: the first local one): an accelerator's allocator
    limit minus its use; a CPU's available RAM (`MemAvailable`)."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_memory_bytes(kv_memory: float | str | None, *, devices: int = 1, free: int | None = None) -> int:
    """KV bytes for the caches over `devices`: `kv_memory` in GiB per device (a number, or
    its text), or a share of each device's free memory ('50%'); None: the platform's share."""
    share = KV_SHARE.get(jax.local_devices()[0].platform, DEFAULT_KV_SHARE)
    if kv_memory is not None:
        text = str(kv_memory).strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            value = float("nan")
        if not (value > 0 and (value <= 1 or not text.endswith("%"))):
            raise ValueError(f"kv_memory={kv_memory!r}: give GiB per device (a number > 0, e.g. 2.5) or a share of "
                             "free memory ('50%').")
        if not text.endswith("%"):
            return int(value * 2**30) * devices
        share = value
    return int(share * (free_memory() if free is None else free)) * devices


def plan_slots(models: Sequence, max_len: int, *, slots: int | None = None, kv_memory: float | str | None = None,
               devices: int = 1, multiple: int = 1, needed: int | None = None,
               page_size: int | None = None) -> Capacity:
    """The engine's slot count: `slots` if given, else as many as the KV memory holds, at most
    the platform's ceiling and the `needed` rows of a known workload, a multiple of
    `multiple` (a mesh's row split). Paged (`page_size`): the KV memory sizes a pool of
    pages (no more than the slots' full rows would hold) and the slots bound the rows in
    flight: the platform's ceiling, or the work's rows."""
    per_slot = slot_bytes(models, max_len)
    budget = kv_memory_bytes(kv_memory, devices=devices)
    fit = max(budget // per_slot, 0)
    if slots is not None:
        count, reason = slots, "explicit"
    else:
        ceiling = CEILING.get(jax.local_devices()[0].platform, DEFAULT_CEILING)
        rows = ceiling if page_size is not None else fit  # paged, memory bounds tokens, not rows
        count, reason = (ceiling, "ceiling") if rows >= ceiling else (fit, "memory")
        if needed is not None and needed < count:  # rounded up to the split, never past what fits
            count, reason = min(-(-needed // multiple) * multiple, count), "work"
        count = count // multiple * multiple
        if page_size is not None:  # a ceiling below the mesh's split: one row per device block
            count = max(count, multiple)
    if count < 1:
        raise ValueError(f"the KV memory ({budget / 2**30:.2f} GiB) holds no slot of {max_len} positions "
                         f"({per_slot / 2**30:.2f} GiB a slot across the models): lower max_len, or give more "
                         "memory with kv_memory (GiB per device) or batch_size.")
    if page_size is None:
        return Capacity(count, reason, fit, per_slot, budget)
    row_pages = -(-cache_length(max_len) // page_size)
    page_bytes = -(-per_slot * page_size // cache_length(max_len))  # page_size positions of every model
    pages = min(budget // page_bytes, count * row_pages) // multiple * multiple
    if pages < row_pages:
        raise ValueError(f"the KV memory ({budget / 2**30:.2f} GiB) holds {pages} pages of {page_size} positions, "
                         f"fewer than one row of {max_len} positions needs ({row_pages}): lower max_len, or give "
                         "more memory with kv_memory (GiB per device).")
    return Capacity(count, reason, fit, per_slot, budget, pages, page_size)
