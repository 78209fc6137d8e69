"""Requests to the engine and their host-side state: settings and their validation, tokens
so far, streamed updates, default stop ids and per-slot settings arrays (a row's text and
stop strings: `jaxrast.rast.detokenize`)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Literal, Sequence

import numpy as np

Mode = Literal["rast", "base", "rl"]


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """One request's settings. lam: one weight per loaded pair (None: the engine's
    defaults); mode 'base' decodes the base alone (every λ = 0), 'rl' the first pair's rl
    model alone. min_tokens: stop ids (and stop strings) cannot end the row before it has
    this many tokens; continue_ids: tokens emitted instead of a stop id sampled before then
    (s1-style budget forcing, e.g. the ids of "Wait")."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    lam: tuple[float, ...] | None = None
    mode: Mode = "rast"
    continue_ids: tuple[int, ...] = ()
    seed: int = 0
    row_id: int = 0
    sample: int = 0
    gamma: int | None = None  # speculative drafts per round (None: the engine's γ; 0: none)
    prompt_logprobs: bool = False  # score the prompt's tokens too (max_tokens 0: score only)


# Bounds on what reaches the engine's device arrays. Every row of a decode call shares the call:
# a value that overflows its dtype, or makes the logits NaN, would end the call for all of them.
INT32_MAX = 2**31 - 1  # budgets, top_k, min_tokens and token ids are int32 on the device
UINT32_LIMIT = 2**32  # seed, row id and sample make each row's uint32 PRNG stream
LAM_MAX = 1e4  # |λ|·Δlogit must stay finite in float32; a real shift's Δlogit is far below 1e30
TEMPERATURE_MIN = 1e-4  # a smaller positive T overflows z / T in float32: 0 is greedy
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024  # each stop string is searched for in the text after every call


class ParamError(ValueError):
    """A request the engine cannot take; `field` names the setting as the HTTP API does."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """What an engine can hold: checked for every request before it may share a decode call."""

    vocab: int
    pairs: int
    max_len: int  # positions per slot, γ draft positions included
    max_stop_ids: int
    max_forced: int
    gamma: int = 0


def positions_needed(prompt_ids: Sequence[int], p, gamma: int) -> int:
    """KV positions a request's row may fill: its prompt, its budget and the γ positions a
    speculative round writes past it."""
    return len(prompt_ids) + p.max_tokens + gamma


def _check_int(value: int, field: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ParamError(f"{field} = {value} is outside [{low}, {high}]", field)


def _check_ids(ids: Sequence[int], field: str, vocab: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ParamError(f"token id {bad} in {field} is outside the vocabulary of {vocab} tokens", field)


def _float32_finite(x: float) -> bool:
    return bool(np.isfinite(x)) and abs(x) <= float(np.finfo(np.float32).max)


def _check_sampling(p: RequestParams) -> None:
    if not _float32_finite(p.temperature) or p.temperature < 0 or 0 < p.temperature < TEMPERATURE_MIN:
        raise ParamError(f"temperature = {p.temperature} must be 0 (greedy) or a finite number >= "
                         f"{TEMPERATURE_MIN}", "temperature")
    if not (_float32_finite(p.top_p) and np.float32(p.top_p) > 0 and p.top_p <= 1):
        raise ParamError(f"top_p = {p.top_p} must be in (0, 1] (and above 0 in float32)", "top_p")
    _check_int(p.top_k, "top_k", 0, INT32_MAX)
    _check_int(p.min_tokens, "min_tokens", 0, INT32_MAX)
    for name in ("seed", "row_id", "sample"):
        _check_int(getattr(p, name), name, 0, UINT32_LIMIT - 1)
    if p.gamma is not None:
        _check_int(p.gamma, "gamma", 0, INT32_MAX)
    if p.mode not in ("rast", "base", "rl"):
        raise ParamError(f"mode must be 'rast', 'base' or 'rl', got {p.mode!r}", "mode")


def _check_lam(lam: tuple[float, ...] | None, pairs: int) -> None:
    if lam is None:
        return
    if len(lam) != pairs:
        raise ParamError(f"lam has {len(lam)} weights but {pairs} pairs are loaded; give one λ per pair", "lam")
    bad = next((x for x in lam if not (np.isfinite(x) and abs(x) <= LAM_MAX)), None)
    if bad is not None:
        raise ParamError(f"lam = {bad} is outside [-{LAM_MAX:g}, {LAM_MAX:g}]: the shifted logits would not be "
                         "finite in float32", "lam")


def _check_stops(p: RequestParams, limits: EngineLimits) -> None:
    if len(p.stop_ids) > limits.max_stop_ids:
        raise ParamError(f"at most {limits.max_stop_ids} stop ids, got {len(p.stop_ids)}", "stop")
    _check_ids(p.stop_ids, "stop", INT32_MAX)  # the server's own eos: only the dtype matters (never sampled)
    if len(p.stop_strings) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in p.stop_strings):
        raise ParamError(f"at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_CHARS} characters", "stop")
    if len(p.continue_ids) > limits.max_forced:
        raise ParamError(f"continue_text is {len(p.continue_ids)} tokens; the engine forces at most "
                         f"{limits.max_forced}: shorten it", "continue_text")
    _check_ids(p.continue_ids, "continue_text", limits.vocab)


def validate_request(prompt_ids: Sequence[int], p: RequestParams, limits: EngineLimits) -> None:
    """Raises `ParamError` (naming the field) for a request the engine cannot hold: the one
    check the HTTP API and the scheduler share, so no row can spoil a call others share."""
    if not prompt_ids:
        raise ParamError("an empty prompt cannot be decoded; give every prompt at least one token", "prompt")
    _check_int(p.max_tokens, "max_tokens", 0, INT32_MAX)
    need = positions_needed(prompt_ids, p, limits.gamma)
    if need > limits.max_len:
        raise ParamError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({p.max_tokens})"
                         + (f" plus γ = {limits.gamma} draft positions" if limits.gamma else "")
                         + f" is {need} tokens, beyond max_len = {limits.max_len} positions per slot; shorten the "
                         "prompt, lower max_tokens, or build the engine with a larger max_len", "max_tokens")
    _check_ids(prompt_ids, "prompt", limits.vocab)
    _check_sampling(p)
    _check_lam(p.lam, limits.pairs)
    _check_stops(p, limits)


@dataclasses.dataclass
class Update:
    """What a streaming consumer receives after each decode call that touched its request."""

    token_ids: list[int]  # new tokens
    text: str  # new text that can be shown (no partial stop string, no partial character)
    logprobs: list[float]  # of the new tokens, when recorded
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" once finished
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # when recorded


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt, its settings, and (filled in by the scheduler) what it has produced."""

    prompt_ids: list[int]
    params: RequestParams
    tag: Any = None  # the caller's key (e.g. (prompt index, sample))
    on_update: Callable[[Update], None] | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    entropies: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # per token
    # with params.prompt_logprobs: per prompt token (the first None / [], nothing before it)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    shown: int = 0  # characters of the text already streamed
    sent: int = 0  # tokens already streamed
    detok: Any = None  # its `TextStream` (jaxrast.rast.detokenize) once it has tokens, with stop strings or a stream
    submitted: float = 0.0  # time.perf_counter() when queued (latency metrics)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    forced_pos: int = -1  # where a preempted row was in its continue text (-1: not forcing)
    preemptions: int = 0  # times its row gave its KV pages back to run again later
    admitted: int = -1  # when its row was first admitted (its seniority: the youngest rows are preempted first)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context_ids(self) -> list[int]:
        """The prompt and the tokens generated so far: what a (re-)admitted row prefills (all
        but the last, its pending token)."""
        return self.prompt_ids + self.token_ids


def default_stop_ids(tokenizer, stop_token_ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The token ids that end a row: the given ones, else the tokenizer's eos and the eos ids
    of the checkpoint's generation_config.json (`load_tokenizer` attaches them; none without)."""
    if stop_token_ids is not None:
        return tuple(int(t) for t in stop_token_ids)
    eos = None if tokenizer is None else tokenizer.eos_token_id
    ids = ([] if eos is None else [eos]) + list(getattr(tokenizer, "generation_eos_ids", ()))
    return tuple(dict.fromkeys(int(t) for t in ids))


def settings_arrays(requests: Sequence[Request], *, pairs: int, default_lam: np.ndarray, max_stop_ids: int,
                    max_forced: int, vocab: int, gamma: int = 0) -> dict[str, np.ndarray]:
    """The engine's per-slot settings ([B, ...] arrays) of requests about to be admitted;
    `stream` [B, 3] (seed, row id, sample) becomes each row's PRNG key in the admit program."""
    b = len(requests)
    lam = np.zeros((b, max(pairs, 1)), np.float32)
    stop_ids = np.full((b, max_stop_ids), vocab, np.int32)
    forced = np.zeros((b, max_forced), np.int32)
    for r, req in enumerate(requests):
        p = req.params
        if p.mode == "rast":
            lam[r, :pairs] = default_lam if p.lam is None else p.lam
        stop_ids[r, :len(p.stop_ids)] = p.stop_ids
        forced[r, :len(p.continue_ids)] = p.continue_ids
    get = lambda name, dtype: np.array([getattr(q.params, name) for q in requests], dtype)  # noqa: E731
    return {"token": np.array([q.context_ids[-1] for q in requests], np.int32),
            "generated": np.array([len(q.token_ids) for q in requests], np.int32),
            "forced_pos": np.array([q.forced_pos for q in requests], np.int32),
            "budget": get("max_tokens", np.int32), "min_tokens": get("min_tokens", np.int32), "lam": lam,
            "rl_only": np.array([q.params.mode == "rl" for q in requests]),
            "temperature": get("temperature", np.float32), "top_p": get("top_p", np.float32),
            "top_k": get("top_k", np.int32), "stop_ids": stop_ids, "forced": forced,
            "stream": np.array([[q.params.seed, q.params.row_id, q.params.sample] for q in requests], np.uint32),
            "forced_len": np.array([len(q.params.continue_ids) for q in requests], np.int32),
            "gamma": np.array([gamma if q.params.gamma is None else q.params.gamma for q in requests], np.int32)}


def cancel(req: Request) -> None:
    """Ends a request that never reached a slot."""
    req.finish_reason = "cancelled"
    if req.on_update is not None:
        req.on_update(Update([], "", [], finish_reason="cancelled"))
    req.done.set()
