"""The CPU decode-attention kernel: the same attention as XLA's ops (sliding windows, score
scales and soft-caps included), a row's result a function of its own keys only, and a clean
fallback where it cannot be built."""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrast.models import cpu_attention
from jaxrast.models.attention import MASKED, LayerAttention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler to build the kernel")


def xla_attention(q, k, v, positions, key_mask, layer=None):
    """The definition, written out: causal, masked, windowed, scaled, soft-capped."""
    layer = layer or LayerAttention(math.sqrt(q.shape[-1]))
    keys = np.arange(k.shape[-1])[None, None, :]
    allowed = (keys <= positions[:, :, None]) & key_mask[:, None, :]
    if layer.window:
        allowed &= keys > positions[:, :, None] - layer.window
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, k) / layer.divisor
    if layer.softcap:
        scores = jnp.tanh(scores / layer.softcap) * layer.softcap
    scores = jnp.where(allowed[:, None, None], scores, MASKED)
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(scores, axis=-1), v)


def kernel(q, k, v, positions, key_mask, layer=None):
    layer = layer or LayerAttention(math.sqrt(q.shape[-1]))
    return jax.jit(functools.partial(cpu_attention.decode_attention, layer=layer))(q, k, v, positions, key_mask)


def inputs(rng, b, kv, g, t, d, s, holes=False):
    q = rng.standard_normal((b, kv, g, t, d), np.float32)
    k = rng.standard_normal((b, kv, d, s), np.float32)
    v = rng.standard_normal((b, kv, s, d), np.float32)
    positions = (rng.integers(0, s - t + 1, size=b)[:, None] + np.arange(t)).astype(np.int32)
    positions[0] = np.arange(t)  # a row at the very start
    positions[-1] = s - t + np.arange(t)  # and one reading the whole cache
    key_mask = rng.random((b, s)) > 0.2 if holes else np.ones((b, s), bool)
    key_mask[:, 0] = True
    return q, k, v, positions, key_mask


@pytest.mark.parametrize("g,d,t,s,holes", [(1, 8, 1, 64, False), (2, 32, 1, 256, False), (3, 16, 4, 128, True),
                                           (4, 40, 1, 1152, False), (7, 64, 5, 320, True), (2, 128, 2, 512, False)])
def test_kernel_equals_xla_attention(g, d, t, s, holes):
    rng = np.random.default_rng(s + g)
    args = inputs(rng, 5, 2, g, t, d, s, holes)
    got = np.asarray(kernel(*args))
    want = np.asarray(xla_attention(*args))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-5)


# windows shorter than, across and longer than a tile of 8 keys, and longer than the cache;
# Gemma's score divisor (sqrt(query_pre_attn_scalar), not sqrt(d)) and a soft-cap
@pytest.mark.parametrize("window,divisor,softcap,t,holes", [(1, None, None, 1, False), (8, None, None, 1, True),
                                                           (13, 5.0, None, 4, False), (37, None, 2.0, 3, True),
                                                           (1000, 7.0, 1.5, 2, False)])
def test_kernel_window_scale_and_softcap_equal_xla_attention(window, divisor, softcap, t, holes):
    rng = np.random.default_rng(window)
    args = inputs(rng, 5, 2, 2, t, 16, 256, holes)
    layer = LayerAttention(divisor or 4.0, window, softcap)
    got = np.asarray(kernel(*args, layer))
    np.testing.assert_allclose(got, np.asarray(xla_attention(*args, layer)), atol=2e-6, rtol=2e-5)


def test_a_sliding_layer_never_reads_keys_behind_its_window():
    """NaN in every key and value before each query's window changes nothing (the kernel
    scores the tile of 8 keys the window starts in, and masks the ones behind it)."""
    rng = np.random.default_rng(4)
    q, k, v, positions, key_mask = inputs(rng, 4, 2, 3, 1, 24, 320)
    layer = LayerAttention(5.0, 21)
    base = np.asarray(kernel(q, k, v, positions, key_mask, layer))
    k2, v2 = k.copy(), v.copy()
    for r, p in enumerate(positions[:, 0]):
        k2[r, :, :, :max(p - 20, 0)], v2[r, :, :max(p - 20, 0)] = np.nan, np.nan
    np.testing.assert_array_equal(np.asarray(kernel(q, k2, v2, positions, key_mask, layer)), base)


def test_a_row_depends_on_its_own_keys_only():
    """Bit for bit the same whatever its neighbours hold, how long they are, or which slot
    it sits in; keys past its position are never read (NaN there changes nothing)."""
    rng = np.random.default_rng(0)
    q, k, v, positions, key_mask = inputs(rng, 6, 2, 4, 1, 40, 640)
    run = kernel
    base = np.asarray(run(q, k, v, positions, key_mask))
    order = np.array([3, 0, 5, 1, 4, 2])
    moved = np.asarray(run(q[order], k[order], v[order], positions[order], key_mask[order]))
    np.testing.assert_array_equal(moved, base[order])
    k2, v2, p2 = k.copy(), v.copy(), positions.copy()
    k2[1:], v2[1:] = rng.standard_normal(k2[1:].shape), rng.standard_normal(v2[1:].shape)
    p2[1:] = rng.integers(0, 640, size=(5, 1))
    n = positions[0, 0] + 1
    k2[0, :, :, n:], v2[0, :, n:] = np.nan, np.nan  # row 0's keys past its position
    np.testing.assert_array_equal(np.asarray(run(q, k2, v2, p2, key_mask))[0], base[0])


def test_a_query_that_sees_nothing_gives_zero():
    rng = np.random.default_rng(1)
    q, k, v, positions, key_mask = inputs(rng, 2, 1, 2, 1, 16, 64)
    positions[:] = -1
    assert not np.asarray(kernel(q, k, v, positions, key_mask)).any()


def test_without_a_compiler_the_kernel_is_off_and_says_why(monkeypatch, caplog):
    saved = dict(cpu_attention._state)
    try:
        cpu_attention._state.clear()
        monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
        with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
            assert not cpu_attention.available()
        assert "no C++ compiler found" in caplog.text
        cpu_attention._state.clear()
        monkeypatch.setenv("JAXRAST_CPU_KERNEL", "0")
        assert not cpu_attention.available()
    finally:
        cpu_attention._state.clear()
        cpu_attention._state.update(saved)
