"""XLA's attention ops with a layer's sliding window and score scale: the ragged kernel equals
dense attention, and skips the key blocks behind every query's window."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrast.models.attention import LayerAttention, dense_attention, ragged_attention, visible


def inputs(seed, b=4, kv=2, g=2, t=3, d=16, s=256):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, kv, g, t, d), np.float32)
    k = rng.standard_normal((b, kv, d, s), np.float32)
    v = rng.standard_normal((b, kv, s, d), np.float32)
    starts = np.array([0, 40, 150, s - t])  # a row at the start, two inside, one at the very end
    positions = (starts[:b, None] + np.arange(t)).astype(np.int32)
    return q, k, v, positions, np.ones((b, s), bool)


def test_visible_is_causal_and_windowed():
    allowed = np.asarray(visible(jnp.asarray([[5, 9]]), jnp.ones((1, 12), bool), window=3))
    assert allowed[0, 0].nonzero()[0].tolist() == [3, 4, 5]
    assert allowed[0, 1].nonzero()[0].tolist() == [7, 8, 9]


@pytest.mark.parametrize("window", [None, 5, 40, 100])
def test_ragged_with_a_window_equals_dense(window):
    q, k, v, positions, key_mask = inputs(window or 0)
    layer = LayerAttention(5.0, window)  # a divisor that is not sqrt(d) = 4
    allowed = visible(positions, key_mask, window)
    bounds = positions[:, -1] + 1
    got = jax.jit(functools.partial(ragged_attention, layer=layer))(q, k, v, allowed, bounds,
                                                                    query_positions=positions)
    want = dense_attention(q, k, v, allowed, layer)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-5)


def test_ragged_skips_the_blocks_behind_the_window():
    """NaN in every block wholly behind a row's window changes nothing: those blocks are not
    read (without the window, the same NaN poisons the rows that see them)."""
    q, k, v, positions, key_mask = inputs(1)
    layer = LayerAttention(4.0, 20)
    allowed = visible(positions, key_mask, layer.window)
    bounds = positions[:, -1] + 1
    run = jax.jit(functools.partial(ragged_attention, layer=layer))
    base = np.asarray(run(q, k, v, allowed, bounds, query_positions=positions))
    k2, v2 = k.copy(), v.copy()
    for r, p in enumerate(positions[:, 0]):
        behind = max(p - layer.window + 1, 0) // 128 * 128  # the blocks (of 128 keys) before the window's
        k2[r, :, :, :behind], v2[r, :, :behind] = np.nan, np.nan
    assert np.isnan(k2).any()
    np.testing.assert_array_equal(np.asarray(run(q, k2, v2, allowed, bounds, query_positions=positions)), base)
