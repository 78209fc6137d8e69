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
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxrast.rast.engine import Engine, prefill_width
from jaxrast.rast.requests import Request, Update, find_stop_string, held_back, settings_arrays
from jaxrast.runtime.distributed import host_array


class Stats:
    """Counters for progress bars and /metrics: tokens, finished rows, slot occupancy."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = self.finished = self.calls = 0
        self.slot_steps = self.busy_slot_steps = 0
        self.start = time.perf_counter()

    def record(self, *, tokens: int, finished: int, steps: int, busy: int, slots: int) -> None:
        with self.lock:
            self.tokens += tokens
            self.finished += finished
            self.calls += 1
            self.slot_steps += steps * slots
            self.busy_slot_steps += busy

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


class SlotGroup:
    """One engine's slots and the requests in them; `cycle()` admits, decodes once and
    hands back the requests that finished."""

    def __init__(self, engine: Engine, decode_text: Callable[[list[int]], str], default_lam: np.ndarray,
                 stats: Stats):
        self.engine, self.decode_text, self.default_lam, self.stats = engine, decode_text, default_lam, stats
        self.spec = engine.spec
        self.state = engine.init_state()
        self.slots: dict[int, Request] = {}
        self.release = np.zeros(self.spec.max_slots, bool)

    @property
    def free(self) -> list[int]:
        return [s for s in range(self.spec.max_slots) if s not in self.slots]

    def admit(self, requests: Sequence[Request]) -> None:
        """Prefill and insert `requests` (at most as many as free slots), one admit call per
        prompt-width bucket and `prefill_batch` rows."""
        free = self.free
        by_width: dict[int, list[Request]] = collections.defaultdict(list)
        for req in requests:
            by_width[prefill_width(len(req.prompt_ids), self.spec.max_len)].append(req)
        size = self.spec.prefill_batch
        for width, group in by_width.items():
            for start in range(0, len(group), size):
                chunk = group[start:start + size]
                slot_ids = np.full(size, self.spec.max_slots, np.int32)
                tokens = np.zeros((size, width), np.int32)
                prefix = np.zeros(size, np.int32)
                for r, req in enumerate(chunk):
                    slot = free.pop(0)
                    slot_ids[r], self.slots[slot], self.release[slot] = slot, req, False
                    ids = req.prompt_ids[:-1]
                    tokens[r, :len(ids)], prefix[r] = ids, len(ids)
                padded = chunk + [chunk[-1]] * (size - len(chunk))  # padding rows are dropped by slot id
                settings = settings_arrays(padded, pairs=self.engine.num_pairs, default_lam=self.default_lam,
                                           max_stop_ids=self.spec.max_stop_ids, max_forced=self.spec.max_forced,
                                           vocab=self.engine.vocab)
                self.state = self.engine.admit(self.state, tokens, prefix, slot_ids, settings)

    def cycle(self, waiting: int) -> list[Request]:
        """One decode call; returns the requests it finished. `waiting`: requests wait for a
        slot, so the call returns once min(waiting, slots / 8) slots free: refilling after
        every finished row would cost a call and an admit per row (0.3 ms each on CPU, as much
        as a toy decode step), while a slot idles only until the call returns."""
        for slot, req in list(self.slots.items()):  # cancelled while waiting for this call
            if req.cancelled:
                self.release[slot] = True
        exit_after = min(waiting, max(1, self.spec.max_slots // 8)) if waiting else self.spec.max_slots + 1
        self.state, out = self.engine.decode(self.state, self.release, exit_after)
        self.release[:] = False
        out = host_array(out)  # every process of a multi-process run reads the same
        finished = []
        for slot, req in list(self.slots.items()):
            n = int(out.count[slot])
            new = out.tokens[slot, :n].tolist()
            req.token_ids += new
            if self.spec.logprobs:
                req.logprobs += out.logprobs[slot, :n].tolist()
            if self.spec.entropies:
                req.entropies += out.entropies[slot, :n].tolist()
            if self.spec.top_logprobs:
                req.top_logprobs += [list(zip(ids.tolist(), vals.tolist()))
                                     for ids, vals in zip(out.top_ids[slot, :n], out.top_logprobs[slot, :n])]
            reason, text = None, None
            if req.cancelled:
                reason = "cancelled"
            elif n and req.params.stop_strings:
                hit = find_stop_string(self.decode_text, req.token_ids, req.params.stop_strings,
                                       after_tokens=req.params.min_tokens)
                if hit is not None:
                    count, text = hit
                    del req.token_ids[count:], req.logprobs[count:], req.entropies[count:], req.top_logprobs[count:]
                    reason = "stop"
            if reason is None and out.finished[slot]:
                reason = "stop" if out.stopped[slot] else "length"
            if reason is not None:
                del self.slots[slot]
                self.release[slot] = not out.finished[slot]  # still active on the device
                finished.append(self._finish(req, reason, text))
            elif new:
                self._stream(req, new, n)
        self.stats.record(tokens=int(out.count.sum()), finished=len(finished), steps=int(out.steps),
                          busy=int(out.count.sum()), slots=self.spec.max_slots)
        return finished

    def _stream(self, req: Request, new: list[int], n: int) -> None:
        if req.on_update is None:
            return
        text = self.decode_text(req.token_ids)
        safe = len(text) - held_back(text, req.params.stop_strings)
        update = Update(new, text[req.shown:safe] if safe > req.shown else "",
                        req.logprobs[-n:] if self.spec.logprobs else [])
        req.shown = max(req.shown, safe)
        req.on_update(update)

    def _finish(self, req: Request, reason: str, text: str | None) -> Request:
        """text: the text before a stop string (None: all of the tokens' text)."""
        req.text = self.decode_text(req.token_ids) if text is None else text
        req.finish_reason = reason
        if req.on_update is not None:
            rest = req.text[req.shown:]
            req.shown = len(req.text)
            req.on_update(Update([], rest, [], finish_reason=reason))
        req.done.set()
        return req


def cancel(req: Request) -> None:
    """Ends a request that never reached a slot."""
    req.finish_reason = "cancelled"
    if req.on_update is not None:
        req.on_update(Update([], "", [], finish_reason="cancelled"))
    req.done.set()


class Scheduler:
    """Runs requests through slot groups. `run(requests)` decodes a known set of requests
    (each group on its own thread when there are several) and yields the finished ones."""

    def __init__(self, engines: Sequence[Engine], *, tokenizer=None, default_lam: Sequence[float] = ()):
        self.tokenizer = tokenizer
        decode = (functools.partial(tokenizer.decode, skip_special_tokens=True) if tokenizer is not None
                  else lambda ids: "")
        self.stats = Stats()
        lam = np.asarray(default_lam, np.float32)
        self.groups = [SlotGroup(e, decode, lam, self.stats) for e in engines]
        self.queue: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.errors: list[BaseException] = []

    @property
    def max_len(self) -> int:
        return self.groups[0].spec.max_len

    @property
    def slots(self) -> int:
        return sum(g.spec.max_slots for g in self.groups)

    def check(self, req: Request) -> None:
        """Refuses, before it takes a slot, a request that cannot fit a slot or the engine."""
        spec, p = self.groups[0].spec, req.params
        if not req.prompt_ids:
            raise ValueError("an empty prompt cannot be decoded; give every prompt at least one token.")
        if len(req.prompt_ids) + p.max_tokens > spec.max_len:
            raise ValueError(f"the prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({p.max_tokens}) is "
                             f"{len(req.prompt_ids) + p.max_tokens} tokens, beyond the slot length {spec.max_len}; "
                             "shorten the prompt or lower max_tokens.")
        if len(p.stop_ids) > spec.max_stop_ids or len(p.continue_ids) > spec.max_forced:
            raise ValueError(f"at most {spec.max_stop_ids} stop ids and a continue text of {spec.max_forced} tokens "
                             f"(got {len(p.stop_ids)} and {len(p.continue_ids)}).")
        if p.lam is not None and len(p.lam) != self.groups[0].engine.num_pairs:
            raise ValueError(f"lam has {len(p.lam)} weights but {self.groups[0].engine.num_pairs} pairs are loaded; "
                             "give one λ per pair.")

    def submit(self, req: Request) -> None:
        self.check(req)
        with self.lock:
            self.queue.append(req)
            self.lock.notify_all()

    def _take(self, count: int) -> list[Request]:
        with self.lock:
            taken = []
            while self.queue and len(taken) < count:
                req = self.queue.popleft()
                if req.cancelled:  # cancelled while waiting: it never takes a slot
                    cancel(req)
                    continue
                taken.append(req)
            return taken

    def _cycle(self, group: SlotGroup) -> list[Request]:
        """Admit into the group's free slots, then one decode call (if anything is active)."""
        if group.free:
            group.admit(self._take(len(group.free)))
        if not group.slots:
            return []
        return group.cycle(waiting=len(self.queue))

    def run(self, requests: Sequence[Request]) -> Iterator[list[Request]]:
        """Submits `requests` and yields lists of finished ones until all are done."""
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
                done = self._cycle(group)
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
                    done = self._cycle(group)
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
    def running(self) -> int:
        return sum(len(g.slots) for g in self.groups)

    def start(self) -> None:
        """Serve: every group decodes on its own thread, admitting what `submit` queues."""
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
                while not self.queue and not group.slots and not self._stopping.is_set():
                    self.lock.wait(0.25)
                if self._stopping.is_set() and not group.slots:
                    return
            try:
                self._cycle(group)
            except Exception as err:  # noqa: BLE001 - a failed call ends its requests, not the server
                self.errors.append(err)
                for req in list(group.slots.values()):
                    req.cancelled = True
                    group._finish(req, "error", "")
                group.slots.clear()
                group.state = group.engine.init_state()

    def stop(self, grace_s: float = 0.0) -> None:
        """Stops serving: requests still running get up to `grace_s` seconds to finish, then
        every unfinished request (queued or running) is cancelled and the threads end."""
        deadline = time.monotonic() + grace_s
        while (self.running or self.queue) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            while self.queue:
                cancel(self.queue.popleft())
            for group in self.groups:
                for req in group.slots.values():
                    req.cancelled = True
            self._stopping.set()
            self.lock.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
