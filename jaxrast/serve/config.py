"""`ServeConfig`: every setting of `jaxrast serve` (YAML, `--set` and flags, validated)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from jaxrast.runtime.config import Finite, Positive, config_dataclass


@config_dataclass
class ServeConfig:
    base: str | None = None
    pairs: tuple[tuple[str, str, Finite], ...] = ()  # ((rl_path, ref_path, default λ), ...)
    host: str = "127.0.0.1"  # loopback by default: exposing a server is a decision
    port: Annotated[int, Field(ge=0, le=65535)] = 8000  # 0: any free port (printed at start)
    max_slots: Positive | None = None  # rows decoded at once (None: as many as kv_memory holds, within a ceiling)
    kv_memory: float | str | None = None  # KV cache GiB per device, or a share of free memory ('50%')
    page_size: Positive | None = None  # KV positions per page (None: dense slots of the whole length)
    max_len: Positive | None = None  # positions per slot; default: the models' max_position_embeddings (≤ 4096)
    max_waiting: Positive = 256
    served_model_name: str = "jaxrast"
    chat_template: str | None = None  # a Jinja template file
    api_key: str | None = None  # also $JAXRAST_API_KEY or --api-key-file (a flag's value shows in `ps`)
    insecure: bool = False  # serve a non-loopback host without a key (refused otherwise)
    protect_docs: bool = False  # /metrics, /docs and /openapi.json need the key too
    max_body_bytes: Positive = 4 * 2**20  # larger bodies get 413 before any byte is parsed
    max_prompt_bytes: Positive | None = None  # per prompt; default: the most a context of tokens can spell
    read_timeout: Annotated[Finite, Field(gt=0)] = 30.0  # seconds a client may stall while sending its body
    prepare_timeout: Annotated[Finite, Field(gt=0)] = 30.0  # seconds to template and tokenize one request
    max_connections: Positive | None = None  # uvicorn answers 503 beyond this many (None: unlimited)
    grace: Annotated[Finite, Field(ge=0)] = 10.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    mesh: str | None = None
    allow_pickle: bool = False
    steps_per_call: Positive = 16  # decode steps per device call: streams see tokens at least this often
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = 5  # the most alternatives a request may ask for
    speculative: Annotated[int, Field(ge=0)] = 0  # γ: the first pair's rl model drafts γ tokens per round
    speculative_mode: Literal["on", "adaptive"] = "adaptive"  # a server's batch changes: speculate while faster
