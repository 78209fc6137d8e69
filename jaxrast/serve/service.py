"""The bridge between HTTP handlers and the engine threads: prompts become engine requests,
engine updates become asyncio events, and every request is accounted for in /metrics.

The engine threads own the device state; a handler only submits requests and awaits their
updates (handed across with `loop.call_soon_threadsafe`). A handler that goes away (the
client disconnected) cancels its requests, and their slots free at the next decode call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from typing import Any, AsyncIterator, Sequence

from jaxrast.data.prompts import chat_text, encode_prompts, longest_token_bytes
from jaxrast.rast.decoding import make_scheduler
from jaxrast.rast.engine_spec import EngineSpec
from jaxrast.rast.ensemble import Pair
from jaxrast.rast.requests import ParamError, Request, RequestParams, Update, default_stop_ids, validate_request
from jaxrast.rast.token_rules import Record
from jaxrast.serve.metrics import Metrics


class QueueFull(Exception):
    """More requests wait than the server admits (answered 429 with a Retry-After)."""


class Busy(Exception):
    """A request could not be prepared in time (answered 503 with a Retry-After)."""


class RequestFailed(Exception):
    """The engine failed a request (answered 500, or an SSE error event once streaming):
    the server log has the traceback."""

    def __init__(self, message: str = "the engine failed this request (the server log has the cause); retry it, "
                                      "and report it if it fails again"):
        super().__init__(message)


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
    counted: bool = False  # in /metrics' finished requests (once, disconnected or not)


class Service:
    """Serves `base` with `pairs` on an engine of shape `spec` (one slot group: serving keeps
    an accelerator busy with one, and requests then share every slot); at most
    `max_waiting` requests queue for a slot."""

    def __init__(self, base, pairs: Sequence[Pair] = (), *, spec: EngineSpec, tokenizer=None, mesh=None,
                 speculative_mode: str = "on", max_waiting: int = 256, model_name: str = "jaxrast",
                 chat_template: str | None = None, top_logprobs: int = 5, max_prompt_bytes: int | None = None,
                 prepare_timeout_s: float = 30.0):
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
        self.max_prompt_bytes = max_prompt_bytes or self.max_len * longest_token_bytes(tokenizer)
        self.prepare_timeout_s = prepare_timeout_s
        # templating and tokenizing, off the event loop: two at a time, each bounded in bytes
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxrast-prepare")
        self.metrics = Metrics(self)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.accepting = True

    @property
    def slots(self) -> int:
        return self.scheduler.slots

    @property
    def max_len(self) -> int:
        """The context a request may fill: the engine's positions less γ draft positions."""
        return self.scheduler.max_len - self.scheduler.spec.gamma

    @property
    def model_names(self) -> dict[str, str | None]:
        """Served model name -> the mode it fixes (None: the request's own `mode`)."""
        fixed = {f"{self.model_name}:base": "base", f"{self.model_name}:rl": "rl"} if self.pairs else {}
        return {self.model_name: None, **fixed}

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, grace_s: float = 0.0) -> None:
        self.accepting = False
        self.scheduler.stop(grace_s)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # ---- prompts --------------------------------------------------------------------------

    async def prepare(self, body: Any) -> tuple[list[list[int]], RequestParams]:
        """(token ids per prompt, settings) of a completion or chat body, templated and
        tokenized in the worker pool within `prepare_timeout_s`."""
        work = self.prepare_chat if hasattr(body, "messages") else self.prepare_completion
        job = asyncio.get_running_loop().run_in_executor(self._prepare_pool, work, body)
        try:
            return await asyncio.wait_for(job, self.prepare_timeout_s)
        except asyncio.TimeoutError:
            raise Busy(f"the request was not tokenized within {self.prepare_timeout_s:g} s") from None

    def prepare_completion(self, body: Any) -> tuple[list[list[int]], RequestParams]:
        prompts = body.prompts()
        self.check_batch(len(prompts), body.n)
        ids = [self.encode(p) for p in prompts]
        return ids, self.params(body, ids, default_max=16, prompt_logprobs=body.scores_prompt)

    def prepare_chat(self, body: Any) -> tuple[list[list[int]], RequestParams]:
        self.check_batch(1, body.n)
        text = self.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        ids = [self.encode(text, "messages", special_tokens=False)]  # the template wrote its own
        return ids, self.params(body, ids, default_max=None)

    def check_batch(self, prompts: int, n: int) -> None:
        """Refuses, before any tokenizing, a batch no queue of this server could ever hold."""
        if n > self.slots:
            raise BadRequest(f"n={n} is more than this server's {self.slots} slots", "n")
        if prompts * n > self.max_waiting:
            raise BadRequest(f"{prompts} prompt(s) × n={n} is {prompts * n} choices, more than this server ever "
                             f"queues ({self.max_waiting}, --max-waiting); send them in smaller batches",
                             "prompt" if prompts > 1 else "n")

    def encode(self, prompt: str | Sequence[int], param: str = "prompt", special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt (text, with the tokenizer's default special tokens unless
        `special_tokens=False`, or ids), refused as `param` if it cannot fit the context."""
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, param, special_tokens)
        else:
            if len(prompt) >= self.max_len:
                raise BadRequest(f"the prompt is {len(prompt)} tokens; this server's context is {self.max_len} "
                                 "tokens, prompt and completion: shorten it", param)
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise BadRequest(f"token id {bad[0]} is outside the vocabulary of {self.vocab} tokens", param)
        if not ids:
            raise BadRequest("the prompt is empty; give at least one token", param)
        if len(ids) >= self.max_len:
            raise BadRequest(f"the {param} is {len(ids)} tokens; this server's context is {self.max_len} tokens, "
                             "prompt and completion: shorten it", param)
        return ids

    def _tokenize(self, text: str, param: str, special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer; send token ids", param)
        try:  # too many bytes for the context (before tokenizing), or a character the tokenizer drops
            return encode_prompts(self.tokenizer, [text], special_tokens=special_tokens,
                                  max_bytes=self.max_prompt_bytes)[0]
        except ValueError as err:
            raise BadRequest(str(err), param) from None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is None or not (self.chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise BadRequest("this model has no chat template; use /v1/completions, or start the server with "
                             "--chat-template FILE", "messages")
        try:
            return chat_text(self.tokenizer, messages, self.chat_template)
        except ValueError as err:  # the template refuses these messages (e.g. roles must alternate)
            raise BadRequest(str(err), "messages") from None

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    # ---- requests -------------------------------------------------------------------------

    def params(self, body: Any, prompts: list[list[int]], default_max: int | None,
               prompt_logprobs: bool = False) -> RequestParams:
        """The engine settings of a request body (its fields already range-checked), checked
        against the engine with each of its prompts; `prompt_logprobs`: score the prompts too."""
        prompt_len = max(map(len, prompts))
        budget = body.budget()
        if budget is None:
            budget = default_max or (self.max_len - prompt_len)
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
        cont = (tuple(self.encode(body.continue_text, "continue_text", special_tokens=False))  # mid-sequence: no BOS
                if body.continue_text else ())
        gamma = self.scheduler.spec.gamma
        if body.gamma is not None and body.gamma > gamma:
            raise BadRequest(f"gamma={body.gamma} is more than this server's speculative γ = {gamma}", "gamma")
        params = RequestParams(max_tokens=budget, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                               min_tokens=body.min_tokens, stop_ids=self.default_stop_ids,
                               stop_strings=tuple(body.stop), lam=lam, mode=body.mode, continue_ids=cont,
                               seed=body.seed if body.seed is not None else int(time.time_ns() % (2**31)),
                               gamma=body.gamma, prompt_logprobs=prompt_logprobs)
        for ids in prompts:
            self.validate(ids, params)
        return params

    def validate(self, ids: list[int], params: RequestParams) -> None:
        """The engine's own check (the scheduler runs it again as a request enters), as a 400."""
        try:
            validate_request(ids, params, self.scheduler.limits)
        except ParamError as err:
            raise BadRequest(str(err), err.field) from None

    def submit(self, prompts: list[list[int]], params: RequestParams, n: int) -> tuple[str, list[Choice]]:
        """Queues n choices per prompt (choice i of prompt p draws from stream (seed, p, i))."""
        if not self.accepting:
            raise QueueFull("the server is shutting down")
        self.check_batch(len(prompts), n)
        loop = asyncio.get_running_loop()
        choices = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                updates: asyncio.Queue = asyncio.Queue()
                req = Request(ids, dataclasses.replace(params, row_id=p, sample=i))
                req.on_update = lambda u, q=updates: loop.call_soon_threadsafe(q.put_nowait, u)
                choices.append(Choice(len(choices), req, updates))
        for c in choices:
            self.validate(c.request.prompt_ids, c.request.params)
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
                    return
        finally:
            if not choice.request.finished:
                choice.request.cancelled = True  # the engine frees its slot at the next decode call
            if not choice.counted:  # a client that went away is counted too
                choice.counted = True
                self.metrics.finished(choice)

    async def wait(self, choice: Choice) -> Request:
        async for _ in self.updates(choice):
            pass
        return choice.request

