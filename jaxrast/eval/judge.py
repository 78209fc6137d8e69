"""Judge an extracted answer against the gold with math-verify: the leaf of evaluation.

`judge(answer, gold)` normalises both, parses them (LaTeX -> sympy via math-verify, never
evaluated as code) and compares, under a SIGALRM deadline when called from the main
thread (elsewhere only the size guards apply). In-process grading of whole completions is
`jaxrast.eval.grading`; batches with a hard per-item timeout, `jaxrast.eval.pool`.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

Gold = str | Sequence[str]
Status = Literal["ok", "no_answer", "rejected", "timeout", "error"]

DEFAULT_TIMEOUT = 5.0  # seconds per judgement
# Guards applied before any parsing: real final answers are short and shallow. Longer or
# deeper strings are garbage (or attacks on the parser) and are graded incorrect at once.
MAX_ANSWER_CHARS = 1000
MAX_NESTING = 12  # gold answers nest at most 4 deep; latex2sympy slows sharply past ~15

_E_NOTATION = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)(?![\w.])")
_DOLLARS = re.compile(r"(?<!\\)\$")
# Bold / text wrappers around a whole answer: \textbf{(073)}, \mathbf{1 4 4 0 0}.
_BOLD = re.compile(r"\\(?:textbf|mathbf|boldsymbol|bm)\s*\{([^{}]*)\}")
# "1 4 4 0 0" (PDF-extracted bold digits) and "1 000 000" (thin-space thousands).
_SPACED_DIGITS = re.compile(r"(?<=\d)\s(?=\d)")
# LaTeX thousands spacing, "1\,000", "1\;000", "1~000", "1{,}000": only before a group of
# exactly three digits, so a decimal comma "3{,}5" is left alone.
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\\[,;:!]|\\ |~|\{,\})(?=\d{3}(?!\d))")
_PERCENT = re.compile(r"\s*\\?%\s*$")


class GradingTimeout(BaseException):
    """Raised by the SIGALRM deadline. A BaseException so that the broad
    `except Exception` blocks inside sympy / math-verify cannot swallow it."""


@dataclass(frozen=True)
class Judgement:
    """Whether an extracted answer matches the gold, and a key for majority voting."""

    correct: bool
    status: Status
    vote_key: str | None  # canonical form of the answer: equal keys vote together


@dataclass(frozen=True)
class Verdict:
    """The full record of grading one completion."""

    correct: bool
    answer: str | None  # the extracted answer string
    method: str | None  # "boxed" | "answer_is" | "last_number" | None
    status: Status
    vote_key: str | None


class _DropMathVerifyNoise(logging.Filter):
    # math-verify logs whole model outputs on its own timeouts and warns that we turned
    # those timeouts off (we run one deadline around the whole judgement instead).
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


for _name in ("math_verify", "math_verify.grader", "math_verify.parser", "math_verify.utils"):
    logging.getLogger(_name).addFilter(_DropMathVerifyNoise())


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise `GradingTimeout` in the block after `seconds` (main thread, POSIX only).

    The alarm repeats every 50 ms until the block ends: a raise that lands in a weakref
    callback or `__del__` is swallowed by Python ("Exception ignored in ..."), and a single
    alarm would then let the block run on without a deadline."""
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise GradingTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        while True:  # an alarm already pending may still raise here: disarm until it sticks
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except GradingTimeout:
                continue
        signal.signal(signal.SIGALRM, previous)


def nesting_depth(text: str) -> int:
    """Deepest nesting of (), [] and {} in `text` (escaped brackets count too)."""
    depth = deepest = 0
    for ch in text:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth = max(depth - 1, 0)
    return deepest


def normalise_answer(text: str) -> str:
    """Prepare an answer string for math-verify's LaTeX parser.

    Strips unescaped `$` and bold wrappers, joins digits split by spaces, spells
    e-notation as LaTeX (`4.5e33` -> `4.5\\times10^{33}`; math-verify would read `e` as
    Euler's number) and trims punctuation.
    """
    text = _DOLLARS.sub("", text).strip()
    for _ in range(3):  # \mathbf{\mathbf{...}} is rare; three levels is plenty
        text = _BOLD.sub(r"\1", text)
    text = _SPACED_DIGITS.sub("", _LATEX_THOUSANDS.sub("", text))
    text = _E_NOTATION.sub(r"\1\\times10^{\2}", text)
    return text.rstrip(".").strip()


def vote_key_of(answer: str) -> str:
    """Whitespace-free answer text: the majority-vote key when parsing is not possible."""
    return "".join(normalise_answer(answer).split())


@lru_cache(maxsize=8192)
def _parse(text: str) -> tuple[Any, ...]:
    """math-verify's parse of a normalised answer; cached (golds repeat across samples)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return tuple(
        parse(
            f"${text}$",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=None,  # our own deadline covers the whole judgement
        )
    )


def _verify(gold: tuple[Any, ...], pred: tuple[Any, ...]) -> bool:
    from math_verify import verify

    return bool(gold and pred and verify(list(gold), list(pred), timeout_seconds=None))


def canonical_key(expr: Any) -> str:
    """The majority-vote key of a parsed answer: sympy's print with every float made an
    exact rational, so 18, 18.0 and 36/2 (and 12.5 and \\frac{25}{2}) vote together."""
    try:
        import sympy

        floats = expr.atoms(sympy.Float)
        if floats:
            expr = expr.xreplace({f: sympy.Rational(str(f)) for f in floats})
    except (AttributeError, TypeError, ValueError):  # not a sympy expression (a string, a set)
        pass
    return str(expr)


def golds_of(gold: Gold) -> list[str]:
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


def guard(answer: str | None) -> Judgement | None:
    """The judgement for answers that must not reach the parser, else None."""
    if not answer or not answer.strip():
        return Judgement(False, "no_answer", None)
    if len(answer) > MAX_ANSWER_CHARS or nesting_depth(answer) > MAX_NESTING:
        return Judgement(False, "rejected", vote_key_of(answer[:MAX_ANSWER_CHARS]))
    return None


def judge(answer: str | None, gold: Gold, *, timeout: float | None = DEFAULT_TIMEOUT) -> Judgement:
    """Is the extracted `answer` equivalent to the gold (any of a list of golds)?

    Numbers, fractions, LaTeX expressions, intervals, sets / tuples, percentages and
    trailing units are compared by math-verify; any parser error or a timeout is
    "incorrect", with the reason in `status`.
    """
    guarded = guard(answer)
    if guarded is not None:
        return guarded
    assert answer is not None
    text = normalise_answer(answer)
    key = vote_key_of(answer)
    try:
        with deadline(timeout):
            pred = _parse(text)
            if pred:
                key = canonical_key(pred[0])
            golds = [normalise_answer(g) for g in golds_of(gold)]
            correct = any(_verify(_parse(g), pred) for g in golds)
            if not correct and any(_PERCENT.search(x) for x in (text, *golds)):
                # "12.5\%" vs "12.5": math-verify matches whole-number percentages only
                bare = _parse(_PERCENT.sub("", text))
                correct = any(_verify(_parse(_PERCENT.sub("", g)), bare) for g in golds)
        return Judgement(correct, "ok", key)
    except GradingTimeout:
        return Judgement(False, "timeout", key)
    except (Exception, RecursionError):  # a parser bug must cost one item, not the run
        return Judgement(False, "error", key)


