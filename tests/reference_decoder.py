"""A plain RAST decoder for tests: a full forward of every model per step (no KV cache), the
combination z = z_base + Σ_i λ_i (z_rl_i − z_ref_i) and the sampling law in float64, and
the engine's random stream, so its tokens are what the engine should produce.

`reference_decode([base, rl_1, ref_1, ...], [λ_1, ...], ...)` is RAST; `([base], [])` the base
alone; `([rl], [])` one RL model alone.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit
def _logits_at(model, tokens: jax.Array, n: jax.Array) -> jax.Array:
    """The logits [vocab_padded] after the first `n` of `tokens` [1, width]: a causal forward,
    so the right padding beyond `n` cannot reach them (one program per width, not per length)."""
    return model(tokens)[0][0, n - 1]


def next_logits(model, token_ids: Sequence[int]) -> np.ndarray:
    """float64 [vocab_padded] logits of the token after `token_ids`, from a full forward."""
    n = len(token_ids)
    width = max(32, 1 << (n - 1).bit_length())
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = token_ids
    return np.asarray(_logits_at(model, jnp.asarray(tokens), jnp.int32(n)), np.float64)


def combine(logits: Sequence[np.ndarray], lams: Sequence[float], vocab: int) -> np.ndarray:
    """z = base + Σ_i λ_i (rl_i − ref_i) over the first `vocab` entries; logits = [base,
    rl_1, ref_1, ...] (float64, [..., V_i] each), one λ per pair; no λ: the first alone."""
    if len(logits) != 1 + 2 * len(lams):
        raise ValueError(f"{len(logits)} models for {len(lams)} λ: give [base, rl_1, ref_1, ...].")
    z = np.asarray(logits[0], np.float64)[..., :vocab]
    for i, lam in enumerate(lams):
        z = z + float(lam) * (np.asarray(logits[1 + 2 * i], np.float64)[..., :vocab]
                              - np.asarray(logits[2 + 2 * i], np.float64)[..., :vocab])
    return z


def law(z: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution float64 [..., vocab] a token is drawn from: one-hot at the (first)
    argmax when temperature is 0; else softmax(z / τ) restricted to the top-k tokens (ties
    at the k-th value kept), then to the tokens whose mass of strictly more likely tokens,
    under that top-k law, is < top_p (so ties with the last kept token are kept)."""
    z = np.asarray(z, np.float64)
    if temperature == 0:
        return np.eye(z.shape[-1])[np.argmax(z, axis=-1)]
    x = z / temperature
    desc = -np.sort(-x, axis=-1)
    if 0 < top_k < x.shape[-1]:
        kth = desc[..., top_k - 1:top_k]
        x, desc = np.where(x < kth, -np.inf, x), np.where(desc < kth, -np.inf, desc)
    if top_p < 1.0:  # in descending order, a tied group is kept iff its first member is
        p_desc = _softmax(desc)
        before = np.cumsum(p_desc, axis=-1) - p_desc
        keep = np.sum(before < top_p, axis=-1, keepdims=True)
        x = np.where(x < np.take_along_axis(desc, keep - 1, axis=-1), -np.inf, x)
    return _softmax(x)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The engine's draw in float64: the first token whose cumulative mass reaches u·total
    among tokens of positive probability (the last of them if rounding leaves none)."""
    cdf = np.cumsum(probs)
    hits = np.flatnonzero((cdf >= u * cdf[-1]) & (probs > 0))
    return int(hits[0]) if hits.size else int(np.flatnonzero(probs > 0)[-1])


def uniforms(key: jax.Array, steps: int) -> np.ndarray:
    """The u in (0, 1] the engine draws token i with from a row's stream `key`:
    1 − uniform(fold_in(key, i)), i < steps."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(steps))
    return np.asarray(1.0 - jax.vmap(jax.random.uniform)(keys), np.float64)


def reference_decode(models: Sequence, lams: Sequence[float], prompt_ids: Sequence[int], *, vocab: int,
                     max_new_tokens: int, stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, row_id: int = 0, sample: int = 0
                     ) -> tuple[list[int], np.ndarray]:
    """Decodes one row: (generated token ids, the combined logits z float64 [steps, vocab] each
    token was drawn from). models = [base, rl_1, ref_1, ...] with one λ per pair (or one model
    and no λ); up to `max_new_tokens` tokens, ending after the first stop id (included). A
    sampled row draws token i with u_i of the engine's stream fold_in(fold_in(key(seed),
    row_id), sample)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row_id), sample)
    u = uniforms(key, max_new_tokens) if temperature > 0 else None
    tokens, out, zs = list(prompt_ids), [], []
    for i in range(max_new_tokens):
        z = combine([next_logits(m, tokens) for m in models], lams, vocab)
        token = int(np.argmax(z)) if u is None else inverse_cdf(law(z, temperature, top_k, top_p), u[i])
        zs.append(z)
        out.append(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return out, np.asarray(zs, np.float64).reshape(len(zs), vocab)


# float32 logits of O(10) summed over three models: two programs may order a reduction
# differently, so near-equal logits (a "tie") may be broken either way
TIE = 1e-4


def assert_same_up_to_ties(engine_ids: Sequence[int], ref_ids: Sequence[int], z: np.ndarray) -> None:
    """The engine's greedy path equals the reference's, or parts where the reference's two
    best combined logits `z` [steps, vocab] are within TIE (either may break the tie)."""
    for step, (x, y) in enumerate(zip(engine_ids, ref_ids)):
        if x != y:
            top2 = np.sort(z[step])[-2:]
            assert top2[1] - top2[0] < TIE * max(1.0, abs(top2[1])), (step, engine_ids, ref_ids, top2)
            return
    assert list(engine_ids) == list(ref_ids)
