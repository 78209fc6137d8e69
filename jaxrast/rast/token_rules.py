"""The per-slot token rules, one implementation for a plain step and a speculative round:
which logits a slot samples from, stop ids before and after `min_tokens`, the continue text
(s1 budget forcing), budgets, what is recorded per token, and how a slot advances.

`slots` is the engine's `Slots` (every field an array over the S slots). Token indices
count a row's generated tokens from 0. Shapes: z [S, V] or [S, n, V], tokens [S] or [S, n].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrast.rast.sampling import row_entropies


@dataclasses.dataclass(frozen=True)
class Record:
    """What a decode call records per token besides the token (compiled in: one program each)."""

    logprobs: bool = False  # log p(token) under z (τ = 1, unfiltered)
    entropies: bool = False  # entropy of softmax(z / τ)
    top_logprobs: int = 0  # the k most likely tokens under z and their log-probs


def slot_logits(logits, slots, index, *, combination, vocab: int, num_pairs: int, rl_index: int | None):
    """z of every slot: base + Σ λ_i (rl_i − ref_i) with the slot's own λ, or the first pair's
    rl model alone for an `rl_only` slot. logits: one [S, V'] or [S, n, V'] per model; index:
    each position's token index ([S] or [S, n])."""
    lam = slots.lam.T[:num_pairs]
    z = combination(logits, index, vocab, lams=lam if index.ndim == 1 else lam[..., None])
    if rl_index is None:
        return z
    rl_only = slots.rl_only.reshape(slots.rl_only.shape + (1,) * (z.ndim - 1))
    return jnp.where(rl_only, logits[rl_index][..., :vocab], z)


def mask_early_stops(z: jax.Array, stop_ids: jax.Array, early: jax.Array, forced_len: jax.Array) -> jax.Array:
    """Before min_tokens (`early` [R]) a stop id cannot be drawn, unless the row has a continue
    text that will replace it. z [R, V], stop_ids [R, k], forced_len [R]."""
    rows = jnp.arange(z.shape[0])[:, None]
    blocked = jnp.where((early & (forced_len == 0))[:, None], -jnp.inf, jnp.inf)
    return z.at[rows, stop_ids].min(blocked, mode="drop")


def force_continue(tok: jax.Array, slots) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The continue text: a stop id drawn before min_tokens starts it, and a started one goes
    on. Returns (token [S], next forced position [S] (-1: not forcing), whether the token is
    forced [S])."""
    rows = jnp.arange(tok.shape[0])
    forcing = slots.forced_pos >= 0
    is_stop = jnp.any(tok[:, None] == slots.stop_ids, axis=-1)
    start = ~forcing & is_stop & (slots.generated < slots.min_tokens) & (slots.forced_len > 0)
    forced = forcing | start
    at = jnp.where(forcing, slots.forced_pos, 0)
    tok = jnp.where(forced, slots.forced[rows, at], tok)
    pos = jnp.where(forced, at + 1, -1)
    return tok, jnp.where(pos >= slots.forced_len, -1, pos), forced


def row_ends(tokens: jax.Array, index: jax.Array, slots, forced: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(stopped, ended) per token [S, n]: a stop id ends a row from min_tokens on (a forced
    token never does), and the budget ends it at its last token."""
    is_stop = jnp.any(tokens[..., None] == slots.stop_ids[:, None, :], axis=-1)
    stopped = is_stop & (index >= slots.min_tokens[:, None]) & ~forced
    return stopped, stopped | (index + 1 >= slots.budget[:, None])


def advance(slots, last: jax.Array, count: jax.Array, finished: jax.Array, forced_pos: jax.Array):
    """Slots after an active slot emitted `count` [S] tokens, the last of them now pending."""
    act = slots.active
    return slots.replace(token=jnp.where(act, last, slots.token), length=slots.length + count,
                         generated=slots.generated + count, active=act & ~finished,
                         forced_pos=jnp.where(act, forced_pos, slots.forced_pos))


def recorded(z: jax.Array, tokens: jax.Array, temperature: jax.Array, record: Record):
    """(log-probs, (top log-probs, top ids) or None, entropies) of `tokens` [...] under z
    [..., V]; zeros where `record` asks for nothing. temperature [S] (the leading axis)."""
    log_z = jax.nn.log_softmax(z, axis=-1) if record.logprobs or record.top_logprobs else None
    zeros = jnp.zeros(tokens.shape, jnp.float32)
    logp = jnp.take_along_axis(log_z, tokens[..., None], axis=-1)[..., 0] if record.logprobs else zeros
    top = jax.lax.top_k(log_z, record.top_logprobs) if record.top_logprobs else None
    if record.entropies:
        per_row = jnp.broadcast_to(temperature.reshape(temperature.shape + (1,) * (tokens.ndim - 1)), tokens.shape)
        ent = row_entropies(z.reshape(-1, z.shape[-1]), per_row.reshape(-1)).reshape(tokens.shape)
    else:
        ent = zeros
    return logp, top, ent
