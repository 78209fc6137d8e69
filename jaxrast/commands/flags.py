"""The flags of `jaxrast eval`, `analyze` and `plan` as validated settings: each command
checks them once, by the field types every command and config shares
(`jaxrast.runtime.config`), before it reads a file or loads a model. An error names the
flag, the value and what would be accepted (`--top-n: input should be greater than or
equal to 1, got -3.`). Imported by the commands' `run`, not at start-up (pydantic)."""

from __future__ import annotations

from jaxrast.runtime.config import Fraction, NonNegative, Positive, PositiveFinite, config_dataclass


@config_dataclass
class EvalFlags:
    k: tuple[Positive, ...] | None = None
    workers: NonNegative | None = None  # 0: grade in this process
    timeout: PositiveFinite = 5.0


@config_dataclass
class AnalyzeFlags:
    limit: Positive | None = None
    batch_size: Positive = 8
    k: tuple[Positive, ...] = (1, 5)
    top_n: Positive = 20
    top_fraction: Fraction = 0.05
    min_occurrences: Positive = 3
    top_k: Positive = 5


@config_dataclass
class PlanFlags:
    batch: Positive | None = None
    prompt_len: Positive = 512
    new_tokens: Positive | None = None
    micro_batch: Positive = 1
    seq_len: Positive | None = None
    rollout_batch: Positive | None = None
    device_memory: PositiveFinite | None = None
    usable: Fraction = 0.9


def finite_lam(text: str, flag: str) -> float:
    """A pair's λ given on the command line: a finite number, else a ValueError naming `flag`."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{flag}: λ must be a finite number (e.g. 1.0), got {text!r}.")
    return value
