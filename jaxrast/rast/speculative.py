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

from jaxrast.rast.sampling import draw_probs, row_entropies, row_probs


def _keys(slots, index: jax.Array, salt: int) -> jax.Array:
    """One key per slot for the token at `index` [S]: fold_in(fold_in(row key, index), salt)
    (salt 1: a draft, 2: its acceptance, 3: the corrected or bonus token)."""
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(slots.keys), index)
    return jax.vmap(jax.random.fold_in, (0, None))(keys, salt)


def _mask_stops(z: jax.Array, slots, early: jax.Array) -> jax.Array:
    """Before min_tokens a stop id is masked (as in a plain step), unless a continue text
    will replace it. z [S, V], early [S]."""
    rows = jnp.arange(z.shape[0])[:, None]
    blocked = jnp.where((early & (slots.forced_len == 0))[:, None], -jnp.inf, jnp.inf)
    return z.at[rows, slots.stop_ids].min(blocked, mode="drop")


def attention_bound(slots, fed: int, per_row: bool) -> jax.Array:
    """Where attention stops reading the cache while `fed` positions are fed: [S] each
    slot's own length + fed (`ragged_attention`; a free slot reads nothing), or [] the
    longest active slot's (`blocked_attention`). Never a free slot's stale keys or the
    unused tail."""
    if per_row:
        return jnp.where(slots.active, slots.length + fed, 0)
    return jnp.max(jnp.where(slots.active, slots.length, 0)) + fed


def _probs(z: jax.Array, slots) -> jax.Array:
    return row_probs(z, slots.temperature, slots.top_k, slots.top_p)


def speculative_round(engine, models, caches, slots, gamma: int):
    """One round for every slot; returns (caches, slots, emitted) where emitted holds
    tokens [S, γ+1] (the first `count` [S] are the round's), their log-probs, entropies,
    top log-probs, the finished / stopped flags, and drafted / accepted counts."""
    rl, vocab, s = engine.rl_index, engine.vocab, slots.token.shape[0]
    # γ = 0 for slots whose draft is their target (the rl model alone) or that may force a continue text
    g_eff = jnp.where(slots.rl_only | (slots.forced_len > 0), 0, jnp.minimum(slots.gamma, gamma))

    kv_len = attention_bound(slots, gamma + 1, engine.ragged)  # every position this round feeds

    def draft(carry, j):
        cache, tok = carry
        out, cache = models[rl](tok[:, None], (slots.length + j)[:, None], cache=cache.replace(index=slots.length + j),
                                last_only=True, kv_len=kv_len, cpu_kernel=engine.cpu_kernel)
        z = _mask_stops(out[:, -1, :vocab], slots, slots.generated + j < slots.min_tokens)
        q = _probs(z, slots)
        d = jnp.where(slots.temperature > 0, draw_probs(_keys(slots, slots.generated + j, 1), q),
                      jnp.argmax(z, axis=-1).astype(jnp.int32))
        return (cache, d), (d, q)

    caches = list(caches)
    (caches[rl], _), (drafts, qs) = jax.lax.scan(draft, (caches[rl], slots.token), jnp.arange(gamma))
    drafts, qs = drafts.T, jnp.swapaxes(qs, 0, 1)  # [S, γ], [S, γ, V]

    # verify: the pending token and the drafts, γ + 1 positions, through every model
    seq = jnp.concatenate([slots.token[:, None], drafts], axis=1)
    positions = slots.length[:, None] + jnp.arange(gamma + 1)
    logits = []
    for i, (m, cache) in enumerate(zip(models, caches)):
        out, caches[i] = m(seq, positions, cache=cache.replace(index=slots.length), kv_len=kv_len,
                           cpu_kernel=engine.cpu_kernel)
        logits.append(out)
    index = slots.generated[:, None] + jnp.arange(gamma + 1)  # each position's token index
    z = engine.combination(logits, index, vocab, lams=slots.lam.T[:engine.num_pairs, :, None])
    if rl is not None:
        z = jnp.where(slots.rl_only[:, None, None], logits[rl][..., :vocab], z)
    flat = lambda x: x.reshape(s * (gamma + 1), *x.shape[2:])  # noqa: E731 - rows = (slot, position)
    per_pos = lambda field: jnp.repeat(field, gamma + 1, axis=0)  # noqa: E731
    wide = slots.replace(**{f: per_pos(getattr(slots, f)) for f in
                            ("temperature", "top_k", "top_p", "stop_ids", "forced_len", "min_tokens")})
    z_masked = _mask_stops(flat(z), wide, flat(index) < wide.min_tokens)
    p = _probs(z_masked, wide).reshape(s, gamma + 1, -1)

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
    x, new_forced = _continue_text(x, slots)  # γ = 0 slots: a plain step's continue-text logic
    emitted = jnp.where(jnp.arange(gamma + 1) < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), x[:, None])

    # stops and budgets cut inside the round
    is_stop = jnp.any(emitted[..., None] == slots.stop_ids[:, None, :], axis=-1) & (index >= slots.min_tokens[:, None])
    is_stop &= ~(slots.forced_pos >= 0)[:, None] | (jnp.arange(gamma + 1) > 0)  # a forced token never stops
    ends = is_stop | (index + 1 >= slots.budget[:, None])
    ends &= jnp.arange(gamma + 1) <= accepted[:, None]
    first_end = jnp.argmax(ends, axis=1)
    finished = jnp.any(ends, axis=1)
    count = jnp.where(finished, first_end + 1, accepted + 1)
    stopped = finished & jnp.take_along_axis(is_stop, first_end[:, None], axis=1)[:, 0]
    act = slots.active
    count = jnp.where(act, count, 0)
    last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]

    log_z = jax.nn.log_softmax(z, axis=-1) if engine.spec.logprobs or engine.spec.top_logprobs else None
    logp = jnp.take_along_axis(log_z, emitted[..., None], axis=-1)[..., 0] if engine.spec.logprobs else \
        jnp.zeros(emitted.shape, jnp.float32)
    top = jax.lax.top_k(log_z, engine.spec.top_logprobs) if engine.spec.top_logprobs else None
    ent = row_entropies(flat(z), wide.temperature).reshape(s, gamma + 1) if engine.spec.entropies else \
        jnp.zeros(emitted.shape, jnp.float32)
    slots = slots.replace(token=jnp.where(act, last, slots.token), length=slots.length + count,
                          generated=slots.generated + count, active=act & ~finished,
                          forced_pos=jnp.where(act, new_forced, slots.forced_pos))
    info = dict(tokens=emitted, count=count, logprobs=logp, entropies=ent, top=top, finished=act & finished,
                stopped=act & stopped, drafted=jnp.where(act, g_eff, 0), accepted=jnp.where(act, accepted, 0))
    return tuple(caches), slots, info


def _continue_text(x: jax.Array, slots) -> tuple[jax.Array, jax.Array]:
    """(token, next forced position) after a plain step's continue-text rule: a stop id drawn
    before min_tokens in a slot with a continue text starts it, and a started one goes on.
    Only γ = 0 slots can have one, so their round token is a plain step's."""
    rows = jnp.arange(x.shape[0])
    forcing = slots.forced_pos >= 0
    is_stop = jnp.any(x[:, None] == slots.stop_ids, axis=-1)
    start = ~forcing & is_stop & (slots.generated < slots.min_tokens) & (slots.forced_len > 0)
    at = jnp.where(forcing, slots.forced_pos, 0)
    x = jnp.where(forcing | start, slots.forced[rows, at], x)
    pos = jnp.where(forcing | start, at + 1, -1)
    return x, jnp.where(pos >= slots.forced_len, -1, pos)
