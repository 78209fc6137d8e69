"""Pure sampling math: temperature, top-k, top-p, the CDF-inversion draw and entropies.
Shapes: logits `[batch, vocab]`. The RAST combination itself is `jaxrast.rast.combine`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def entropy_of(logp: jax.Array) -> jax.Array:
    """Entropy -Σ p·log p [...] of log-probs [..., vocab]; masked (-inf) entries count 0, not NaN."""
    return -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)


def softmax_entropy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(softmax [batch, vocab], as jax.nn.softmax computes it; its entropy [batch]) from one
    exp pass: H = log Σe − Σ p·(x − max) with e = exp(x − max). -inf entries count 0."""
    x = logits.astype(jnp.float32)
    shifted = x - jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(shifted)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / total
    entropy = jnp.log(total[..., 0]) - jnp.sum(jnp.where(e > 0, probs * shifted, 0.0), axis=-1)
    return probs, entropy


def draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One token per row from softmax(logits) by inversion of its CDF.

    One uniform per row instead of the Gumbel-max trick's one per vocabulary entry: random
    bits for [batch, 152K] every step cost more than the rest of a small model's decode
    step on CPU. The CDF is inverted in two levels (pick a block of ~sqrt(vocab) tokens by
    its mass, then the token inside it), which avoids a cumulative sum over the whole
    vocabulary. Tokens of probability 0 (masked to -inf) can never be drawn, whatever the
    rounding. keys: [batch]; logits: [batch, vocab]. Returns int32 [batch].
    """
    return draw_probs(keys, jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


def draw_probs(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """`draw` from probabilities [batch, vocab] (rows summing to 1) instead of logits."""
    batch, vocab = probs.shape
    size = 1 << max(0, (vocab - 1).bit_length() + 1) // 2  # a power of two >= sqrt(vocab)
    blocks = -(-vocab // size)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * size - vocab))).reshape(batch, blocks, size)
    mass = probs.sum(axis=-1)  # [batch, blocks]
    u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # (0, 1]: u = 0 would pick a leading zero
    cum = jnp.cumsum(mass, axis=-1)
    target = u * cum[:, -1]
    block = _invert(cum, mass, target)
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [batch, size]
    before = jnp.take_along_axis(cum - mass, block[:, None], axis=1)[:, 0]
    token = block * size + _invert(jnp.cumsum(inner, axis=-1), inner, target - before)
    return token.astype(jnp.int32)


def _invert(cdf: jax.Array, probs: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the first index whose cumulative mass reaches target among entries of
    positive probability (a min over indices: ~2x cheaper on CPU than argmax's
    index-carrying reduction); if rounding leaves none, the last positive entry (the
    inverse CDF at the top). cdf, probs: [batch, n]; target: [batch]."""
    n = cdf.shape[-1]
    ids = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where((cdf >= target[:, None]) & (probs > 0), ids, n), axis=-1)
    last = jnp.max(jnp.where(probs > 0, ids, -1), axis=-1)
    return jnp.where(first < n, first, last)


# ---- per-row parameters: every row (an engine slot) with its own τ, top-k and top-p -----------

def filter_rows(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int = 256) -> jax.Array:
    """Top-k then top-p per row: logits [batch, vocab] (already divided by τ); top_k [batch]
    int (0 = off), top_p [batch] float (1 = off). Each row's cut depends on that row alone.

    Top-k keeps the k largest logits (ties at the threshold kept). Top-p, measured on the
    top-k-filtered law, keeps a token if the mass of the tokens strictly more likely than
    it is < top_p, so the token that crosses the threshold is included (as in HF and vLLM);
    tokens tied with the last one kept are kept too.

    Sorting a 152K vocabulary every step is the slowest part of sampling (~0.5 s for 16
    rows on a CPU, slow on TPU too), so the cuts come from the `candidates` most likely
    tokens (`lax.top_k`) when they decide every row (a top-k within them, and a nucleus
    they cover), else from a full sort, whose first entries are the same values: the
    result is the same either way."""
    vocab = logits.shape[-1]
    k_on = (top_k > 0) & (top_k < vocab)

    def cut_from(desc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(cut [batch], whether this descending prefix [batch, n] decides it)."""
        n = desc.shape[-1]
        k_cut = jnp.where(k_on, jnp.take_along_axis(desc, jnp.clip(top_k, 1, n)[:, None] - 1, axis=-1)[:, 0],
                          NEG_INF)
        # the nucleus is measured on the top-k-filtered law
        log_norm = jax.nn.logsumexp(jnp.where(logits < k_cut[:, None], NEG_INF, logits), axis=-1)
        desc = jnp.where(desc < k_cut[:, None], NEG_INF, desc)
        probs = jnp.exp(desc - log_norm[:, None])
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1
        p_cut = jnp.take_along_axis(desc, jnp.maximum(keep, 1)[:, None] - 1, axis=-1)[:, 0]
        decided = (~k_on | (top_k <= n)) & ((top_p >= 1.0) | (jnp.sum(probs, axis=-1) >= top_p))
        return jnp.maximum(k_cut, jnp.where(top_p < 1.0, p_cut, NEG_INF)), decided

    def filtered() -> jax.Array:
        if candidates >= vocab:  # a small vocabulary: the sort is cheap
            cut = cut_from(jnp.sort(logits, axis=-1)[..., ::-1])[0]
        else:
            cut, decided = cut_from(jax.lax.top_k(logits, candidates)[0])
            cut = jax.lax.cond(jnp.all(decided), lambda: cut,
                               lambda: cut_from(jnp.sort(logits, axis=-1)[..., ::-1])[0])
        return jnp.where(logits < cut[:, None], NEG_INF, logits)

    return jax.lax.cond(jnp.any(k_on | (top_p < 1.0)), filtered, lambda: logits)


def sample_rows(keys: jax.Array, z: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
                ) -> jax.Array:
    """Draws one token per row from softmax(filter_rows(z / τ)): keys [batch] PRNG keys (one
    stream per row, so a row's draw never depends on what else is in the batch); z [batch,
    vocab]; temperature [batch] (0: that row is greedy, the argmax of z), top_k [batch],
    top_p [batch]. Returns int32 [batch]."""
    greedy = jnp.argmax(z, axis=-1).astype(jnp.int32)

    def sampled():
        scaled = z / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        return jnp.where(temperature > 0, draw(keys, filter_rows(scaled, top_k, top_p)), greedy)

    # a step of greedy rows only skips the draw's passes over [batch, vocab]; a sampled row
    # takes the same branch whoever its neighbours are
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def row_probs(z: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The distribution [batch, vocab] `sample_rows` draws from: softmax of the τ-scaled,
    top-k / top-p filtered logits, one-hot at the argmax for greedy rows (τ = 0).
    Speculative decoding compares these, so they are the processed laws, not softmax(z)."""
    scaled = z / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    probs = jax.nn.softmax(filter_rows(scaled, top_k, top_p).astype(jnp.float32), axis=-1)
    greedy = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=probs.dtype)
    return jnp.where((temperature > 0)[:, None], probs, greedy)


def row_entropies(z: jax.Array, temperature: jax.Array) -> jax.Array:
    """Entropy [batch] of softmax(z / τ) per row, before top-k/top-p (τ = 1 for greedy rows)."""
    return softmax_entropy(z / jnp.where(temperature > 0, temperature, 1.0)[:, None])[1]
