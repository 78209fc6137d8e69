"""Unit tests of the pure sampling math."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrast.rast.combine import combine_logits, lam_schedule
from jaxrast.rast.sampling import (
    filter_top_k,
    filter_top_p,
    sample,
    sample_with_entropy,
    sampling_logits,
    softmax_entropy,
)


def test_combine_single_pair_hand_computed():
    base = jnp.array([[1.0, 2.0, 3.0, 99.0]])  # last row is padding beyond the real vocab
    rl = jnp.array([[0.0, 1.0, 0.0]])
    ref = jnp.array([[0.5, 0.0, 0.0]])
    z = combine_logits(base, [rl], [ref], [2.0], vocab=3)
    chex.assert_shape(z, (1, 3))
    np.testing.assert_allclose(z, [[0.0, 4.0, 3.0]])


def test_combine_several_pairs_and_no_pairs():
    key = jax.random.key(0)
    b, r1, f1, r2, f2 = (jax.random.normal(k, (2, 5, 7)) for k in jax.random.split(key, 5))
    z = combine_logits(b, [r1, r2], [f1, f2], jnp.array([0.4, 0.1]))
    np.testing.assert_allclose(z, b + 0.4 * (r1 - f1) + 0.1 * (r2 - f2), rtol=1e-6)
    np.testing.assert_array_equal(combine_logits(b), b)
    with pytest.raises(ValueError, match="each pair needs one of each"):
        combine_logits(b, [r1], [f1, f2], [1.0])


def test_combine_aligns_differently_padded_vocabs():
    base = jnp.arange(10.0)[None]  # padded to 10
    rl, ref = jnp.ones((1, 8)), jnp.zeros((1, 8))  # padded to 8
    z = combine_logits(base, [rl], [ref], [1.0], vocab=6)
    np.testing.assert_allclose(z, [np.arange(6.0) + 1])
    # default vocab: the smallest of the inputs
    assert combine_logits(base, [rl], [ref], [1.0]).shape == (1, 8)


def test_top_k_keeps_k_largest():
    z = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_top_k(z, 2)
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True, False]])
    np.testing.assert_array_equal(filter_top_k(z, 0), z)


def test_top_p_includes_the_token_that_crosses():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    z = jnp.log(jnp.asarray(probs))[None]
    keep = lambda p: np.isfinite(np.asarray(filter_top_p(z, p)))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.51) == [True, True, False, False]
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]
    assert keep(0.01) == [True, False, False, False]


def nucleus_reference(z: np.ndarray, top_p: float) -> np.ndarray:
    """Keep-mask from a full float64 sort, the definition filter_top_p implements."""
    desc = np.sort(z, axis=-1)[:, ::-1]
    probs = np.exp(desc - desc.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = ((np.cumsum(probs, -1) - probs) < top_p).sum(-1, keepdims=True)
    return z >= np.take_along_axis(desc, keep - 1, axis=-1)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat: full-sort fallback; peaked: top-k path
def test_top_p_candidates_path_equals_full_sort(scale):
    z = np.asarray(jax.random.normal(jax.random.key(0), (6, 500)) * scale, np.float64)
    z[0, :3] = z[0, :3].max() + 1.0  # a three-way tie at the top
    z = z.astype(np.float32)
    want = nucleus_reference(z.astype(np.float64), 0.9)
    for candidates in (8, 64, 500):
        got = np.isfinite(np.asarray(jax.jit(filter_top_p, static_argnums=(1, 2))(z, 0.9, candidates)))
        np.testing.assert_array_equal(got, want, err_msg=f"candidates={candidates}")


def test_temperature_applies_before_top_p():
    z = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    # τ=0.5 sharpens to (0.78, 0.20, 0.02): top-p 0.7 keeps only the first token
    assert np.isfinite(np.asarray(sampling_logits(z, 0.5, top_p=0.7)))[0].tolist() == [True, False, False]
    assert np.isfinite(np.asarray(sampling_logits(z, 1.0, top_p=0.7)))[0].tolist() == [True, True, False]


def test_greedy_and_per_row_streams():
    z = jnp.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    keys = jax.random.split(jax.random.key(1), 2)
    np.testing.assert_array_equal(sample(keys, z, 0.0), [1, 0])
    # A row's draw depends only on its own key and logits.
    a = sample(keys, z, 1.0)
    b = sample(keys[:1], z[:1], 1.0)
    assert int(a[0]) == int(b[0])


def test_softmax_entropy_and_sampling_with_it():
    z = jax.random.normal(jax.random.key(1), (6, 300)) * 3
    z = z.at[:, :7].set(-jnp.inf)  # masked entries count 0, not NaN
    probs, entropy = softmax_entropy(z)
    np.testing.assert_array_equal(probs, jax.nn.softmax(z, axis=-1))
    p64 = np.exp(np.asarray(z, np.float64) - np.max(np.asarray(z, np.float64), axis=-1, keepdims=True))
    p64 /= p64.sum(axis=-1, keepdims=True)
    want = -np.sum(np.where(p64 > 0, p64 * np.log(np.where(p64 > 0, p64, 1.0)), 0.0), axis=-1)
    np.testing.assert_allclose(entropy, want, rtol=1e-5)
    keys = jax.random.split(jax.random.key(2), 6)
    # the draw shares the softmax without filters and matches `sample` in every mode
    for tau, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)):
        tokens, ent = sample_with_entropy(keys, z, tau, top_k, top_p)
        np.testing.assert_array_equal(tokens, sample(keys, z, tau, top_k, top_p))
        np.testing.assert_allclose(ent, softmax_entropy(z / (tau or 1.0))[1])


def test_lam_schedules():
    steps = jnp.arange(6)
    np.testing.assert_allclose(jax.vmap(lam_schedule(None))(steps), np.ones(6))
    np.testing.assert_allclose(jax.vmap(lam_schedule("warmup:4"))(steps), [0.25, 0.5, 0.75, 1, 1, 1])
    np.testing.assert_allclose(jax.vmap(lam_schedule("first:2"))(steps), [1, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown λ schedule"):
        lam_schedule("cosine")
