"""avg@n, unbiased pass@k, maj@k, recovery rate and grouping (pure functions)."""

from __future__ import annotations

import math
import random

import pytest

from jaxrast.eval.metrics import (
    ProblemResult,
    accuracy_metric,
    default_ks,
    maj_at_k,
    majority_correct,
    pass_at_k,
    recovery_rate,
    summarise,
    summarise_groups,
)


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_pass_at_k_equals_closed_form_for_every_c_and_k(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1024, 512) overflows float; the product form does not.
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    assert pass_at_k(1024, 0, 512) == 0.0


def test_pass_at_k_edge_cases_and_errors():
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is plain accuracy
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_k_matches_monte_carlo():
    rng = random.Random(0)
    n, c, k = 12, 3, 4
    hits = sum(any(rng.sample([1] * c + [0] * (n - c), k)) for _ in range(40_000))
    assert hits / 40_000 == pytest.approx(pass_at_k(n, c, k), abs=0.01)


def test_majority_vote():
    assert majority_correct(["a", "b", "a"], [True, False, True])
    assert not majority_correct(["a", "b", "b"], [True, False, False])
    assert majority_correct(["a", "b"], [True, False])  # tie: first seen wins
    assert not majority_correct(["b", "a"], [False, True])
    assert majority_correct([None, None, "a"], [False, False, True])  # no-answer does not vote
    assert not majority_correct([None, None], [False, False])


def test_maj_at_k_uses_the_first_k_samples():
    p = ProblemResult("1", (False, False, True, True, True), ("x", "x", "y", "y", "y"))
    assert not maj_at_k(p, 2)
    assert not maj_at_k(p, 4)  # 2-2 tie, "x" seen first
    assert maj_at_k(p, 5)
    with pytest.raises(ValueError):
        maj_at_k(p, 6)


def test_recovery_rate():
    assert recovery_rate(0.2, 0.5, 0.6) == pytest.approx(0.75)
    assert recovery_rate(0.2, 0.7, 0.6) == pytest.approx(1.25)  # RAST can beat RL
    assert recovery_rate(0.4, 0.5, 0.4) is None  # undefined without an RL gain
    base, rl = sum([.1, .2, .3]) / 3, sum([.3, .2, .1]) / 3  # equal up to float rounding
    assert base != rl and recovery_rate(base, 0.3, rl) is None


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(10) == [1, 2, 4, 8, 10]


def test_summarise():
    problems = [
        ProblemResult("a", (True, True, False, False), ("1", "1", "2", "3")),
        ProblemResult("b", (False, False, False, False), ("5", "5", None, "6")),
    ]
    s = summarise(problems)
    assert s["num_problems"] == 2 and s["samples"] == {"min": 4, "max": 4}
    m = s["metrics"]
    assert m["avg@4"] == pytest.approx(0.25)  # every sample counts, not just the first run
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx((closed_form(4, 2, 2) + 0) / 2)
    assert m["pass@4"] == pytest.approx(0.5)
    assert m["maj@4"] == pytest.approx(0.5)
    assert list(s["pass_at_k"]) == ["1", "2", "3", "4"]


def test_summarise_with_uneven_samples_and_custom_ks():
    problems = [ProblemResult("a", (True, False, True), ("1", "2", "1")), ProblemResult("b", (True,), ("1",))]
    s = summarise(problems, ks=[1, 2])
    assert "avg" in s["metrics"] and s["metrics"]["avg"] == pytest.approx((2 / 3 + 1) / 2)
    assert "pass@2" not in s["metrics"]  # k above the smallest n is dropped
    assert summarise([])["num_problems"] == 0


def test_summarise_groups_orders_levels_naturally():
    problems = [
        ProblemResult(str(i), (i % 2 == 0,), ("k",), {"level": str(level), "subject": "Algebra"})
        for i, level in enumerate([10, 2, 2, 1])
    ]
    groups = summarise_groups(problems, ["level", "subject", "missing"])
    assert list(groups["level"]) == ["1", "2", "10"]
    assert groups["level"]["2"]["num_problems"] == 2
    assert groups["subject"]["Algebra"]["avg@1"] == pytest.approx(0.5)
    assert groups["missing"] == {}


def test_accuracy_metric_lookup():
    assert accuracy_metric({"avg@8": 0.4, "pass@1": 0.4}) == 0.4
    assert accuracy_metric({"avg@8": 0.4, "maj@8": 0.5}, "maj@8") == 0.5
    with pytest.raises(ValueError, match="pass@64"):
        accuracy_metric({"avg@8": 0.4}, "pass@64")
