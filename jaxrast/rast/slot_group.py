"""One engine's slots and the requests in them: admission plans, decode calls, new tokens,
stop strings, streamed text and finished requests (`jaxrast.rast.scheduler` drives them)."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from typing import Callable, Sequence

import numpy as np

from jaxrast.rast.admission import place
from jaxrast.rast.detokenize import TextStream
from jaxrast.rast.engine import Engine
from jaxrast.rast.pages import PagePool
from jaxrast.rast.requests import Request, Update, positions_needed, settings_arrays
from jaxrast.rast.stats import Stats
from jaxrast.rast.token_rules import Record
from jaxrast.runtime.distributed import host_array

log = logging.getLogger("jaxrast.rast.slot_group")
_ADMISSIONS = itertools.count()  # every group's admissions in one order (a preempted row may resume in another)


def _alternatives(top_ids: np.ndarray, top_logprobs: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per position [n, k] arrays -> per position [(token id, log-prob), ...]."""
    return [list(zip(ids.tolist(), vals.tolist())) for ids, vals in zip(top_ids, top_logprobs)]


class Speculation:
    """Whether a decode call runs speculative rounds: 'off', 'on', or 'adaptive': both kinds
    of call are timed (tokens per second) and the faster one runs, the other retried every
    16th call (acceptance and the device's costs change as rows come and go). Every call
    counts: the slot group compiles both programs before the first one."""

    SAMPLES = 4  # timed calls of each kind before choosing

    def __init__(self, mode: str = "off"):
        if mode not in ("off", "on", "adaptive"):
            raise ValueError(f"speculation mode must be 'off', 'on' or 'adaptive', got {mode!r}.")
        self.mode, self.calls = mode, 0
        self.rate: dict[bool, float | None] = {True: None, False: None}
        self.seen = {True: 0, False: 0}

    def choose(self) -> bool:
        if self.mode != "adaptive":
            return self.mode == "on"
        self.calls += 1
        for kind in (True, False):
            if self.seen[kind] < self.SAMPLES:
                return kind
        best = self.rate[True] >= self.rate[False]
        return (not best) if self.calls % 16 == 0 else best

    def record(self, speculative: bool, tokens: int, seconds: float) -> None:
        if self.mode != "adaptive" or not tokens:
            return
        self.seen[speculative] += 1
        rate, old = tokens / max(seconds, 1e-9), self.rate[speculative]
        self.rate[speculative] = rate if old is None else 0.7 * old + 0.3 * rate


class SlotGroup:
    """One engine's slots and the requests in them; `cycle()` admits, decodes once and
    hands back the requests that finished."""

    def __init__(self, engine: Engine, decode_text: Callable[[list[int]], str], default_lam: np.ndarray,
                 stats: Stats, speculation: str = "off", record: Record = Record()):
        self.engine, self.decode_text, self.default_lam, self.stats = engine, decode_text, default_lam, stats
        self.speculation = Speculation(speculation if engine.spec.gamma else "off")
        self.last_speculative = False
        self.spec = engine.spec
        self.state = engine.init_state()
        self.slots: dict[int, Request] = {}
        self.pool = self._new_pool()
        with stats.lock:
            stats.pages_total += engine.num_pages
        if self.speculation.mode == "adaptive":  # both programs (usual `record`) compiled now, not in a timed call
            self._compile((self.spec.max_slots,), record)
        self.release = np.zeros(self.spec.max_slots, bool)
        self.record = Record()  # what the last decode call recorded
        self.admitted: list[list[Request]] = []  # the last plan's admit calls' requests
        self.waited = 0  # calls in a row that ran above their rows' bucket (not compiled yet)
        self._pages_counted = 0  # this group's pages in Stats.pages_used

    def warm_up(self, record: Record) -> None:
        """Compiles the decode call at every bucket (of each kind of call this group makes,
        recording `record`) and the packing move, so that rows coming and going compile
        nothing later. Only between runs: it decodes the idle slots."""
        if self.slots:
            raise RuntimeError("warm_up() runs between decode runs, with every slot free.")
        self._compile(self.engine.buckets, record)
        none = np.full(self.spec.max_slots, self.spec.max_slots, np.int32)
        self.state = self.engine.move(self.state, none, none)

    def _compile(self, buckets, record: Record) -> None:
        """Decode calls over the idle slots at each of `buckets`, of each kind this group
        makes (plain, speculative or both): their programs compile now."""
        idle = np.zeros(self.spec.max_slots, bool)
        kinds = {"off": [False], "on": [True], "adaptive": [False, True]}[self.speculation.mode]
        for rows in buckets:
            for kind in kinds:
                self.state, _ = self.engine.decode(self.state, idle, 1, speculative=kind, record=record, rows=rows,
                                                   pages=self.pool.table)

    def _count_pages(self) -> None:
        with self.stats.lock:
            self.stats.pages_used += self.pool.used - self._pages_counted
            self.stats.peak_pages = max(self.stats.peak_pages, self.stats.pages_used)
        self._pages_counted = self.pool.used

    def _new_pool(self) -> PagePool:
        engine = self.engine
        return PagePool(num_pages=engine.num_pages, page_size=engine.page_size, per_slot=engine.pages_per_slot,
                        slots=self.spec.max_slots, groups=engine.split)

    def reset(self) -> None:
        """After a failed call: every slot and page free (a plan that failed half way may hold
        pages for slots it never filled), and a new device state."""
        self.pool = self._new_pool()
        self.slots.clear()
        self._count_pages()
        self.state = self.engine.init_state()

    @property
    def free(self) -> list[int]:
        return [s for s in range(self.spec.max_slots) if s not in self.slots]

    def _positions(self, req: Request) -> int:
        """KV positions a row needs through its next decode call (a call writes at most
        steps × (γ + 1) of them), at most its whole prompt, budget and γ."""
        length = len(req.context_ids) - 1  # in the caches (the pending token is not)
        gamma = self.spec.gamma if self.speculation.mode != "off" else 0
        whole = positions_needed(req.prompt_ids, req.params, self.spec.gamma)
        return min(whole, length + self.spec.steps * (gamma + 1))

    def prepare(self) -> list[Request]:
        """Pages for every running row's next call, the oldest rows first. Where the pool
        is short, the youngest rows give theirs back (preempted, returned: they queue again
        and resume from their tokens so far, prefilling them anew)."""
        preempted, seniority = [], lambda slot: self.slots[slot].admitted
        for slot in sorted(self.slots, key=seniority):
            if slot not in self.slots or self.slots[slot].cancelled:  # preempted just now; released at the next call
                continue
            while slot in self.slots and not self.pool.grow(slot, self._positions(self.slots[slot])):
                block = [s for s in self.slots if self.pool.group(s) == self.pool.group(slot)]
                preempted.append(self._preempt(max(block, key=seniority)))
        preempted.sort(key=lambda req: req.admitted)  # back to the queue in the order they came
        if preempted:
            log.info("%d row(s) preempted: the KV pool (%d pages) is short", len(preempted), self.pool.num_pages)
        return preempted

    def _preempt(self, slot: int) -> Request:
        req = self.slots.pop(slot)
        self.pool.release(slot)
        self.release[slot] = True
        req.preemptions += 1
        with self.stats.lock:
            self.stats.preemptions += 1
        return req

    def room(self, requests: Sequence[Request]) -> int:
        """How many of `requests`, admitted in order as `plan` would, free slots and KV pages
        hold: a row takes pages for its prompt and its first decode call, and more before
        each later call (`prepare`)."""
        return len(self._place(requests, copy.deepcopy(self.pool)))

    def _place(self, requests: Sequence[Request], pool: PagePool):
        return place(requests, self.free, pool, chunk=self.spec.prefill_batch, positions=self._positions,
                     may_share=lambda req: not req.token_ids and not self._scores(req))

    def plan(self, requests: Sequence[Request], waiting: int, first_token_call: bool = False,
             record: Record = Record()) -> dict | None:
        """The device work of one cycle, as plain data every process can execute alike:
        admit calls for `requests` (at most as many as free slots, `prefill_batch` a call;
        a request of no new tokens is prefilled and scored without taking a slot), then one
        decode call recording `record`, if any slot is busy. None: nothing to do.
        `waiting`: requests wait for a slot, so the decode call returns once
        min(waiting, max(2, slots / 8)) slots free: refilling after every finished row costs
        a call and an admit per row, while a slot idles only until the call returns.
        `first_token_call` (serving): a cycle that admits runs one step, so the new requests'
        first tokens reach their streams without waiting out a whole call."""
        placed = self._place(requests, self.pool)
        if len(placed) < len(requests):  # `room` said they would
            raise RuntimeError("the scheduler admitted requests beyond the free slots or KV pages.")
        size, admits = self.spec.prefill_batch, []
        self.admitted = []
        for start in range(0, len(requests), size):
            chunk = list(requests[start:start + size])
            slot_ids = np.full(size, self.spec.max_slots, np.int32)
            tokens = np.zeros((size, self.spec.max_len), np.int32)
            prefix = np.zeros(size, np.int32)
            shared = np.zeros(size, bool)
            copies = np.full((size, size - 1), self.pool.num_pages, np.int32)
            for r, req in enumerate(chunk):
                slot, lead = placed[start + r].slot, placed[start + r].lead
                if slot is not None:
                    slot_ids[r], self.slots[slot], self.release[slot] = slot, req, False
                    if req.admitted < 0:  # a resumed row keeps its seniority: the oldest rows always advance
                        req.admitted = next(_ADMISSIONS)
                ids = req.context_ids[:-1]
                tokens[r, :len(ids)], prefix[r] = ids, len(ids)
                if lead is not None:  # its own copy of the prompt's last page, written by the lead
                    shared[r] = True
                    own = self.pool.table[slot, len(ids) // self.pool.page_size]
                    copies[lead - start, np.argmax(copies[lead - start] == self.pool.num_pages)] = own
            padded = chunk + [chunk[-1]] * (size - len(chunk))  # padding rows are dropped by slot id
            settings = settings_arrays(padded, pairs=self.engine.num_pairs, default_lam=self.default_lam,
                                       max_stop_ids=self.spec.max_stop_ids, max_forced=self.spec.max_forced,
                                       vocab=self.engine.vocab, gamma=self.spec.gamma)
            # a row not inserted (padding, scored only) has no page: its prefill is written nowhere
            settings["pages"] = np.where((slot_ids < self.spec.max_slots)[:, None],
                                         self.pool.table[np.minimum(slot_ids, self.spec.max_slots - 1)],
                                         self.pool.num_pages).astype(np.int32)
            admits.append({"tokens": tokens, "prefix": prefix, "slot_ids": slot_ids, "settings": settings,
                           "rows": len(chunk), "score": any(self._scores(req) for req in chunk),
                           "shared": shared, "copies": copies})
            with self.stats.lock:
                self.stats.prefilled += int(np.sum(slot_ids[:len(chunk)] < self.spec.max_slots) - shared.sum())
                self.stats.shared += int(shared.sum())
            self.admitted.append(chunk)
        for slot, req in list(self.slots.items()):  # cancelled while waiting for this call
            if req.cancelled:
                self.release[slot] = True
        if not self.slots and not admits:
            return None
        moves = self._pack()
        exit_after = min(waiting, max(2, self.spec.max_slots // 8)) if waiting else self.spec.max_slots + 1
        speculative = self.speculation.choose()
        rows = self.spec.max_slots
        if self.slots:
            live = max(self.slots) + 1
            rows = self.engine.run_at(live, speculative, record, self.waited)
            self.waited = self.waited + 1 if rows > self.engine.bucket(live) else 0
        plan = {"admits": admits, "release": self.release.copy(), "exit_after": exit_after, "decode": bool(self.slots),
                "speculative": speculative, "max_steps": 1 if admits and first_token_call else None,
                "record": [record.logprobs, record.entropies, record.top_logprobs], "moves": moves, "rows": rows,
                "pages": self.pool.table.copy()}
        self._count_pages()
        self.release[:] = False
        return plan

    def _pack(self) -> dict | None:
        """Moves for the rows above the smallest bucket that holds them all, into its free
        slots (a row costs a copy of its caches once, instead of every step of a larger
        bucket); None: they fit already. The host's slot table moves at once."""
        if not self.slots:
            return None
        target = self.engine.bucket(len(self.slots))
        high = sorted((s for s in self.slots if s >= target), reverse=True)
        if not high:
            return None
        holes = [s for s in range(target) if s not in self.slots]
        src = np.full(self.spec.max_slots, self.spec.max_slots, np.int32)
        dst = src.copy()
        for i, (old, new) in enumerate(zip(high, holes)):
            src[i], dst[i] = old, new
            self.slots[new] = self.slots.pop(old)
            self.pool.move(old, new)
            self.release[new], self.release[old] = self.release[old], False
        with self.stats.lock:
            self.stats.moves += len(high)
        return {"src": src, "dst": dst}

    def execute(self, plan: dict):
        """Runs a plan's admit and decode calls; returns (the decode call's output or None,
        each admit call's prompt scores or None) on the host (every process of a
        multi-process run joins the gathers and reads the same)."""
        score, scores = Record(logprobs=True, top_logprobs=plan["record"][2]), []
        if plan.get("moves") is not None:
            self.state = self.engine.move(self.state, plan["moves"]["src"], plan["moves"]["dst"])
        for call in plan["admits"]:
            self.state, s = self.engine.admit(self.state, np.asarray(call["tokens"], np.int32),
                                              np.asarray(call["prefix"], np.int32),
                                              np.asarray(call["slot_ids"], np.int32), call["settings"],
                                              rows=call["rows"], score=score if call["score"] else None,
                                              shared=call.get("shared"), copies=call.get("copies"))
            scores.append(None if s is None else host_array(s))
        if not plan["decode"]:
            return None, scores
        t0 = time.perf_counter()
        self.record = Record(*plan["record"])
        self.state, out = self.engine.decode(self.state, np.asarray(plan["release"], bool), plan["exit_after"],
                                             speculative=bool(plan.get("speculative")), max_steps=plan.get("max_steps"),
                                             record=self.record, rows=plan.get("rows"), pages=plan.get("pages"))
        out = host_array(out)
        if plan.get("max_steps") is None:  # a one-step call's tokens/s says little of its kind
            self.speculation.record(bool(plan.get("speculative")), int(out.count.sum()), time.perf_counter() - t0)
        self.last_speculative = bool(plan.get("speculative"))
        return out, scores

    @staticmethod
    def _scores(req: Request) -> bool:
        """Whether admitting `req` scores its prompt (asked, and not done before a preemption)."""
        return bool(req.params.prompt_logprobs) and req.prompt_logprobs is None

    def scored(self, scores: list) -> list[Request]:
        """The admitted requests' prompt log-probs (those that asked); returns the requests
        that only scored their prompt, now finished."""
        finished = []
        for chunk, s in zip(self.admitted, scores):
            for r, req in enumerate(chunk):
                if s is not None and self._scores(req):
                    n = len(req.prompt_ids) - 1  # the first token has no context to score it
                    req.prompt_logprobs = [None] + s.logprobs[r, :n].tolist()
                    req.prompt_top_logprobs = [[]] + _alternatives(s.top_ids[r, :n], s.top_logprobs[r, :n])
                if not req.params.max_tokens:
                    finished.append(self.finish(req, "cancelled" if req.cancelled else "length", ""))
        self.admitted = []
        return finished

    def absorb(self, result) -> list[Request]:
        """The requests' prompt scores, new tokens, stop strings and ends (`execute`'s
        result); returns the finished requests."""
        out, scores = result
        finished = self.scored(scores)
        if out is None:
            return finished
        for slot, req in list(self.slots.items()):
            n = int(out.count[slot])
            new = out.tokens[slot, :n].tolist()
            if new and (min(new) < 0 or max(new) >= self.engine.vocab):
                # its logits were not finite: its text cannot be made, and only it ends (its
                # neighbours in the call are unharmed)
                bad = next(t for t in new if not 0 <= t < self.engine.vocab)
                log.error("a request (row %d, sample %d) sampled token id %d outside the vocabulary of %d; it ends "
                          "with an error", req.params.row_id, req.params.sample, bad, self.engine.vocab)
                finished.append(self._end(slot, req, out, "error", ""))
                continue
            req.token_ids += new
            req.forced_pos = int(out.forced_pos[slot])
            if self.record.logprobs:
                req.logprobs += out.logprobs[slot, :n].tolist()
            if self.record.entropies:
                req.entropies += out.entropies[slot, :n].tolist()
            if self.record.top_logprobs:
                req.top_logprobs += _alternatives(out.top_ids[slot, :n], out.top_logprobs[slot, :n])
            reason, text = None, None
            if req.params.stop_strings or req.on_update is not None:  # else the text is made once, at the end
                if req.detok is None:
                    req.detok = TextStream(self.decode_text, req.params.stop_strings)
                req.detok.extend(new)
            if req.cancelled:
                reason = "cancelled"
            elif n and req.params.stop_strings:
                hit = req.detok.stop_in_call(after_tokens=req.params.min_tokens)
                if hit is not None:
                    count, text = hit
                    del req.token_ids[count:], req.logprobs[count:], req.entropies[count:], req.top_logprobs[count:]
                    reason = "stop"
            if reason is None and out.finished[slot]:
                reason = "stop" if out.stopped[slot] else "length"
            if reason is not None:
                finished.append(self._end(slot, req, out, reason, text))
            elif new:
                self._stream(req)
        self.stats.record(out, finished=len(finished), slots=len(out.count), speculative=self.last_speculative)
        self._count_pages()
        return finished

    def _end(self, slot: int, req: Request, out, reason: str, text: str | None) -> Request:
        """Frees the slot (released on the device at the next call if still active there)."""
        del self.slots[slot]
        self.pool.release(slot)  # its device row writes no more: the next call's page table has none for it
        self.release[slot] = not out.finished[slot]
        return self.finish(req, reason, text)

    def _stream(self, req: Request) -> None:
        if req.on_update is None:
            return
        safe = req.detok.safe_end()
        req.on_update(self._update(req, req.detok.text_between(req.shown, safe) if safe > req.shown else ""))
        req.shown = max(req.shown, safe)

    @staticmethod
    def _update(req: Request, text: str, finish_reason: str | None = None) -> Update:
        """The tokens not yet streamed (with what was recorded of them) and `text`."""
        start, req.sent = req.sent, max(req.sent, len(req.token_ids))
        return Update(req.token_ids[start:], text, req.logprobs[start:], finish_reason, req.top_logprobs[start:])

    def finish(self, req: Request, reason: str, text: str | None) -> Request:
        """text: the text before a stop string (None: all of the tokens' text)."""
        if text is None:
            text = req.detok.text() if req.detok is not None else self.decode_text(req.token_ids)
        req.text = text
        req.finish_reason = reason
        if req.on_update is not None:
            rest = req.text[req.shown:]
            req.shown = len(req.text)
            req.on_update(self._update(req, rest, reason))
        req.done.set()
        return req
