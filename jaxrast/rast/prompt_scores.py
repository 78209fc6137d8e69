"""Prompt log-probs from the engine's prefill (`echo` + `logprobs`, lm-evaluation-harness's
log-likelihoods): the forwards that fill a row's KV caches also score its prompt, under the
row's own law, as a decode step records its tokens (`token_rules.slot_logits`, `recorded`)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxrast.rast.token_rules import Record, recorded, slot_logits


@flax.struct.dataclass
class PromptScores:
    """Teacher-forced log-probs of admitted prompts under each row's own law (τ = 1,
    unfiltered, like `StepOutput.logprobs`): position j of row b scores the row's prompt
    token j + 1 (a prompt of P tokens has P - 1 scores)."""

    logprobs: jax.Array  # [B, max_len] float32
    top_ids: jax.Array  # [B, max_len, k] int32 the most likely tokens at each position
    top_logprobs: jax.Array  # [B, max_len, k] float32 their log-probs


@flax.struct.dataclass
class _OneSlot:
    """The slot fields `slot_logits` reads, for one prompt being scored."""

    lam: jax.Array  # [1, pairs]
    rl_only: jax.Array  # [1]


def empty_scores(width: int, record: Record) -> tuple[jax.Array, ...]:
    """One row's prompt-score buffers: log-probs [width] (and top ids, top log-probs [width, k])."""
    k = record.top_logprobs
    return (jnp.zeros((width,), jnp.float32),) + (
        (jnp.zeros((width, k), jnp.int32), jnp.zeros((width, k), jnp.float32)) if k else ())


def prompt_scorer(tokens, prefix, settings, record: Record, *, combination, vocab: int, num_pairs: int,
                  rl_index: int | None):
    """`score(start, logits, scores) -> scores` for one row's prefill: the log-probs of each
    chunk position's next prompt token (the pending one after the last) under the row's law,
    written at the chunk's positions. tokens [width] (the prompt less its last token,
    padded), prefix: its real tokens, settings: the row's Slots fields (token, lam,
    rl_only). A λ schedule sees the index of the scored token among the generated ones,
    negative in the prompt (as `jaxrast analyze`)."""
    targets = jnp.roll(tokens.at[prefix].set(settings["token"]), -1)
    row = _OneSlot(lam=settings["lam"][None], rl_only=settings["rl_only"][None])

    def score(start, logits, scores):
        chunk = logits[0].shape[1]
        index = (start + jnp.arange(chunk) - prefix)[None]
        z = slot_logits(logits, row, index, combination=combination, vocab=vocab, num_pairs=num_pairs,
                        rl_index=rl_index)
        want = jax.lax.dynamic_slice_in_dim(targets, start, chunk)[None]
        logp, top, _ = recorded(z, want, jnp.zeros((1,), jnp.float32), record)
        new = (logp[0], top[1][0].astype(jnp.int32), top[0][0]) if record.top_logprobs else (logp[0],)
        return tuple(jax.lax.dynamic_update_slice_in_dim(buf, x, start, 0) for buf, x in zip(scores, new))

    return score
