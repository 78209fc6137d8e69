"""How many rows decode at once: dense slots (every slot holds its full budget of KV
positions in every model) against paged KV (a row holds the pages its tokens fill, and a
request's samples share their prompt's pages), for the KV memory left after the weights and
activations.

A long-tailed reasoning workload is modelled as budgets drawn from a log-normal (σ = 1, as
`benchmarks/long_tail.py` draws them) with a given median, capped at the budget: a paged row
costs its expected length, E[min(L, cap)], plus half a page of rounding on average.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from jaxrast.models.config import ModelConfig
from jaxrast.plan.memory import kv_cache_buffers

SIGMA = 1.0  # the log-normal's σ: the long-tail benchmark's


def kv_bytes_per_token(cfg: ModelConfig, nbytes: int) -> int:
    """Keys and values of one position in every layer (the dense plan's own buffers, for one
    row of one position)."""
    return sum(b.total() for b in kv_cache_buffers(cfg, 1, 1, nbytes))


def expected_capped_lognormal(median: float, cap: float, sigma: float = SIGMA) -> float:
    """E[min(L, cap)] for L log-normal with this median and σ: E[L; L < cap] + cap · P(L ≥ cap)."""
    if median <= 0 or cap <= 0:
        raise ValueError(f"the median ({median}) and the cap ({cap}) of the lengths must be > 0.")
    mu = math.log(median)
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma ** 2 / 2) * phi(z - sigma) + cap * (1 - phi(z))


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_len: int
    new_tokens: int  # the budget: every dense slot reserves it
    median_new: int  # the median generated length (log-normal, σ = 1, capped at the budget)
    samples: int = 1  # rows per prompt (n): with pages they share the prompt's
    page_size: int = 16


def concurrency(models: Sequence[tuple[str, ModelConfig]], work: Workload, kv_budget_bytes: float,
                nbytes: int) -> dict:
    """Rows that fit `kv_budget_bytes` of KV memory (all devices together), dense and paged,
    with the bytes that decide them."""
    per_token = {name: kv_bytes_per_token(cfg, nbytes) for name, cfg in models}
    token = sum(per_token.values())
    expected_new = expected_capped_lognormal(work.median_new, work.new_tokens)
    dense_row = token * (work.prompt_len + work.new_tokens)
    rounding = work.page_size / 2  # the last page of a row is half empty on average
    paged_row = token * (work.prompt_len + expected_new + rounding)
    shared_row = token * (work.prompt_len / work.samples + expected_new + rounding)
    fit = lambda row: max(0, int(kv_budget_bytes // row))  # noqa: E731
    return {"kv_bytes_per_token": per_token, "kv_budget_bytes": kv_budget_bytes,
            "expected_new_tokens": expected_new, "dense_row_bytes": dense_row, "paged_row_bytes": paged_row,
            "dense_rows": fit(dense_row), "paged_rows": fit(paged_row), "paged_rows_shared_prompt": fit(shared_row),
            "samples": work.samples, "page_size": work.page_size, "median_new_tokens": work.median_new}
