"""Accuracy metrics over k samples per problem (pure functions, no I/O).

- avg@n: the mean accuracy over all n samples of a problem, averaged over problems
  (every sample counts, not just the first run);
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), for a
  problem with c correct out of n samples, averaged over problems, for every k <= n;
- maj@k: whether the most common answer among the first k samples (by sample index) is
  correct; ties go to the answer seen first; samples without an answer do not vote;
- recovery rate RR = (acc_rast - acc_base) / (acc_rl - acc_base).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProblemResult:
    """The graded samples of one problem, ordered by sample index."""

    id: str
    correct: tuple[bool, ...]
    vote_keys: tuple[str | None, ...]  # equal keys are the same answer for voting
    groups: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"subject": "Algebra"}

    @property
    def n(self) -> int:
        return len(self.correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: P(at least one of k draws without replacement
    from n samples, c of them correct, is correct) = 1 - C(n-c, k) / C(n, k).

    Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge
    binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(vote_keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Is the most frequent answer correct? Ties: the answer that appeared first.

    A class of equal keys takes the verdict of its first member. Samples with no
    answer (key None) do not vote; with no votes at all the result is False.
    """
    counts: dict[str, int] = {}
    verdict: dict[str, bool] = {}
    for key, ok in zip(vote_keys, correct):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        verdict.setdefault(key, ok)
    if not counts:
        return False
    best = max(counts.values())
    winner = next(key for key, count in counts.items() if count == best)  # first seen
    return verdict[winner]


def maj_at_k(problem: ProblemResult, k: int) -> bool:
    """Majority vote over the first k samples."""
    if not 1 <= k <= problem.n:
        raise ValueError(f"maj@{k} needs at least {k} samples, problem {problem.id} has {problem.n}")
    return majority_correct(problem.vote_keys[:k], problem.correct[:k])


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def recovery_rate(acc_base: float, acc_rast: float, acc_rl: float) -> float | None:
    """(acc_rast - acc_base) / (acc_rl - acc_base): the share of the RL gain that RAST
    recovers. None when the RL model does not differ from the base (undefined; a gain
    within float rounding of 0 counts as none, or the ratio would be ~1e15)."""
    gain = acc_rl - acc_base
    if math.isclose(gain, 0.0, abs_tol=1e-9) or any(math.isnan(x) for x in (acc_base, acc_rast, acc_rl)):
        return None
    return (acc_rast - acc_base) / gain


def default_ks(n: int) -> list[int]:
    """Powers of two up to n, and n itself: the k's shown in tables."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if n in ks else [*ks, n]


def summarise(problems: Sequence[ProblemResult], ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Metrics of a set of problems.

    Returns `num_problems`, `samples` (min/max n), `metrics` (flat, for tables:
    `avg@n`, `pass@k` and `maj@k` for the chosen ks), `pass_at_k` (every k <= min n) and
    `maj_at_k` (the chosen ks). ks larger than the smallest n are dropped.
    """
    if not problems:
        return {"num_problems": 0, "samples": {"min": 0, "max": 0}, "metrics": {}, "pass_at_k": {}, "maj_at_k": {}}
    n_min = min(p.n for p in problems)
    n_max = max(p.n for p in problems)
    chosen = sorted({k for k in (ks or default_ks(n_min)) if 1 <= k <= n_min})
    counts = [(p.n, sum(p.correct)) for p in problems]
    pass_curve = {k: mean(pass_at_k(n, c, k) for n, c in counts) for k in range(1, n_min + 1)}
    maj = {k: mean(float(maj_at_k(p, k)) for p in problems) for k in chosen}
    avg_name = f"avg@{n_min}" if n_min == n_max else "avg"
    metrics = {avg_name: mean(c / n for n, c in counts)}
    metrics.update({f"pass@{k}": pass_curve[k] for k in chosen})
    metrics.update({f"maj@{k}": maj[k] for k in chosen})
    return {
        "num_problems": len(problems),
        "samples": {"min": n_min, "max": n_max},
        "metrics": metrics,
        "pass_at_k": {str(k): v for k, v in pass_curve.items()},
        "maj_at_k": {str(k): v for k, v in maj.items()},
    }


def summarise_groups(
    problems: Sequence[ProblemResult], fields: Sequence[str], ks: Sequence[int] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """`{field: {value: {"num_problems": .., **metrics}}}` for each grouping field."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in fields:
        buckets: dict[str, list[ProblemResult]] = {}
        for p in problems:
            if name in p.groups and p.groups[name] is not None:
                buckets.setdefault(str(p.groups[name]), []).append(p)
        out[name] = {
            value: {"num_problems": len(members), **summarise(members, ks)["metrics"]}
            for value, members in sorted(buckets.items(), key=lambda kv: _natural_key(kv[0]))
        }
    return out


def accuracy_metric(metrics: Mapping[str, float], name: str = "avg") -> float:
    """Look up a metric by name; "avg" matches whichever `avg@n` the summary has."""
    if name in metrics:
        return metrics[name]
    if name == "avg":
        for key, value in metrics.items():
            if key == "avg" or key.startswith("avg@"):
                return value
    raise ValueError(f"metric {name!r} not in results (have {sorted(metrics)})")


def _natural_key(text: str) -> tuple[Any, ...]:
    # "Level 10" after "Level 9"; numbers before words.
    return (0, float(text), text) if _is_number(text) else (1, 0.0, text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
