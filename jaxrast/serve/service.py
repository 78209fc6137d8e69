"""The bridge between HTTP handlers and the engine threads: prompts become engine requests,
engine updates become asyncio events, and every request is accounted for in /metrics.

The engine threads own the device state; a handler only submits requests and awaits their
updates (handed across with `loop.call_soon_threadsafe`). A handler that goes away (the
client disconnected) cancels its requests, and their slots free at the next decode call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import Any, AsyncIterator, Sequence

from jaxrast.data.prompts import encode_prompts
from jaxrast.rast.decoding import make_scheduler
from jaxrast.rast.engine import EngineSpec
from jaxrast.rast.ensemble import Pair
from jaxrast.rast.requests import Request, RequestParams, Update, default_stop_ids
from jaxrast.rast.token_rules import Record
from jaxrast.serve.metrics import Metrics


class QueueFull(Exception):
    """More requests wait than the server admits (answered 429 with a Retry-After)."""


class BadRequest(ValueError):
    """A request that cannot be served as asked (answered 400 naming the field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class Choice:
    """One choice of a response as it completes: its request and its streamed updates."""

    index: int
    request: Request
    updates: asyncio.Queue
    first_token_at: float | None = None


class Service:
    """Serves `base` with `pairs` on an engine of shape `spec` (one slot group: serving keeps
    an accelerator busy with one, and requests then share every slot); at most
    `max_waiting` requests queue for a slot."""

    def __init__(self, base, pairs: Sequence[Pair] = (), *, spec: EngineSpec, tokenizer=None, mesh=None,
                 speculative_mode: str = "on", max_waiting: int = 256, model_name: str = "jaxrast",
                 chat_template: str | None = None, top_logprobs: int = 5):
        self.base, self.pairs = base, list(pairs)
        self.model_name, self.max_waiting = model_name, max_waiting
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.default_stop_ids = default_stop_ids(tokenizer)
        ensemble, self.scheduler = make_scheduler(
            base, self.pairs, tokenizer=tokenizer, mesh=mesh, spec=spec, speculative_mode=speculative_mode,
            record=Record(logprobs=True, top_logprobs=top_logprobs))
        self.vocab = ensemble.vocab
        self.lam_schedule = None  # the server applies each request's λ unscheduled
        self.metrics = Metrics(self)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.accepting = True

    @property
    def slots(self) -> int:
        return self.scheduler.slots

    @property
    def max_len(self) -> int:
        return self.scheduler.max_len

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, grace_s: float = 0.0) -> None:
        self.accepting = False
        self.scheduler.stop(grace_s)

    # ---- prompts --------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequest("this model has no tokenizer; send token ids", param)
            try:  # a character the tokenizer drops (a closed vocabulary): the model would see other text
                ids = encode_prompts(self.tokenizer, [prompt])[0]
            except ValueError as err:
                raise BadRequest(str(err), param) from None
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise BadRequest(f"token id {bad[0]} is outside the vocabulary of {self.vocab} tokens", param)
        if not ids:
            raise BadRequest("the prompt is empty; give at least one token", param)
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        tok = self.tokenizer
        template = self.chat_template or getattr(tok, "chat_template", None)
        if tok is None or not template:
            raise BadRequest("this model has no chat template; use /v1/completions, or start the server with "
                             "--chat-template FILE", "messages")
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    # ---- requests -------------------------------------------------------------------------

    def params(self, body: Any, prompt_len: int, default_max: int | None) -> RequestParams:
        """The engine settings of a request body (its fields already range-checked)."""
        budget = body.budget() or default_max or (self.max_len - prompt_len)
        if prompt_len + budget > self.max_len:
            raise BadRequest(f"the prompt ({prompt_len} tokens) plus max_tokens ({budget}) is {prompt_len + budget} "
                             f"tokens, beyond this server's context of {self.max_len}; shorten the prompt or lower "
                             "max_tokens", "max_tokens")
        lam = body.lam
        if isinstance(lam, list):
            if len(lam) != self.num_pairs:
                raise BadRequest(f"lam has {len(lam)} weights but {self.num_pairs} pairs are loaded; give one λ per "
                                 "pair or a single number", "lam")
            lam = tuple(lam)
        elif lam is not None:
            lam = (float(lam),) * self.num_pairs
        if body.mode == "rl" and not self.num_pairs:  # ("rast" with no pairs is the base alone)
            raise BadRequest("mode 'rl' decodes the first pair's rl model, and this server has no pair", "mode")
        cont = tuple(self.encode(body.continue_text, "continue_text")) if body.continue_text else ()
        gamma = self.scheduler.spec.gamma
        if body.gamma is not None and body.gamma > gamma:
            raise BadRequest(f"gamma={body.gamma} is more than this server's speculative γ = {gamma}", "gamma")
        return RequestParams(max_tokens=budget, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             min_tokens=body.min_tokens, stop_ids=self.default_stop_ids,
                             stop_strings=tuple(body.stop), lam=lam, mode=body.mode, continue_ids=cont,
                             seed=body.seed if body.seed is not None else int(time.time_ns() % (2**31)),
                             gamma=body.gamma)

    def submit(self, prompts: list[list[int]], params: RequestParams, n: int) -> tuple[str, list[Choice]]:
        """Queues n choices per prompt (choice i of prompt p draws from stream (seed, p, i))."""
        if not self.accepting:
            raise QueueFull("the server is shutting down")
        if n > self.slots:
            raise BadRequest(f"n={n} is more than this server's {self.slots} slots", "n")
        loop = asyncio.get_running_loop()
        choices = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                updates: asyncio.Queue = asyncio.Queue()
                req = Request(ids, dataclasses.replace(params, row_id=p, sample=i))
                req.on_update = lambda u, q=updates: loop.call_soon_threadsafe(q.put_nowait, u)
                choices.append(Choice(len(choices), req, updates))
        for c in choices:
            self.scheduler.check(c.request)
        with self._lock:
            if len(self.scheduler.queue) + len(choices) > self.max_waiting:
                raise QueueFull(f"{len(self.scheduler.queue)} requests are waiting (at most {self.max_waiting})")
            for c in choices:
                c.request.submitted = time.perf_counter()
                self.scheduler.submit(c.request)
        self.metrics.requests.inc(len(choices))
        return f"cmpl-{next(self._ids)}-{time.time_ns() % 10**9}", choices

    async def updates(self, choice: Choice) -> AsyncIterator[Update]:
        """The choice's updates until it finishes; cancels it if the consumer goes away."""
        try:
            while True:
                update: Update = await choice.updates.get()
                if choice.first_token_at is None and update.token_ids:
                    choice.first_token_at = time.perf_counter()
                    self.metrics.ttft.observe(choice.first_token_at - choice.request.submitted)
                yield update
                if update.finish_reason is not None:
                    self.metrics.finished(choice)
                    return
        finally:
            if not choice.request.finished:
                choice.request.cancelled = True  # the engine frees its slot at the next decode call

    async def wait(self, choice: Choice) -> Request:
        async for _ in self.updates(choice):
            pass
        return choice.request

