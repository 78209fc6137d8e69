"""The engine's per-slot state as arrays over its `S` slots (`Slots`, `DecodeState`) and
what a decode call hands back (`StepOutput`); each row's random stream (`stream_keys`)."""

from __future__ import annotations

import flax.struct
import jax


def stream_keys(seed: jax.Array, row_ids: jax.Array, samples: jax.Array) -> jax.Array:
    """Key data [batch, 2] of each row's stream: fold_in(fold_in(key(seed), row_id), sample)."""
    keys = jax.vmap(lambda s, r, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), n))(
        seed, row_ids, samples)
    return jax.random.key_data(keys)



@flax.struct.dataclass
class Slots:
    """Per-slot decode state, every field an array over the `S` slots."""

    token: jax.Array  # [S] int32 pending token (chosen, not yet in the caches)
    length: jax.Array  # [S] int32 tokens in the caches = RoPE position of `token`
    generated: jax.Array  # [S] int32 tokens generated so far (the pending one included)
    budget: jax.Array  # [S] int32 max new tokens
    min_tokens: jax.Array  # [S] int32 stop ids cannot end the row before this many tokens
    active: jax.Array  # [S] bool
    lam: jax.Array  # [S, pairs] float32 λ of each pair (all 0: the base alone)
    rl_only: jax.Array  # [S] bool: the first pair's rl model alone
    temperature: jax.Array  # [S] float32 (0: greedy)
    top_p: jax.Array  # [S] float32 (1: off)
    top_k: jax.Array  # [S] int32 (0: off)
    stop_ids: jax.Array  # [S, max_stop_ids] int32, padded with `vocab` (never a token)
    keys: jax.Array  # [S, 2] uint32 key data of the row's stream
    forced: jax.Array  # [S, max_forced] int32 continue text: replaces a stop before min_tokens
    forced_len: jax.Array  # [S] int32 (0: no continue text)
    forced_pos: jax.Array  # [S] int32 next continue token to emit (-1: not forcing)
    gamma: jax.Array  # [S] int32 the most drafts a speculative round may accept for the slot
    pages: jax.Array  # [S, pages per slot] int32 the slot's KV pages (`rast.pages`; num_pages: none)


@flax.struct.dataclass
class DecodeState:
    caches: tuple  # one KVCache per distinct model, [S] rows, per-row write index
    slots: Slots


@flax.struct.dataclass
class StepOutput:
    """What one decode call produced, per slot: `tokens[s, :count[s]]` in order."""

    tokens: jax.Array  # [S, steps] int32
    logprobs: jax.Array  # [S, steps] float32 log p(token) under z (τ = 1, unfiltered); 0 when off
    top_ids: jax.Array  # [S, steps, top_logprobs] int32 the most likely tokens under z (with top_logprobs)
    top_logprobs: jax.Array  # [S, steps, top_logprobs] float32 their log-probs
    entropies: jax.Array  # [S, steps] float32 entropy of softmax(z / τ); 0 when off
    count: jax.Array  # [S] int32
    finished: jax.Array  # [S] bool: the slot's row ended in this call
    stopped: jax.Array  # [S] bool: ... on a stop id (else on its budget)
    steps: jax.Array  # [] int32 decode steps (speculative: rounds) run
    drafted: jax.Array  # [S] int32 tokens the draft proposed (speculative rounds)
    accepted: jax.Array  # [S] int32 ... and the target accepted
    rounds: jax.Array  # [S] int32 speculative rounds the slot took part in
    forced_pos: jax.Array  # [S] int32 the slot's place in its continue text after the call (-1: none)
