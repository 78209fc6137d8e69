"""Speculative RAST: the first pair's RL model drafts, the combined model verifies, and the
output distribution is exactly RAST's (Leviathan et al. 2023; Chen et al. 2023).

One round, for every slot at once: draft γ tokens from q, the rl model's *processed* law
(the request's τ, top-k and top-p applied: the distribution actually sampled); feed the
pending token and the drafts (γ + 1 positions) through every model at the slot's own
positions; the target p at each position is the processed law of z_base + Σ λ_i (z_rl_i −
z_ref_i). Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection the token is drawn from norm(max(0, p − q)); when every draft is accepted a bonus
token comes from p_{γ+1}. Greedy rows accept while the draft is the argmax of z. So a round
emits 1 to γ + 1 tokens per slot, and a slot's length moves by its own count: the caches'
rejected positions are overwritten later (a query never attends past its own position).

Stop ids (after min_tokens) and budgets cut inside a round. A slot decoding the rl model
alone, or with a continue text, runs with γ = 0 (its round is one ordinary step).
Shapes: slots `[S]`, round positions `[S, γ + 1]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrast.rast.sampling import draw_probs, row_probs
from jaxrast.rast.token_rules import Record, advance, force_continue, mask_early_stops, recorded, row_ends, slot_logits


def _keys(slots, index: jax.Array, salt: int) -> jax.Array:
    """One key per slot for the token at `index` [S]: fold_in(fold_in(row key, index), salt)
    (salt 1: a draft, 2: its acceptance, 3: the corrected or bonus token)."""
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(slots.keys), index)
    return jax.vmap(jax.random.fold_in, (0, None))(keys, salt)


def speculative_round(models, caches, slots, *, gamma: int, rl_index: int, combination, vocab: int,
                      num_pairs: int, attention, record: Record):
    """One round for every slot: models (distinct, base first) and their caches, the first
    pair's rl model at `rl_index` drafting; `attention` the engine's backend. Returns
    (caches, slots, emitted) where emitted holds tokens [S, γ+1] (the first `count` [S] are
    the round's), their log-probs, entropies, top log-probs, the finished / stopped flags,
    and drafted / accepted counts."""
    s = slots.token.shape[0]
    # γ = 0 for slots whose draft is their target (the rl model alone) or that may force a continue text
    g_eff = jnp.where(slots.rl_only | (slots.forced_len > 0), 0, jnp.minimum(slots.gamma, gamma))
    kv_len = jnp.where(slots.active, slots.length + gamma + 1, 0)  # every position this round feeds

    def draft(carry, j):
        cache, tok = carry
        # draft j sees positions up to its own (a kernel masking by length alone reads no more)
        out, cache = models[rl_index](tok[:, None], (slots.length + j)[:, None],
                                      cache=cache.replace(index=slots.length + j), last_only=True,
                                      attention=attention, kv_len=jnp.where(slots.active, slots.length + j + 1, 0))
        z = mask_early_stops(out[:, -1, :vocab], slots.stop_ids, slots.generated + j < slots.min_tokens,
                             slots.forced_len)
        q = row_probs(z, slots.temperature, slots.top_k, slots.top_p)
        d = jnp.where(slots.temperature > 0, draw_probs(_keys(slots, slots.generated + j, 1), q),
                      jnp.argmax(z, axis=-1).astype(jnp.int32))
        return (cache, d), (d, q)

    caches = list(caches)
    (caches[rl_index], _), (drafts, qs) = jax.lax.scan(draft, (caches[rl_index], slots.token), jnp.arange(gamma))
    drafts, qs = drafts.T, jnp.swapaxes(qs, 0, 1)  # [S, γ], [S, γ, V]

    # verify: the pending token and the drafts, γ + 1 positions, through every model
    seq = jnp.concatenate([slots.token[:, None], drafts], axis=1)
    positions = slots.length[:, None] + jnp.arange(gamma + 1)
    logits = []
    for i, (m, cache) in enumerate(zip(models, caches)):
        out, caches[i] = m(seq, positions, cache=cache.replace(index=slots.length), attention=attention,
                           kv_len=kv_len)
        logits.append(out)
    index = slots.generated[:, None] + jnp.arange(gamma + 1)  # each position's token index
    z = slot_logits(logits, slots, index, combination=combination, vocab=vocab, num_pairs=num_pairs,
                    rl_index=rl_index)
    flat = lambda x: x.reshape(s * (gamma + 1), *x.shape[2:])  # noqa: E731 - rows = (slot, position)
    per_pos = lambda field: jnp.repeat(field, gamma + 1, axis=0)  # noqa: E731
    z_masked = mask_early_stops(flat(z), per_pos(slots.stop_ids), flat(index) < per_pos(slots.min_tokens),
                                per_pos(slots.forced_len))
    p = row_probs(z_masked, per_pos(slots.temperature), per_pos(slots.top_k), per_pos(slots.top_p))
    p = p.reshape(s, gamma + 1, -1)

    # accept or reject each draft, in order
    p_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(qs, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(slots, slots.generated + j, 2)), out_axes=1)(
        jnp.arange(gamma))
    greedy = (slots.temperature == 0)[:, None]
    target = jnp.argmax(z_masked, axis=-1).reshape(s, gamma + 1)
    ok = jnp.where(greedy, drafts == target[:, :gamma], u * q_d < p_d) & (jnp.arange(gamma) < g_eff[:, None])
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [S] leading accepted drafts
    # the token after them: from the residual at a rejection, from p when the drafts ran out
    p_next = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(jnp.concatenate([qs, jnp.zeros_like(qs[:, :1])], axis=1), accepted[:, None, None],
                                 axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    rejected = (accepted < g_eff)[:, None]
    law = jnp.where(rejected & (mass > 0), residual / jnp.where(mass > 0, mass, 1.0), p_next)
    x = jnp.where(greedy[:, 0], jnp.take_along_axis(target, accepted[:, None], axis=1)[:, 0],
                  draw_probs(_keys(slots, slots.generated + accepted, 3), law))
    x, new_forced, forced = force_continue(x, slots)  # only γ = 0 slots force: their token is a plain step's
    emitted = jnp.where(jnp.arange(gamma + 1) < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), x[:, None])

    # stops and budgets cut inside the round
    stops, ends = row_ends(emitted, index, slots, forced[:, None] & (jnp.arange(gamma + 1) == 0))
    ends &= jnp.arange(gamma + 1) <= accepted[:, None]
    first_end = jnp.argmax(ends, axis=1)
    finished = jnp.any(ends, axis=1)
    count = jnp.where(finished, first_end + 1, accepted + 1)
    stopped = finished & jnp.take_along_axis(stops, first_end[:, None], axis=1)[:, 0]
    act = slots.active
    count = jnp.where(act, count, 0)
    last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    logp, top, ent = recorded(z, emitted, slots.temperature, record)
    slots = advance(slots, last, count, finished, new_forced)
    info = dict(tokens=emitted, count=count, logprobs=logp, entropies=ent, top=top, finished=act & finished,
                stopped=act & stopped, drafted=jnp.where(act, g_eff, 0), accepted=jnp.where(act, accepted, 0))
    return tuple(caches), slots, info
