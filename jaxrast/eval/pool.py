"""Grade many completions in parallel: persistent worker processes, hard per-item timeout.

`GraderPool` is built once and reused (a GRPO loop calls `pool.is_correct_many` every
step). Workers are fresh interpreters speaking JSON lines over pipes, so they never re-run
the caller's `__main__`, never inherit JAX's threads, and nothing is unpickled. Each item
gets the SIGALRM deadline of `jaxrast.eval.judge.judge` inside its worker; a worker still
silent `grace` seconds later (stuck in C code that ignores signals) is killed and replaced.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from jaxrast.eval.extract import extract_answer
from jaxrast.eval.grading import verdict_of
from jaxrast.eval.judge import DEFAULT_TIMEOUT, Gold, Judgement, Verdict, golds_of, guard, judge, vote_key_of


def serve_worker() -> None:
    """Worker main loop: one JSON request per stdin line, one JSON reply per stdout line.

    Request `[answer, golds, timeout]`, reply `[correct, status, vote_key]`. Workers are
    fresh interpreters (not forks), so they never re-run the caller's `__main__`, never
    inherit JAX's threads, and exchange only JSON.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    judge(r"\boxed{1}", ["1"], timeout=DEFAULT_TIMEOUT)  # load the lazily imported parsers now
    replies.write(json.dumps("ready") + "\n")  # item deadlines start after start-up, not before
    replies.flush()
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
            [sys.executable, "-c", "from jaxrast.eval.pool import serve_worker; serve_worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
        )
        self.task: tuple[int, float] | None = None  # (item index, hard deadline)
        self.ready = False

    def wait_ready(self, limit: float = 120.0) -> None:
        """Blocks until the worker has imported everything (its first line): a start-up on a
        loaded machine must not count against the first item's deadline."""
        assert self.process.stdout is not None
        started = wait([self.process.stdout], timeout=limit)
        if not started or json.loads(self.process.stdout.readline() or "0") != "ready":
            raise RuntimeError(f"a grading worker did not start within {limit:.0f} s; check that "
                               f"`{sys.executable} -c 'import jaxrast.eval.judge'` works.")
        self.ready = True

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
    process (signal deadline only). Use as a context manager or call `close()`. Calls from
    several threads take turns (the workers serve one batch at a time).
    """

    def __init__(self, processes: int | None = None, *, timeout: float = DEFAULT_TIMEOUT, grace: float = 2.0):
        self.processes = _cpu_count() if processes is None else processes
        if self.processes < 0 or not timeout > 0 or grace < 0:
            raise ValueError(f"GraderPool needs processes >= 0 (0: grade in this process), timeout > 0 and "
                             f"grace >= 0; got processes={processes}, timeout={timeout}, grace={grace}.")
        self.timeout = timeout
        self.grace = grace
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (a later call starts new ones)."""
        with self._lock:
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
            results[i] = guard(answer)
            if results[i] is None:
                key = (answer, tuple(golds_of(golds[i])))
                if key in first:
                    copies.append((i, first[key]))
                else:
                    first[key] = i
                    todo.append(i)
        from tqdm.auto import tqdm

        with self._lock, tqdm(total=len(todo), disable=not progress, desc="grading", unit="answer") as bar:
            if self.processes == 0:
                for i in todo:
                    results[i] = judge(answers[i], golds[i], timeout=self.timeout)
                    bar.update()
            elif todo:
                try:
                    self._run_workers(answers, golds, todo, results, bar)
                except BaseException:  # Ctrl-C mid-batch: a busy worker's late reply must not
                    for slot, worker in enumerate(self._workers):  # reach the next batch
                        if worker.task is not None:
                            self._replace(slot)
                    raise
        for i, j in copies:
            results[i] = results[j]
        return results  # type: ignore[return-value]

    def _run_workers(self, answers, golds, todo: deque[int], results: list, bar: Any) -> None:
        if not self._workers:
            self._workers = [_Worker() for _ in range(self.processes)]
        while todo or any(w.task for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.task is None and todo:
                    if not worker.ready:
                        worker.wait_ready()
                    i = todo.popleft()
                    try:
                        worker.send(answers[i], golds_of(golds[i]), self.timeout)
                    except OSError:  # died while idle: replace, retry
                        todo.appendleft(i)
                        self._replace(slot)
                        continue
                    worker.task = (i, time.monotonic() + self.timeout + self.grace)
            busy = [w for w in self._workers if w.task]
            if not busy:  # every idle worker had died and was just replaced: send again
                continue
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
_SHARED_LOCK = threading.Lock()


def shared_pool() -> GraderPool:
    """A process-wide pool with default settings, started on first use, closed at exit."""
    global _SHARED
    with _SHARED_LOCK:
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
