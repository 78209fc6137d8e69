"""Finished or streaming choices as OpenAI response bodies: completions, chat completions,
their chunks, log-probs, usage, and RAST's per-token shift statistics."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from jaxrast.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    Shift,
    Usage,
    finite_or_none,
)
from jaxrast.serve.service import Choice, RequestFailed, Service


def usage(choices: list[Choice]) -> Usage:
    prompts = {id(c.request.prompt_ids): len(c.request.prompt_ids) for c in choices}  # a prompt counts once
    completion = sum(len(c.request.token_ids) for c in choices)
    return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion,
                 total_tokens=sum(prompts.values()) + completion)


def _reason(choice: Choice) -> str:
    return {"cancelled": "stop"}.get(choice.request.finish_reason, choice.request.finish_reason)


def _check(choice: Choice, update) -> None:
    """A failed choice ends the stream with an error event (`app.sse`), not a "stop"."""
    if update.finish_reason == "error":
        raise RequestFailed()


def completion_logprobs(service: Service, ids: list[int], logprobs: list, tops, k: int,
                        offset: int = 0) -> Logprobs:
    """The completions logprobs object of tokens `ids` (text offsets from `offset`); an
    echoed prompt's first token has no log-prob (None) and no alternatives (null)."""
    texts = [service.token_text(t) for t in ids]
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    top = [{service.token_text(i): v for i, v in entry[:k]} if entry or x is not None else None
           for entry, x in zip(tops, logprobs)] if k else None
    return Logprobs(tokens=texts, token_logprobs=logprobs, top_logprobs=top, text_offset=offsets)


def after_prompt(r, ids: list[int], logprobs: list, tops: list) -> tuple[list[int], list, list]:
    """(ids, log-probs, alternatives) of a request's echoed prompt, as the engine scored it,
    followed by those given."""
    prompt_lp = r.prompt_logprobs or [None] * len(r.prompt_ids)
    return r.prompt_ids + ids, prompt_lp + logprobs, (r.prompt_top_logprobs or []) + tops


def chat_logprobs(service: Service, ids: list[int], logprobs: list[float], tops, k: int) -> ChatChoiceLogprobs:
    def item(token: int, value: float) -> dict:
        text = service.token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = [ChatLogprob(**item(t, v), top_logprobs=[item(i, x) for i, x in entry[:k]])
               for t, v, entry in zip(ids, logprobs, tops or [[]] * len(ids))]
    return ChatChoiceLogprobs(content=content)


async def completion(service: Service, body: CompletionRequest, rid: str, choices: list[Choice]) -> CompletionResponse:
    out = []
    for c in choices:
        r = c.request
        prefix = service.text(r.prompt_ids) if body.echo else ""
        ids, logprobs, tops = r.token_ids, r.logprobs, r.top_logprobs
        if body.scores_prompt:
            ids, logprobs, tops = after_prompt(r, ids, logprobs, tops)
        lp = (completion_logprobs(service, ids, logprobs, tops, body.logprobs or 0)
              if body.logprobs is not None else None)
        shift = await asyncio.to_thread(shift_of, service, body, c) if body.shift else None
        out.append(CompletionChoice(index=c.index, text=prefix + r.text, logprobs=lp, finish_reason=_reason(c),
                                    shift=shift))
    return CompletionResponse(id=rid, model=service.model_name, choices=out, usage=usage(choices))


def chat(service: Service, body: ChatCompletionRequest, rid: str, choices: list[Choice]) -> ChatCompletionResponse:
    out = []
    for c in choices:
        r = c.request
        lp = chat_logprobs(service, r.token_ids, r.logprobs, r.top_logprobs, body.top_logprobs or 0) \
            if body.logprobs else None
        out.append(ChatChoice(index=c.index, message=AssistantMessage(content=r.text), logprobs=lp,
                              finish_reason=_reason(c)))
    return ChatCompletionResponse(id=rid, model=service.model_name, choices=out, usage=usage(choices))


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def completion_chunks(service: Service, body: CompletionRequest, rid: str, updates: AsyncIterator
                            ) -> AsyncIterator[dict]:
    seen: dict[int, Choice] = {}
    async for c, u in updates:
        _check(c, u)
        first = c.index not in seen
        seen[c.index] = c
        r = c.request
        echo = body.echo and first  # the echoed prompt leads the choice's first chunk
        choice = {"index": c.index, "text": (service.text(r.prompt_ids) if echo else "") + u.text, "logprobs": None,
                  "finish_reason": None}
        if body.logprobs is not None and (u.token_ids or echo):
            ids, logprobs, tops = list(u.token_ids), list(u.logprobs), list(u.top_logprobs)
            if echo:
                ids, logprobs, tops = after_prompt(r, ids, logprobs, tops)
            choice["logprobs"] = completion_logprobs(service, ids, logprobs, tops, body.logprobs).model_dump()
        if u.finish_reason is not None:
            choice["finish_reason"] = _reason(c)
            if body.shift:
                shift = await asyncio.to_thread(shift_of, service, body, c)
                choice["shift"] = shift.model_dump() if shift else None
        if choice["text"] or choice["finish_reason"] or choice["logprobs"]:
            yield {"id": rid, "object": "text_completion", "model": service.model_name, "choices": [choice]}
    if _include_usage(body):
        yield {"id": rid, "object": "text_completion", "model": service.model_name, "choices": [],
               "usage": usage(list(seen.values())).model_dump()}


async def chat_chunks(service: Service, body: ChatCompletionRequest, rid: str, updates: AsyncIterator
                      ) -> AsyncIterator[dict]:
    seen: dict[int, Choice] = {}
    head = {"id": rid, "object": "chat.completion.chunk", "model": service.model_name}
    async for c, u in updates:
        _check(c, u)
        first = c.index not in seen
        seen[c.index] = c
        delta = {"role": "assistant", "content": u.text} if first else {"content": u.text}
        choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
        if body.logprobs and u.token_ids:
            choice["logprobs"] = chat_logprobs(service, u.token_ids, u.logprobs, u.top_logprobs,
                                               body.top_logprobs or 0).model_dump()
        if u.finish_reason is not None:
            choice["finish_reason"] = _reason(c)
        if first or u.text or choice["finish_reason"] or choice["logprobs"]:
            yield {**head, "choices": [choice]}
    if _include_usage(body):
        yield {**head, "choices": [], "usage": usage(list(seen.values())).model_dump()}


def shift_of(service: Service, body: CompletionRequest, c: Choice, top: int = 5) -> Shift | None:
    """Per generated token: log-probs under the base and under RAST, KL(P_RAST ‖ P_base) and
    the most promoted / suppressed tokens, teacher-forced by the same code as `jaxrast analyze
    trace` (so the numbers match it), with this request's λ."""
    from jaxrast.analysis.teacher_forcing import trace_positions
    from jaxrast.analysis.trajectories import Trajectory
    from jaxrast.rast.ensemble import Pair

    r = c.request
    if not r.token_ids or r.params.mode != "rast" or not service.pairs:
        return None
    lams = r.params.lam if r.params.lam is not None else tuple(float(p.lam) for p in service.pairs)
    pairs = [Pair(p.rl, p.ref, lam) for p, lam in zip(service.pairs, lams)]
    pos = trace_positions([Trajectory(r.prompt_ids, r.token_ids)], service.base, pairs, vocab=service.vocab,
                          top_k=top, lam_schedule=service.lam_schedule, progress=False)[0]
    tok = service.token_text

    def tops(kind: str) -> list[list[list]]:
        return [[[tok(int(i)), round(float(v), 4)] for i, v in zip(ids, vals)]
                for ids, vals in zip(pos[f"{kind}/ids"], pos[f"{kind}/values"])]

    return Shift(tokens=[tok(t) for t in r.token_ids],
                 logprob_base=[finite_or_none(float(x)) for x in pos["logp_base"]],
                 logprob_rast=[finite_or_none(float(x)) for x in pos["logp_combined"]],
                 kl=[float(x) for x in pos["kl"]], promoted=tops("delta"), suppressed=tops("delta_low"))
