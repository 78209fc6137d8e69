"""What a caller of `RAST.generate` passes and gets back: `SamplingParams` and `Completion`."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1 disable those filters. stop_token_ids
    None means the tokenizer's eos token. `n` samples are drawn per prompt."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    min_tokens: int = 0  # stop ids and stop strings cannot end a row before it has this many tokens
    continue_text: str = ""  # emitted instead of a stop id sampled before min_tokens (s1 budget forcing)
    logprobs: bool = True  # False: skip log p(token) (an on-policy GRPO rollout needs none)
    entropies: bool = False  # True: record the entropy of softmax(z / τ) at each step (GRPO statistics)
    # True: also the prompt's tokens' log-probs under the same law (max_new_tokens=0: score only)
    prompt_logprobs: bool = False

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.max_new_tokens < 0 or self.n < 1 or self.min_tokens < 0:
            raise ValueError("top_k must be >= 0, max_new_tokens >= 0, n >= 1 and min_tokens >= 0.")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}.")
        if any(not s for s in self.stop_strings):
            raise ValueError("a stop string cannot be empty (every completion would be empty).")


@dataclasses.dataclass
class Completion:
    index: int  # position of the prompt in the input list
    sample: int  # 0..n-1
    token_ids: list[int]  # generated tokens, up to and including the one that ended the row
    text: str  # decoded, without special tokens and without the stop string
    finish_reason: str  # "stop" | "length"
    # log p(token) under the combined logits z (τ = 1, unfiltered): the policy's own
    # log-probs when decoding one model, as GRPO needs for its importance ratios
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # entropy of the distribution each token was drawn from, softmax(z / τ) before top-p/top-k
    # (τ = 1 when greedy); only with SamplingParams(entropies=True)
    entropies: list[float] = dataclasses.field(default_factory=list)
    # with SamplingParams(prompt_logprobs=True): log p of each prompt token given the ones before
    # it, under the same law as `logprobs` (the first token has no context: None)
    prompt_logprobs: list[float | None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def by_prompt(batches: Iterable[list[Completion]], prompts: int, n: int) -> list[list[Completion]]:
    """Completions yielded in any order, as `result[prompt_index][sample]`."""
    result: list[list[Completion | None]] = [[None] * n for _ in range(prompts)]
    for batch in batches:
        for c in batch:
            result[c.index][c.sample] = c
    return result  # type: ignore[return-value]
