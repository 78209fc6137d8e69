"""Grade completions against gold answers: extract the answer, judge it with math-verify.

Two entry points:

- `is_correct(completion, gold)` / `grade(completion, gold)`: in-process, fast (a few ms,
  parses cached). The judgement runs under a SIGALRM deadline when called from the main
  thread; elsewhere only the size guards apply.
- `GraderPool`: persistent worker processes with a *hard* per-item timeout (a worker stuck
  in C code is killed and replaced). Built once and reused, e.g. by a training loop:
  `pool.is_correct_many(completions, golds)`. `grade_many` uses a shared pool.

Model text is only ever parsed (LaTeX -> sympy via math-verify), never evaluated as code.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal

from jaxrast.extract import Extraction, extract_answer

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
    """Raise `GradingTimeout` in the block after `seconds` (main thread, POSIX only)."""
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
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
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
    text = _SPACED_DIGITS.sub("", text)
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


def _golds(gold: Gold) -> list[str]:
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


def _guard(answer: str | None) -> Judgement | None:
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
    guarded = _guard(answer)
    if guarded is not None:
        return guarded
    assert answer is not None
    text = normalise_answer(answer)
    key = vote_key_of(answer)
    try:
        with deadline(timeout):
            pred = _parse(text)
            if pred:
                key = str(pred[0])  # sympy's print: \frac{1}{2} and 1/2 vote together
            correct = any(_verify(_parse(normalise_answer(g)), pred) for g in _golds(gold))
        return Judgement(correct, "ok", key)
    except GradingTimeout:
        return Judgement(False, "timeout", key)
    except (Exception, RecursionError):  # a parser bug must cost one item, not the run
        return Judgement(False, "error", key)


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




# ------------------------------------------------------------------ process pool


def serve_worker() -> None:
    """Worker main loop: one JSON request per stdin line, one JSON reply per stdout line.

    Request `[answer, golds, timeout]`, reply `[correct, status, vote_key]`. Workers are
    fresh interpreters (not forks), so they never re-run the caller's `__main__`, never
    inherit JAX's threads, and exchange only JSON.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    for line in sys.stdin:
        answer, golds, timeout = json.loads(line)
        result = judge(answer, golds, timeout=timeout)
        replies.write(json.dumps([result.correct, result.status, result.vote_key]) + "\n")
        replies.flush()


class _Worker:
    """One grading process and the item it is working on."""

    def __init__(self) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from jaxrast.grading import serve_worker; serve_worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
        )
        self.task: tuple[int, float] | None = None  # (item index, hard deadline)

    def send(self, answer: str, golds: list[str], timeout: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([answer, golds, timeout]) + "\n")
        self.process.stdin.flush()

    def receive(self) -> Judgement:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("grading worker exited")
        correct, status, key = json.loads(line)
        return Judgement(correct, status, key)

    def stop(self, *, kill: bool = False) -> None:
        if not kill:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]
                self.process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class GraderPool:
    """Persistent grading processes with a hard wall-clock limit per item.

    Each item gets `timeout` seconds of SIGALRM deadline inside its worker, and the
    parent kills a worker still busy `grace` seconds after that (a sympy computation
    stuck in C ignores signals) and starts a fresh one. `processes=0` judges in this
    process (signal deadline only). Use as a context manager or call `close()`.
    """

    def __init__(self, processes: int | None = None, *, timeout: float = DEFAULT_TIMEOUT, grace: float = 2.0):
        self.processes = _cpu_count() if processes is None else processes
        self.timeout = timeout
        self.grace = grace
        self._workers: list[_Worker] = []

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (a later call starts new ones)."""
        for worker in self._workers:
            worker.stop(kill=worker.task is not None)
        self._workers = []

    def judge_many(
        self, answers: Sequence[str | None], golds: Sequence[Gold], *, progress: bool = False
    ) -> list[Judgement]:
        """Judge extracted answers in parallel; identical (answer, gold) pairs once."""
        if len(answers) != len(golds):
            raise ValueError(f"{len(answers)} answers but {len(golds)} golds")
        results: list[Judgement | None] = [None] * len(answers)
        first: dict[tuple[str, tuple[str, ...]], int] = {}
        copies: list[tuple[int, int]] = []
        todo: deque[int] = deque()
        for i, answer in enumerate(answers):
            results[i] = _guard(answer)
            if results[i] is None:
                key = (answer, tuple(_golds(golds[i])))
                if key in first:
                    copies.append((i, first[key]))
                else:
                    first[key] = i
                    todo.append(i)
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), disable=not progress, desc="grading", unit="answer") as bar:
            if self.processes == 0:
                for i in todo:
                    results[i] = judge(answers[i], golds[i], timeout=self.timeout)
                    bar.update()
            else:
                self._run_workers(answers, golds, todo, results, bar)
        for i, j in copies:
            results[i] = results[j]
        return results  # type: ignore[return-value]

    def _run_workers(self, answers, golds, todo: deque[int], results: list, bar: Any) -> None:
        if not self._workers:
            self._workers = [_Worker() for _ in range(self.processes)]
        while todo or any(w.task for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.task is None and todo:
                    i = todo.popleft()
                    try:
                        worker.send(answers[i], _golds(golds[i]), self.timeout)
                    except OSError:  # died while idle: replace, retry
                        todo.appendleft(i)
                        self._replace(slot)
                        continue
                    worker.task = (i, time.monotonic() + self.timeout + self.grace)
            busy = [w for w in self._workers if w.task]
            soonest = min(w.task[1] for w in busy)  # type: ignore[index]
            ready = wait([w.process.stdout for w in busy], timeout=max(0.0, soonest - time.monotonic()))
            for slot, worker in enumerate(self._workers):
                if worker.task is None:
                    continue
                i, hard_deadline = worker.task
                if worker.process.stdout in ready:
                    try:
                        results[i] = worker.receive()
                        worker.task = None
                    except (EOFError, OSError, ValueError):  # the worker crashed on this item
                        results[i] = Judgement(False, "error", vote_key_of(answers[i]))
                        self._replace(slot)
                    bar.update()
                elif time.monotonic() > hard_deadline:
                    results[i] = Judgement(False, "timeout", vote_key_of(answers[i]))
                    self._replace(slot)
                    bar.update()

    def _replace(self, slot: int) -> None:
        self._workers[slot].stop(kill=True)
        self._workers[slot] = _Worker()

    def grade_many(
        self,
        completions: Sequence[str],
        golds: Sequence[Gold],
        *,
        last_number_fallback: bool = True,
        progress: bool = False,
    ) -> list[Verdict]:
        """Extract (here, linear time) and judge (in the workers) many completions."""
        found = [extract_answer(c, last_number_fallback=last_number_fallback) for c in completions]
        judged = self.judge_many([f.answer for f in found], golds, progress=progress)
        return [verdict_of(f, j) for f, j in zip(found, judged)]

    def is_correct_many(self, completions: Sequence[str], golds: Sequence[Gold]) -> list[bool]:
        """Batch `is_correct`: the GRPO reward for a batch of completions."""
        return [v.correct for v in self.grade_many(completions, golds)]


_SHARED: GraderPool | None = None


def shared_pool() -> GraderPool:
    """A process-wide pool with default settings, started on first use, closed at exit."""
    global _SHARED
    if _SHARED is None:
        _SHARED = GraderPool()
        atexit.register(_SHARED.close)
    return _SHARED


def grade_many(
    completions: Sequence[str],
    golds: Sequence[Gold],
    *,
    pool: GraderPool | None = None,
    last_number_fallback: bool = True,
    progress: bool = False,
) -> list[Verdict]:
    """Grade many completions in parallel (the shared pool unless one is given)."""
    return (pool or shared_pool()).grade_many(
        completions, golds, last_number_fallback=last_number_fallback, progress=progress
    )
