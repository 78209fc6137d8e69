"""In-process grading of one completion: extract its final answer, then judge it.

Fast (a few ms, parses cached), under the judge's SIGALRM deadline when called from the
main thread. For batches with a hard per-item timeout use `jaxrast.eval.pool.GraderPool`.
"""

from __future__ import annotations

from jaxrast.eval.extract import Extraction, extract_answer
from jaxrast.eval.judge import DEFAULT_TIMEOUT, Gold, Judgement, Verdict, judge


def grade(
    completion: str,
    gold: Gold,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    last_number_fallback: bool = True,
) -> Verdict:
    """Extract the final answer of `completion` and judge it against `gold`."""
    found = extract_answer(completion, last_number_fallback=last_number_fallback)
    return verdict_of(found, judge(found.answer, gold, timeout=timeout))


def is_correct(
    completion: str,
    gold: Gold,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    last_number_fallback: bool = True,
) -> bool:
    """True when the completion's final answer matches `gold` (a string or a list of
    acceptable answers). The reward function for GRPO; see `GraderPool` for batches."""
    return grade(completion, gold, timeout=timeout, last_number_fallback=last_number_fallback).correct


def verdict_of(found: Extraction, judgement: Judgement) -> Verdict:
    """Combine an extraction and its judgement."""
    return Verdict(judgement.correct, found.answer, found.method, judgement.status, judgement.vote_key)
