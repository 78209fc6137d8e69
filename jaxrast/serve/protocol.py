"""The OpenAI API's request and response bodies (completions, chat completions, models,
errors), with RAST's extras, as pydantic models: one validation library for configs and
requests. Unknown fields are ignored as OpenAI does; every known field is checked by type
and range, so a bad request is a 400 naming the field."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from jaxrast.rast.requests import INT32_MAX, LAM_MAX, TEMPERATURE_MIN
from jaxrast.runtime.config import Finite

MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096


def valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text is not valid Unicode: a lone surrogate {text[err.start]!r} at character "
                         f"{err.start}; send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
# Lists stop at their first bad item: a union of list types would otherwise try each member on
# every item of a 4 MB body, on the event loop (0.5 s for a million token ids).
Texts = Annotated[list[Text], Field(fail_fast=True)]
Ids = Annotated[list[int], Field(fail_fast=True)]
IdLists = Annotated[list[Ids], Field(fail_fast=True)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]  # an int32 on the device
Lam = Annotated[Finite, Field(ge=-LAM_MAX, le=LAM_MAX)]  # λ·Δlogit stays finite in float32


class StreamOptions(BaseModel):
    include_usage: bool = False


class RastExtras(BaseModel):
    """RAST's fields beside OpenAI's (the openai client sends them with `extra_body`)."""

    lam: Lam | Annotated[list[Lam], Field(fail_fast=True)] | None = None  # one for every pair, or one per pair
    mode: Literal["rast", "base", "rl"] = "rast"
    top_k: Count = 0
    min_tokens: Count = 0
    continue_text: Text = ""  # emitted instead of a stop id sampled before min_tokens
    shift: bool = False  # per-token shift statistics of the RAST column (the playground)
    gamma: Count | None = None  # speculative drafts per round (at most the server's; 0: off)


class SamplingFields(RastExtras):
    model: Text
    # 0: no new tokens (with echo and logprobs, the prompt is scored only)
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=0, le=INT32_MAX)  # the chat API's newer name
    temperature: Finite = Field(1.0, ge=0, le=100)
    top_p: Finite = Field(1.0, ge=1e-6, le=1)  # (0 in float32 keeps no token)
    n: int = Field(1, ge=1, le=INT32_MAX)
    stop: Text | Texts | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**31)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    model_config = ConfigDict(extra="ignore")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty (every completion would be empty)")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < TEMPERATURE_MIN:  # z / T would overflow float32
            raise ValueError(f"temperature must be 0 (greedy) or at least {TEMPERATURE_MIN}")
        return value

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Text | Texts | Ids | IdLists
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # the prompt before the text; with logprobs, the prompt tokens' log-probs too

    @property
    def scores_prompt(self) -> bool:
        return self.echo and self.logprobs is not None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list; give a string, a list of strings or token ids")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    type: str
    text: Text | None = None  # the text of a "text" part (other kinds of part are ignored)

    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


# ---- responses -------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Logprobs(BaseModel):
    """The completions API's logprobs object."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # echoed: the prompt's first token has none (null)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class Shift(BaseModel):
    """Per token of the RAST text (the `shift` extra): log-probs under the base and under RAST,
    KL(P_RAST ‖ P_base) at its position, and the most promoted and suppressed tokens there."""

    tokens: list[str]
    logprob_base: list[float | None]  # None: -inf (a token the law excludes)
    logprob_rast: list[float | None]
    kl: list[float]
    promoted: list[list[list]]  # per token: [[token, Δlogit], ...]
    suppressed: list[list[list]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    shift: Shift | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxrast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# the error answers every /v1 route documents in its OpenAPI schema
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 405, 408, 413, 429, 500, 503)}


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a non-finite statistic is sent as null."""
    return x if math.isfinite(x) else None
