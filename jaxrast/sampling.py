"""Pure sampling math: the RAST logit combination, vocabulary alignment, temperature,
top-k, top-p and λ schedules. Shapes: logits `[batch, vocab]`."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def combine_logits(base: jax.Array, rl: Sequence[jax.Array] = (), ref: Sequence[jax.Array] = (),
                   lam: jax.Array | Sequence[float] = (), vocab: int | None = None) -> jax.Array:
    """z = z_base + Σ_i lam_i · (z_rl_i − z_ref_i) over the first `vocab` (real) tokens.

    Each model's logits may be padded beyond the tokenizer (Qwen2.5-7B+: 152064 rows,
    1.5B: 151936); slicing every input to the real vocabulary makes the padded rows
    impossible to sample rather than relying on their (arbitrary) values.

    base: [..., V_base]; rl[i], ref[i]: [..., V_i]; lam: [num_pairs].
    Returns float32 [..., vocab].
    """
    vocab = vocab or min([base.shape[-1], *(x.shape[-1] for x in (*rl, *ref))])
    if not (len(rl) == len(ref) == len(lam)):
        raise ValueError(f"combine_logits: {len(rl)} rl, {len(ref)} ref logits and {len(lam)} weights; "
                         "each pair needs one of each.")
    z = base[..., :vocab].astype(jnp.float32)
    for i, (z_rl, z_ref) in enumerate(zip(rl, ref)):
        delta = z_rl[..., :vocab].astype(jnp.float32) - z_ref[..., :vocab].astype(jnp.float32)
        z = z + jnp.asarray(lam, jnp.float32)[i] * delta
    return z


def entropy_of(logp: jax.Array) -> jax.Array:
    """Entropy -Σ p·log p [...] of log-probs [..., vocab]; masked (-inf) entries count 0, not NaN."""
    return -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)


def filter_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    """Keeps the `top_k` largest logits per row (ties at the threshold kept); 0 = no-op."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def filter_top_p(logits: jax.Array, top_p: float, candidates: int = 256) -> jax.Array:
    """Nucleus filter: keeps the smallest set of tokens whose probability reaches `top_p`.

    A token is kept if the mass of the tokens strictly more likely than it is < top_p, so
    the token that crosses the threshold is included (as in HF and vLLM); tokens tied with
    the last one kept are kept too.

    Sorting a 152K vocabulary every step is the slowest part of sampling (~0.5 s for 16
    rows on a CPU, slow on TPU too), so the threshold comes from the `candidates` most
    likely tokens (`lax.top_k`) whenever they hold at least `top_p` of the mass in every
    row, which is then exact; otherwise from a full sort. logits: [batch, vocab].
    """
    if top_p >= 1.0:
        return logits
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def threshold(desc: jax.Array) -> jax.Array:
        """The logit of the last kept token, from a row-wise descending prefix [batch, n]."""
        probs = jnp.exp(desc - log_norm)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
        return jnp.take_along_axis(desc, keep - 1, axis=-1)

    full_sort = lambda: threshold(jnp.sort(logits, axis=-1)[..., ::-1])  # noqa: E731
    if candidates >= logits.shape[-1]:  # a small vocabulary: the sort is cheap
        cut = full_sort()
    else:
        top = jax.lax.top_k(logits, candidates)[0]
        covered = jnp.all(jnp.sum(jnp.exp(top - log_norm), axis=-1) >= top_p)
        cut = jax.lax.cond(covered, lambda: threshold(top), full_sort)
    return jnp.where(logits < cut, NEG_INF, logits)


def sampling_logits(z: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """The logits actually sampled from: softmax(z/τ), then top-k, then top-p."""
    return filter_top_p(filter_top_k(z / temperature, top_k), top_p)


def sample(keys: jax.Array, z: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Draws one token per row. keys: [batch] PRNG keys (one stream per row, so a row's
    draw never depends on what else is in the batch); z: [batch, vocab]. temperature 0 =
    greedy. Returns int32 [batch]."""
    if temperature == 0:
        return jnp.argmax(z, axis=-1).astype(jnp.int32)
    return draw(keys, sampling_logits(z, temperature, top_k, top_p))


def sample_with_entropy(keys: jax.Array, z: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
                        ) -> tuple[jax.Array, jax.Array]:
    """`sample`, plus the entropy [batch] of softmax(z / τ) before top-k/top-p (τ = 1 when
    greedy): the policy entropy GRPO logs. Without filters the draw reuses its softmax (the
    exp pass over the vocabulary costs as much as the draw itself)."""
    probs, entropy = softmax_entropy(z / (temperature or 1.0))
    if temperature == 0 or top_k > 0 or top_p < 1.0:
        return sample(keys, z, temperature, top_k, top_p), entropy
    return draw_probs(keys, probs), entropy


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


# ---- λ schedules: static (hashable) callables step -> multiplier of every λ_i -------------

def _constant(step: jax.Array) -> jax.Array:
    return jnp.ones((), jnp.float32)


def _warmup(step: jax.Array, steps: int) -> jax.Array:
    return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / steps)


def _until(step: jax.Array, steps: int) -> jax.Array:
    return (step < steps).astype(jnp.float32)


def lam_schedule(spec: str | None) -> Callable[[jax.Array], jax.Array]:
    """'constant' (default), 'warmup:N' (λ ramps linearly over the first N tokens) or
    'first:N' (ΔR applied to the first N generated tokens only)."""
    if spec in (None, "", "constant"):
        return _constant
    kind, _, arg = spec.partition(":")
    if kind in ("warmup", "first") and arg.isdigit() and int(arg) > 0:
        return functools.partial(_warmup if kind == "warmup" else _until, steps=int(arg))
    raise ValueError(f"unknown λ schedule {spec!r}; use 'constant', 'warmup:N' or 'first:N'.")
