"""Reward functions: rule-based math correctness by default, any Python callable besides.

A reward function is `fn(prompts, completions, **columns) -> list[float]`: `prompts` and
`completions` are lists of strings (one entry per completion, the prompt repeated for
each of its G samples) and every field of the data rows is passed as a keyword argument
holding one value per completion (`answer=[...]`, `id=[...]`, ...). Functions should
accept `**kwargs` for the columns they ignore. The total reward is the weighted sum.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]
MATH = "math"


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


class MathReward:
    """1.0 if the completion's final answer equals the row's `answer` (math-verify), else 0.0.

    Grading runs in a long-lived `GraderPool` (one hard timeout per item), started on
    first use and stopped by `close()`.
    """

    def __init__(self, processes: int | None = None, timeout: float = 5.0):
        self.processes, self.timeout = processes, timeout
        self._pool = None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[Any] = None,
                 **_: Any) -> list[float]:
        if answer is None:
            raise ValueError("the math reward needs an 'answer' field in every data row; "
                             "map it with data.fields (e.g. {answer: target}) or use another reward.")
        if self._pool is None:
            from jaxrast.eval.pool import GraderPool
            self._pool = GraderPool(self.processes, timeout=self.timeout)
        return [float(ok) for ok in self._pool.is_correct_many(list(completions), [_gold(a, i) for i, a in
                                                                                  enumerate(answer)])]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _gold(answer: Any, index: int) -> str | list[str]:
    """A row's gold answer as the grader takes it (`jaxrast.data.rows.gold_answer`)."""
    from jaxrast.data.rows import gold_answer

    try:
        return gold_answer(answer)
    except ValueError:
        raise ValueError(f"the math reward got no answer for completion {index} ({answer!r}); every data row "
                         "needs a gold answer (drop or fix such rows, or use another reward).") from None


def load_callable(spec: str) -> RewardFn:
    """'package.module:function' -> the function (the module must be importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r} is neither 'math' nor 'package.module:function'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err}); "
                         "put it on PYTHONPATH.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {attr!r}.")
    return fn


def resolve_rewards(spec: Mapping[str, float], *, workers: int | None = None) -> list[Reward]:
    """Config `rewards: {name: weight}` -> Reward objects ("math" or "module:function")."""
    return [Reward(name, MathReward(workers) if name == MATH else load_callable(name), float(weight))
            for name, weight in spec.items()]


def as_rewards(fns: Sequence[Reward | RewardFn | str | tuple], *, workers: int | None = None) -> list[Reward]:
    """Accepts Reward objects, bare callables (weight 1), reward names ("math",
    "module:function"), or (fn or name, weight) / (name, fn, weight) tuples."""
    out = []
    for item in fns:
        if isinstance(item, str) or (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            name, weight = (item, 1.0) if isinstance(item, str) else item
            out.extend(resolve_rewards({name: weight}, workers=workers))
        elif isinstance(item, Reward):
            out.append(item)
        elif callable(item):
            out.append(Reward(getattr(item, "__name__", type(item).__name__), item))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(Reward(getattr(item[0], "__name__", "reward"), item[0], float(item[1])))
        elif isinstance(item, tuple) and len(item) == 3:
            out.append(Reward(str(item[0]), item[1], float(item[2])))
        else:
            raise ValueError(f"cannot use {item!r} as a reward; give a callable, (fn, weight) or a Reward.")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}; name them with Reward(name, fn, weight).")
    return out


def row_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> {field: [value per row]} over the union of fields (missing values are None)."""
    keys = dict.fromkeys(k for row in rows for k in row if k not in ("prompts", "completions"))
    return {k: [row.get(k) for row in rows] for k in keys}


def compute_rewards(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str],
                    rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [N], {name: raw values [N]}) for N completions and their rows."""
    columns = row_columns(rows)
    total = np.zeros(len(completions), np.float64)
    parts = {}
    for r in rewards:
        values = list(r.fn(list(prompts), list(completions), **columns))
        if len(values) != len(completions):
            raise ValueError(f"reward {r.name!r} returned {len(values)} values for {len(completions)} completions.")
        try:
            arr = np.array([float(v) for v in values], np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"reward {r.name!r} must return numbers, got {values[:3]}...") from None
        if not all(math.isfinite(v) for v in arr):
            raise ValueError(f"reward {r.name!r} returned a non-finite value; rewards must be finite floats.")
        parts[r.name] = arr
        total += r.weight * arr
    return total, parts


def close_rewards(rewards: Sequence[Reward]) -> None:
    """Stops reward resources (grading pools)."""
    for r in rewards:
        close = getattr(r.fn, "close", None)
        if callable(close):
            close()
