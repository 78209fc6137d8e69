"""The engine's sampler (`filter_rows`, `row_probs`, `sample_rows`, `draw`, entropies) against
the float64 law of `tests/reference_decoder.py`, and the combination rule.

Tolerances come from float32: the sampler scales, exponentiates and sums float32 logits, so
a probability is off by a few float32 epsilons times the size of the scaled logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_decoder import inverse_cdf, law

from jaxrast.rast.combine import combine_logits, lam_schedule
from jaxrast.rast.sampling import (
    draw,
    draw_probs,
    entropy_of,
    filter_rows,
    row_entropies,
    row_probs,
    sample_rows,
    softmax_entropy,
)

EPS32 = float(np.finfo(np.float32).eps)
TINY32 = 2 * float(np.finfo(np.float32).tiny)  # ~2e-38
# (τ, top_k, top_p) per row: plain, temperature, top-p, top-k, both, greedy (filters ignored)
SETTINGS = [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 0, 0.9), (0.8, 0, 0.5), (1.0, 5, 1.0), (1.2, 1, 1.0),
            (0.9, 40, 0.8), (1.0, 3, 0.7), (2.0, 280, 0.95), (0.0, 0, 1.0), (0.0, 7, 0.3)]

VOCAB = 300  # > the 256 candidates filter_rows cuts from before a full sort
DRAWS = 384  # rows of the draw tests
filter_jit = jax.jit(filter_rows)
draw_jit = jax.jit(draw)
probs_jit = jax.jit(row_probs)
sample_jit = jax.jit(sample_rows)


def columns(settings):
    """The per-row parameter arrays (temperature, top_k, top_p) of [(τ, k, p), ...]."""
    tau, k, p = zip(*settings)
    return jnp.asarray(tau, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32)


def keys_for(n: int, seed: int = 0) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def uniforms_of(keys: jax.Array) -> np.ndarray:
    """The u in (0, 1] `draw_probs` inverts the CDF at, per key."""
    return np.asarray(1.0 - jax.vmap(jax.random.uniform)(keys), np.float64)


def prob_rtol(z: np.ndarray, tau: float) -> float:
    """float32 error of softmax(z / τ): rounding the scaled logits x (|x|·ε/2 each, twice in
    a difference) and a few ε from exp, the sum and the division."""
    x = np.abs(np.asarray(z, np.float64)[np.isfinite(z)]) / (tau or 1.0)
    return EPS32 * (2 * float(x.max()) + 8)


def nucleus_gap(z: np.ndarray, tau: float, top_k: int, top_p: float) -> float:
    """How far float64 is from flipping a token in or out of the nucleus: the smallest
    |mass of the tokens before it − top_p| over the top-k law's descending order."""
    if tau == 0 or top_p >= 1:
        return np.inf
    desc = -np.sort(-law(z, tau, top_k))
    return float(np.min(np.abs(np.cumsum(desc) - desc - top_p)))


def assert_matches_law(probs: np.ndarray, z: np.ndarray, settings) -> None:
    """Each row of `probs` (float32 [rows, vocab]) is the float64 law of its own setting:
    the same support, the same probabilities up to float32."""
    for i, (tau, k, p) in enumerate(settings):
        want = law(z[i], tau, k, p)
        assert nucleus_gap(z[i], tau, k, p) > 5e-5, "the test data sits on a nucleus boundary"
        # float32 flushes masses below its normal range to 0: only those may leave the support
        sure = (want == 0) | (want > TINY32)
        np.testing.assert_array_equal(probs[i][sure] > 0, want[sure] > 0, err_msg=f"support of row {i} {settings[i]}")
        np.testing.assert_allclose(probs[i], want, rtol=prob_rtol(z[i], tau), atol=TINY32, err_msg=f"row {i}")


def kept(logits, top_k, top_p, tau=1.0) -> list[list[bool]]:
    """filter_rows' keep-mask of hand-made `logits` (up to 2 rows of up to 8 tokens) scaled
    by τ, run padded to [2, 8] with -inf (never kept, no mass): one program for them all."""
    rows = np.atleast_2d(np.asarray(logits, np.float32)) / np.float32(tau)
    padded = np.pad(rows, ((0, 0), (0, 8 - rows.shape[1])), constant_values=-np.inf)[[0, -1]]
    out = filter_jit(jnp.asarray(padded), jnp.full(2, top_k, jnp.int32), jnp.full(2, top_p, jnp.float32))
    return np.isfinite(np.asarray(out))[:len(rows), :rows.shape[1]].tolist()


def law_kept(logits, top_k, top_p, tau=1.0) -> list[list[bool]]:
    return [(law(np.asarray(row, np.float64), tau, top_k, top_p) > 0).tolist() for row in np.atleast_2d(logits)]


# ---- the combination rule ------------------------------------------------------------------

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


def test_lam_schedules():
    steps = jnp.arange(6)
    np.testing.assert_allclose(jax.vmap(lam_schedule(None))(steps), np.ones(6))
    np.testing.assert_allclose(jax.vmap(lam_schedule("warmup:4"))(steps), [0.25, 0.5, 0.75, 1, 1, 1])
    np.testing.assert_allclose(jax.vmap(lam_schedule("first:2"))(steps), [1, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown λ schedule"):
        lam_schedule("cosine")


# ---- filters, hand-computed ------------------------------------------------------------------

def test_top_k_keeps_the_k_largest_and_ties_at_the_threshold():
    z = [[1.0, 5.0, 3.0, 4.0, 2.0, 0.0], [1.0, 3.0, 2.0, 2.0, 0.0, 2.0]]
    assert kept(z, 2, 1.0) == law_kept(z, 2, 1.0) == [[False, True, False, True, False, False],
                                                      [False, True, True, True, False, True]]
    assert kept(z, 0, 1.0) == kept(z, 6, 1.0) == [[True] * 6] * 2  # 0: off; k = every token: all kept
    assert kept(z, 1, 1.0)[1] == law_kept(z, 1, 1.0)[1] == [False, True, False, False, False, False]


def test_top_p_includes_the_token_that_crosses():
    z = np.log([0.5, 0.3, 0.15, 0.05])
    for p, want in ((0.01, [True, False, False, False]), (0.45, [True, False, False, False]),
                    (0.55, [True, True, False, False]), (0.79, [True, True, False, False]),
                    (0.85, [True, True, True, False]), (0.99, [True, True, True, True]),
                    (1.0, [True, True, True, True])):
        assert kept(z, 0, p) == law_kept(z, 0, p) == [want], p


def test_top_p_keeps_ties_with_the_last_kept_token():
    z = np.log([0.2, 0.4, 0.2, 0.2])  # the first 0.2 crosses 0.5; its ties come along
    assert kept(z, 0, 0.5) == law_kept(z, 0, 0.5) == [[True] * 4]
    assert kept(z, 0, 0.35) == law_kept(z, 0, 0.35) == [[False, True, False, False]]


def test_top_p_is_measured_on_the_top_k_law_after_temperature():
    z = np.log([0.4, 0.3, 0.2, 0.1])
    # alone, top-p 0.5 keeps two tokens (mass before the second: 0.4); after top-k 2 the law
    # is (4/7, 3/7), and the mass before the second (0.57) is past 0.5
    assert kept(z, 0, 0.5) == law_kept(z, 0, 0.5) == [[True, True, False, False]]
    assert kept(z, 2, 0.5) == law_kept(z, 2, 0.5) == [[True, False, False, False]]
    assert kept(z, 3, 0.75) == law_kept(z, 3, 0.75) == [[True, True, False, False]]  # (4, 3, 2)/9
    # τ = 0.5 sharpens (0.6, 0.3, 0.1) to (0.78, 0.20, 0.02): top-p 0.7 keeps one token only
    z = np.log([0.6, 0.3, 0.1])
    assert kept(z, 0, 0.7, tau=0.5) == law_kept(z, 0, 0.7, tau=0.5) == [[True, False, False]]
    assert kept(z, 0, 0.7) == law_kept(z, 0, 0.7) == [[True, True, False]]


# ---- the processed law against float64 -------------------------------------------------------
# every batch below is [12, 300] or [384, 300]: one compiled program per sampler function


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat: long nuclei (full sort); peaked: candidates
def test_row_probs_match_the_law(scale):
    z = np.array(jax.random.normal(jax.random.key(1), (len(SETTINGS), VOCAB)) * scale)
    z[0, :3] = z[0, :3].max() + 1.0  # a three-way tie at the top of a sampled row
    z[10, [4, 9]] = z[10].max() + 1.0  # and of a greedy row: the first index wins
    probs = np.asarray(probs_jit(jnp.asarray(z), *columns(SETTINGS)))
    assert_matches_law(probs, z.astype(np.float64), SETTINGS)
    np.testing.assert_array_equal(probs[10], np.eye(VOCAB)[4])  # greedy: one-hot, exactly
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=VOCAB * EPS32)


def test_cuts_beyond_the_candidates_use_the_full_sort():
    """Rows whose cut lies beyond the 256 candidates (a flat law's 95 % nucleus, a top-k of
    280) next to rows the candidates decide: every row is the law."""
    z = np.array(jax.random.normal(jax.random.key(2), (len(SETTINGS), VOCAB)))
    settings = [(1.0, 0, 0.95), (1.0, 280, 1.0), (0.5, 270, 0.99), (1.0, 0, 0.3)] * 3
    z[:3] *= 0.1
    z[3:] *= 20.0
    probs = np.asarray(probs_jit(jnp.asarray(z), *columns(settings)))
    assert (probs[0] > 0).sum() > 256 and (probs[1] > 0).sum() == 280 and 256 < (probs[2] > 0).sum() < 270
    assert_matches_law(probs, z.astype(np.float64), settings)


def test_each_row_depends_on_its_own_settings_only():
    """A row's law and draw are the same whatever shares its batch: the rows rolled past
    each other, and every other row replaced by an unfiltered one."""
    z = jax.random.normal(jax.random.key(3), (len(SETTINGS), VOCAB)) * 3
    tau, k, p = columns(SETTINGS)
    keys = keys_for(len(SETTINGS))
    probs, tokens = np.asarray(probs_jit(z, tau, k, p)), np.asarray(sample_jit(keys, z, tau, k, p))
    for shift in (1, 5):
        rolled = [jnp.roll(x, shift, axis=0) for x in (keys, z, tau, k, p)]
        np.testing.assert_array_equal(np.roll(probs, shift, axis=0), probs_jit(*rolled[1:]))
        np.testing.assert_array_equal(np.roll(tokens, shift), sample_jit(*rolled))
    plain = columns([(1.0, 0, 1.0)] * len(SETTINGS))
    for i in range(len(SETTINGS)):
        alone = [jnp.asarray(c).at[i].set(x[i]) for c, x in zip(plain, (tau, k, p))]
        np.testing.assert_array_equal(probs[i], probs_jit(z, *alone)[i], err_msg=str(SETTINGS[i]))
        assert tokens[i] == int(sample_jit(keys, z, *alone)[i]), SETTINGS[i]


def test_greedy_rows_take_the_argmax_whatever_the_key_and_filters():
    z = jax.random.normal(jax.random.key(4), (len(SETTINGS), VOCAB))
    z = z.at[11, [7, 8]].set(10.0)  # a tie: the first index
    greedy = np.array([t == 0 for t, _, _ in SETTINGS])
    for seed in range(3):
        tokens = np.asarray(sample_jit(keys_for(len(SETTINGS), seed), z, *columns(SETTINGS)))
        np.testing.assert_array_equal(tokens[greedy], np.argmax(np.asarray(z), axis=-1)[greedy])
    assert tokens[11] == 7


def test_tiny_and_masked_tokens_are_never_drawn():
    """Tokens of probability ~1e-30 and -inf entries, first, between the live tokens and at
    the end of the vocabulary: never drawn (192 draws per row kind, by `sample_rows` and
    `draw`), and of probability 0 or ~1e-30 in the law as in float64."""
    z = np.full((2, VOCAB), -69.0, np.float32)  # e^-69 ≈ 1e-30 relative to the live tokens
    live = [3, 150, 160, 230, 298]
    z[:, live] = [0.0, 1.0, -1.0, 0.5, 2.0]
    z[0, [0, 1, 200, 299]] = -np.inf
    z[1, 220:] = -np.inf
    zz = jnp.asarray(np.repeat(z, DRAWS // 2, axis=0))
    keys = keys_for(DRAWS, seed=4)
    for tokens in (sample_jit(keys, zz, *columns([(1.0, 0, 1.0)] * DRAWS)), draw_jit(keys, zz)):
        tokens = np.asarray(tokens).reshape(2, DRAWS // 2)
        assert set(tokens[0]) == set(live) and set(tokens[1]) == {3, 150, 160}
    probs = np.asarray(probs_jit(jnp.asarray(np.repeat(z, 6, axis=0)), *columns([(1.0, 0, 1.0)] * 12)))[[0, -1]]
    assert_matches_law(probs, z.astype(np.float64), [(1.0, 0, 1.0)] * 2)
    assert np.all(probs[0, [0, 1, 200, 299]] == 0) and np.all(probs[1, 220:] == 0)
    assert 0 < probs[0, 2] < 1e-29


# ---- the draw against the float64 inverse CDF ---------------------------------------------------

def assert_draws_match(tokens: np.ndarray, laws, u: np.ndarray) -> None:
    """Each token is the float64 inverse-CDF draw at the same u, unless u lies within 2e-5
    of a CDF boundary (float32 error of the laws, ~5e-6, plus the draw's two-level cumsum
    over ~30 entries, ~5e-6: a token there may go either way)."""
    mismatched = 0
    for t, q, ui in zip(tokens, laws, u):
        want = inverse_cdf(q, ui)
        if t != want:
            cdf = np.cumsum(q)
            assert np.min(np.abs(cdf - ui * cdf[-1])) < 2e-5, (t, want, ui)
            mismatched += 1
    assert mismatched <= len(tokens) // 100


def test_sample_rows_draw_the_law_by_its_inverse_cdf():
    settings = SETTINGS * (DRAWS // len(SETTINGS))
    z = jax.random.normal(jax.random.key(5), (DRAWS, VOCAB)) * 3
    z = z.at[:, 290:].set(-jnp.inf)
    keys = keys_for(DRAWS, seed=6)
    tokens = np.asarray(sample_jit(keys, z, *columns(settings)))
    z64 = np.asarray(z, np.float64)
    assert_draws_match(tokens, [law(z64[i], *s) for i, s in enumerate(settings)], uniforms_of(keys))


def test_draw_and_draw_probs_invert_the_cdf():
    z = jax.random.normal(jax.random.key(7), (DRAWS, VOCAB)) * 2
    z = z.at[:, ::7].set(-jnp.inf)
    keys = keys_for(DRAWS, seed=8)
    laws, u = law(np.asarray(z, np.float64), 1.0), uniforms_of(keys)
    assert_draws_match(np.asarray(draw_jit(keys, z)), laws, u)
    assert_draws_match(np.asarray(jax.jit(draw_probs)(keys, jax.nn.softmax(z, axis=-1))), laws, u)


# ---- entropies ----------------------------------------------------------------------------------

def entropy64(x: np.ndarray) -> np.ndarray:
    q = law(x, 1.0)
    return -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)


def test_softmax_entropy_and_entropy_of():
    z = jax.random.normal(jax.random.key(1), (len(SETTINGS), VOCAB)) * 3
    z = z.at[:, :7].set(-jnp.inf)  # masked entries count 0, not NaN
    probs, entropy = softmax_entropy(z)
    np.testing.assert_array_equal(probs, jax.nn.softmax(z, axis=-1))
    want = entropy64(np.asarray(z, np.float64))
    np.testing.assert_allclose(entropy, want, rtol=1e-5)
    np.testing.assert_allclose(entropy_of(jax.nn.log_softmax(z, axis=-1)), want, rtol=1e-5)


def test_row_entropies_are_before_the_filters_at_each_rows_temperature():
    z = jax.random.normal(jax.random.key(9), (len(SETTINGS), VOCAB)) * 3
    tau, _, _ = columns(SETTINGS)
    z64 = np.asarray(z, np.float64)
    want = [entropy64(z64[i] / (t or 1.0)) for i, (t, _, _) in enumerate(SETTINGS)]  # τ = 1 for greedy rows
    np.testing.assert_allclose(row_entropies(z, tau), want, rtol=1e-5)
