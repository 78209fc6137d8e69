"""One engine's slots and the requests in them: admission plans, decode calls, new tokens,
stop strings, streamed text and finished requests (`jaxrast.rast.scheduler` drives them)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from jaxrast.rast.detokenize import TextStream
from jaxrast.rast.engine import Engine
from jaxrast.rast.requests import Request, Update, settings_arrays
from jaxrast.rast.token_rules import Record
from jaxrast.runtime.distributed import host_array

log = logging.getLogger("jaxrast.rast.slot_group")


def _alternatives(top_ids: np.ndarray, top_logprobs: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per position [n, k] arrays -> per position [(token id, log-prob), ...]."""
    return [list(zip(ids.tolist(), vals.tolist())) for ids, vals in zip(top_ids, top_logprobs)]


class Stats:
    """Counters for progress bars and /metrics: tokens, finished rows, slot occupancy, and
    the speculative rounds' drafted / accepted tokens."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = self.finished = self.calls = 0
        self.slot_steps = self.busy_slot_steps = 0
        self.drafted = self.accepted = self.rounds = self.round_tokens = 0
        self.peak_rows = 0  # the most rows in flight at once, over every group
        self.moves = 0  # rows moved into lower slots (packing)
        self.start = time.perf_counter()

    def record(self, out, *, finished: int, slots: int, speculative: bool) -> None:
        with self.lock:
            tokens = int(out.count.sum())
            self.tokens += tokens
            self.finished += finished
            self.calls += 1
            self.slot_steps += int(out.steps) * slots
            self.busy_slot_steps += int(out.rounds.sum()) if speculative else tokens
            if speculative:
                self.drafted += int(out.drafted.sum())
                self.accepted += int(out.accepted.sum())
                self.rounds += int(out.rounds.sum())
                self.round_tokens += tokens

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0

    @property
    def acceptance(self) -> float | None:
        """Share of drafted tokens the target accepted (None: no speculative round yet)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accepted_length(self) -> float | None:
        """Tokens a slot gained per speculative round (1 to γ + 1)."""
        return self.round_tokens / self.rounds if self.rounds else None


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
        if self.speculation.mode == "adaptive":  # both programs (usual `record`) compiled now, not in a timed call
            self._compile((self.spec.max_slots,), record)
        self.slots: dict[int, Request] = {}
        self.release = np.zeros(self.spec.max_slots, bool)
        self.record = Record()  # what the last decode call recorded
        self.admitted: list[list[Request]] = []  # the last plan's admit calls' requests
        self.waited = 0  # calls in a row that ran above their rows' bucket (not compiled yet)

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
                self.state, _ = self.engine.decode(self.state, idle, 1, speculative=kind, record=record, rows=rows)

    @property
    def free(self) -> list[int]:
        return [s for s in range(self.spec.max_slots) if s not in self.slots]

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
        free = self.free
        size, admits = self.spec.prefill_batch, []
        self.admitted = []
        for start in range(0, len(requests), size):
            chunk = list(requests[start:start + size])
            slot_ids = np.full(size, self.spec.max_slots, np.int32)
            tokens = np.zeros((size, self.spec.max_len), np.int32)
            prefix = np.zeros(size, np.int32)
            for r, req in enumerate(chunk):
                if req.params.max_tokens:
                    slot = free.pop(0)
                    slot_ids[r], self.slots[slot], self.release[slot] = slot, req, False
                ids = req.prompt_ids[:-1]
                tokens[r, :len(ids)], prefix[r] = ids, len(ids)
            padded = chunk + [chunk[-1]] * (size - len(chunk))  # padding rows are dropped by slot id
            settings = settings_arrays(padded, pairs=self.engine.num_pairs, default_lam=self.default_lam,
                                       max_stop_ids=self.spec.max_stop_ids, max_forced=self.spec.max_forced,
                                       vocab=self.engine.vocab, gamma=self.spec.gamma)
            admits.append({"tokens": tokens, "prefix": prefix, "slot_ids": slot_ids, "settings": settings,
                           "rows": len(chunk), "score": any(req.params.prompt_logprobs for req in chunk)})
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
                "record": [record.logprobs, record.entropies, record.top_logprobs], "moves": moves, "rows": rows}
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
                                              rows=call["rows"], score=score if call["score"] else None)
            scores.append(None if s is None else host_array(s))
        if not plan["decode"]:
            return None, scores
        t0 = time.perf_counter()
        self.record = Record(*plan["record"])
        self.state, out = self.engine.decode(self.state, np.asarray(plan["release"], bool), plan["exit_after"],
                                             speculative=bool(plan.get("speculative")), max_steps=plan.get("max_steps"),
                                             record=self.record, rows=plan.get("rows"))
        out = host_array(out)
        if plan.get("max_steps") is None:  # a one-step call's tokens/s says little of its kind
            self.speculation.record(bool(plan.get("speculative")), int(out.count.sum()), time.perf_counter() - t0)
        self.last_speculative = bool(plan.get("speculative"))
        return out, scores

    def scored(self, scores: list) -> list[Request]:
        """The admitted requests' prompt log-probs (those that asked); returns the requests
        that only scored their prompt, now finished."""
        finished = []
        for chunk, s in zip(self.admitted, scores):
            for r, req in enumerate(chunk):
                if s is not None and req.params.prompt_logprobs:
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
        return finished

    def _end(self, slot: int, req: Request, out, reason: str, text: str | None) -> Request:
        """Frees the slot (released on the device at the next call if still active there)."""
        del self.slots[slot]
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
