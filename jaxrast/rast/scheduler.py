"""The host side of continuous batching: a queue of requests, admission into free slots
between decode calls, stop strings, streaming text, finished requests.

A `Scheduler` drives one or more slot groups, each an `Engine` with its own slots and
caches. On one multi-core CPU device two groups decode concurrently from threads (XLA:CPU
runs a small decode step on about one core: two half-size programs are ~1.7x faster than
one); on accelerators and meshes one group keeps the device busy. A request's tokens do
not depend on its group or slot (same shapes, per-row streams).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from typing import Iterator, Sequence

import jax
import numpy as np

from jaxrast.rast.engine import Engine
from jaxrast.rast.requests import EngineLimits, Request, cancel, validate_request
from jaxrast.rast.slot_group import SlotGroup
from jaxrast.rast.stats import Stats
from jaxrast.rast.token_rules import Record
from jaxrast.runtime.distributed import broadcast_json
from jaxrast.runtime.mesh import BATCH

log = logging.getLogger("jaxrast.rast.scheduler")


def default_workers(slots: int, mesh) -> int:
    """Slot groups decoding concurrently: 2 on one multi-core CPU device in a single process
    (XLA:CPU runs a small decode step on about one core), else 1 (an accelerator, or a mesh
    of devices, is kept busy by one)."""
    one_device = mesh is None or mesh.devices.size == 1
    if one_device and jax.default_backend() == "cpu" and jax.process_count() == 1 and (os.cpu_count() or 1) > 1:
        return 2 if slots % 2 == 0 else 1
    return 1


def row_split(mesh) -> int:
    """Devices a mesh splits the slots over (its batch axes): slot counts are multiples of it."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in BATCH if a in mesh.shape]))


def _as_json(x):
    """A plan as JSON: numpy arrays become {"array": nested lists, "dtype": name}."""
    if isinstance(x, np.ndarray):
        return {"array": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, dict):
        return {k: _as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def _from_json(x):
    if isinstance(x, dict):
        if set(x) == {"array", "dtype"}:
            return np.asarray(x["array"], np.dtype(x["dtype"]))
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


class Scheduler:
    """Runs requests through slot groups. `run(requests)` decodes a known set of requests
    (each group on its own thread when there are several) and yields the finished ones."""

    def __init__(self, engines: Sequence[Engine], *, tokenizer=None, default_lam: Sequence[float] = (),
                 speculation: str = "off", record: Record = Record()):
        self.tokenizer = tokenizer
        self.record = record  # what serving records per token (`run` takes its own)
        decode = (functools.partial(tokenizer.decode, skip_special_tokens=True) if tokenizer is not None
                  else lambda ids: "")
        self.stats = Stats()
        lam = np.asarray(default_lam, np.float32)
        self.groups = [SlotGroup(e, decode, lam, self.stats, speculation, record) for e in engines]
        self.queue: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.failed_in_a_row = 0  # serving: decode cycles failed since the last one that did not
        # serving on several processes: process 0 leads, sending each cycle's plan to the others
        self.leader = False

    @property
    def max_len(self) -> int:
        return self.groups[0].spec.max_len

    @property
    def spec(self):
        return self.groups[0].spec

    @property
    def attention(self) -> str:
        """The attention backend's name (logs, /metrics)."""
        return self.groups[0].engine.attention.name

    @property
    def paged(self) -> bool:
        """Whether the engines page their KV caches (more than one page per slot)."""
        return self.groups[0].engine.pages_per_slot > 1

    @property
    def slots(self) -> int:
        return sum(g.spec.max_slots for g in self.groups)

    @property
    def limits(self) -> EngineLimits:
        spec, engine = self.groups[0].spec, self.groups[0].engine
        return EngineLimits(vocab=engine.vocab, pairs=engine.num_pairs, max_len=spec.max_len,
                            max_stop_ids=spec.max_stop_ids, max_forced=spec.max_forced, gamma=spec.gamma)

    def check(self, req: Request) -> None:
        """Refuses (`ParamError`, a ValueError) a request that cannot fit a slot or the engine,
        before it takes a slot: its row would share every decode call with other requests."""
        validate_request(req.prompt_ids, req.params, self.limits)

    def submit(self, req: Request) -> None:
        self.check(req)
        with self.lock:
            self.queue.append(req)
            self.lock.notify_all()

    def _cancel(self, req: Request) -> None:
        """Ends a queued request: one preempted with tokens already made ends as a running
        one does (its text, its stream flushed), one that never ran with nothing."""
        if req.token_ids:
            self.groups[0].finish(req, "cancelled", None)
        else:
            cancel(req)

    def _take(self, group: SlotGroup) -> list[Request]:
        """The requests at the queue's head that the group has slots and KV pages for, in
        order: a request the pages cannot hold yet waits (with those behind it) until rows
        finish and return theirs."""
        with self.lock:
            free = len(group.free)
            for req in [r for r in self.queue if r.cancelled]:  # cancelled while waiting: it never takes a slot
                self.queue.remove(req)
                self._cancel(req)
            head = [self.queue[i] for i in range(min(free, len(self.queue)))]
            return [self.queue.popleft() for _ in range(group.room(head) if head else 0)]

    def _cycle(self, group: SlotGroup, record: Record) -> list[Request]:
        """Admit into the group's free slots, then one decode call (if anything is active).
        When serving on several processes, process 0 sends each cycle's plan to the others
        first (`follow`), so they issue the same programs with the same inputs. If the call
        fails, its requests (those admitted by it included) end with finish reason "error"."""
        preempted = group.prepare()
        if preempted:  # first in the queue again, in their order
            with self.lock:
                self.queue.extendleft(reversed(preempted))
        requests = [] if preempted else self._take(group)  # (what freed the pages is not admitted again at once)
        try:
            plan = group.plan(requests, waiting=len(self.queue), first_token_call=self.serving, record=record)
            if plan is None:
                return []
            self.stats.peak_rows = max(self.stats.peak_rows, self.running)
            if self.leader:
                broadcast_json(_as_json(plan))
            return group.absorb(group.execute(plan))
        except Exception:
            for req in requests:
                if not req.finished and req not in group.slots.values():
                    group.finish(req, "error", "")
            raise

    def run(self, requests: Sequence[Request], record: Record = Record()) -> Iterator[list[Request]]:
        """Submits `requests` and yields lists of finished ones until all are done, recording
        `record` per token."""
        for req in requests:
            self.check(req)
        for engine in {id(g.engine): g.engine for g in self.groups}.values():
            engine.refresh()  # the parameters as they are now (GRPO updates them between rollouts)
        with self.lock:
            self.queue.extend(requests)
        remaining = len(requests)
        if len(self.groups) == 1:
            group = self.groups[0]
            while remaining:
                done = self._cycle(group, record)
                remaining -= len(done)
                if done:
                    yield done
            return
        results: collections.deque = collections.deque()
        ready = threading.Condition()
        errors: list[BaseException] = []

        def work(group: SlotGroup) -> None:
            try:
                while True:
                    with self.lock:
                        idle = not self.queue and not group.slots
                    if idle:
                        return
                    done = self._cycle(group, record)
                    if done:
                        with ready:
                            results.append(done)
                            ready.notify()
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                with ready:
                    errors.append(err)
                    ready.notify()

        threads = [threading.Thread(target=work, args=(g,), daemon=True) for g in self.groups]
        for t in threads:
            t.start()
        try:
            while remaining:
                with ready:
                    while not results and not errors:
                        ready.wait(0.1)
                        if not any(t.is_alive() for t in threads) and not results:
                            break
                    if errors:
                        raise errors[0]
                    if not results:
                        raise RuntimeError("the decode threads stopped with requests left unfinished.")
                    done = results.popleft()
                remaining -= len(done)
                yield done
        finally:
            for req in requests:
                if not req.finished:
                    req.cancelled = True
            for t in threads:
                t.join()

    # ---- serving: the groups decode on their own threads until stopped ----------------------

    @property
    def serving(self) -> bool:
        """Between start() and stop(): streams want their first token without waiting a call."""
        return bool(self._threads)

    @property
    def running(self) -> int:
        return sum(len(g.slots) for g in self.groups)

    def start(self) -> None:
        """Serve: every group decodes on its own thread, admitting what `submit` queues. On
        several processes this is process 0, and the others `follow()` its plans."""
        self.leader = jax.process_count() > 1
        if self.leader and len(self.groups) > 1:
            raise ValueError("serving on several processes needs one slot group (workers=1).")
        for engine in {id(g.engine): g.engine for g in self.groups}.values():
            engine.refresh()
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._serve, args=(g,), name=f"jaxrast-engine-{i}", daemon=True)
                         for i, g in enumerate(self.groups)]
        for t in self._threads:
            t.start()

    def _serve(self, group: SlotGroup) -> None:
        while True:
            with self.lock:
                idle_since = time.monotonic()
                while not self.queue and not group.slots and not self._stopping.is_set():
                    self.lock.wait(0.25)
                    if self.leader and time.monotonic() - idle_since > 5:
                        broadcast_json({"noop": True})  # the followers wait in a collective: keep it alive
                        idle_since = time.monotonic()
                if self._stopping.is_set() and not group.slots:
                    if self.leader:
                        broadcast_json({"stop": True})
                    return
            try:
                self._cycle(group, self.record)
                self.failed_in_a_row = 0
            except Exception as err:  # noqa: BLE001 - a failed call ends its requests, not the server
                log.exception("a decode call failed; its %d request(s) end with an error", len(group.slots))
                self.errors = [*self.errors[-15:], err]  # the latest few, for a debugger
                self.failed_in_a_row += 1
                for req in list(group.slots.values()):
                    group.finish(req, "error", "")
                group.reset()

    def stop(self, grace_s: float = 0.0) -> None:
        """Stops serving: requests still running get up to `grace_s` seconds to finish, then
        every unfinished request (queued or running) is cancelled and the threads end."""
        deadline = time.monotonic() + grace_s
        while (self.running or self.queue) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            while self.queue:
                self._cancel(self.queue.popleft())
            for group in self.groups:
                for req in group.slots.values():
                    req.cancelled = True
            self._stopping.set()
            self.lock.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    def follow(self) -> None:
        """A process other than 0 of a multi-process server: execute process 0's plans (the
        same admit and decode calls, with the same inputs) until it stops."""
        group = self.groups[0]
        for engine in {id(g.engine): g.engine for g in self.groups}.values():
            engine.refresh()
        while True:
            plan = _from_json(broadcast_json(None))
            if plan.get("stop"):
                return
            if not plan.get("noop"):
                group.execute(plan)
