"""Paged KV: every attention backend reads a page table into a pool of pages and equals the
dense reference over the same keys laid out in rows, on ragged lengths, empty slots and
pages in shuffled order; writes through a page table land where reads find them."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrast.models.attention import LayerAttention, dense_attention, visible
from jaxrast.models.attention_backend import KINDS, AttentionBackend
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.models.kv_cache import write


def paged_layout(rng, k, v, page):
    """The rows k [b, kv, d, s], v [b, kv, s, d] cut into pages of `page` positions and put
    in a pool in shuffled order, with spare pages of noise: (pool k, pool v, table [b, s / page])."""
    b, kv, d, s = k.shape
    n = s // page
    spare = 3
    order = rng.permutation(b * n + spare)
    pool_k = rng.standard_normal((b * n + spare, kv, d, page), np.float32)
    pool_v = rng.standard_normal((b * n + spare, kv, page, d), np.float32)
    table = order[:b * n].reshape(b, n).astype(np.int32)
    for r in range(b):
        for j in range(n):
            pool_k[table[r, j]] = k[r, :, :, j * page:(j + 1) * page]
            pool_v[table[r, j]] = v[r, :, j * page:(j + 1) * page, :]
    return pool_k, pool_v, table


def case(seed, *, b=5, kv=2, g=2, t=1, d=16, s=256, window=None, softcap=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, kv, g, t, d), np.float32)
    k = rng.standard_normal((b, kv, d, s), np.float32)
    v = rng.standard_normal((b, kv, s, d), np.float32)
    lengths = np.array([1, 37, 0, s - t, 130][:b], np.int32)  # row 2 is an empty slot
    positions = (lengths[:, None] + np.arange(t)).astype(np.int32)
    bounds = np.where(lengths > 0, lengths + t, 0).astype(np.int32)
    key_mask = np.ones((b, s), bool)
    layer = LayerAttention(math.sqrt(d), window=window, softcap=softcap)
    return rng, q, k, v, positions, key_mask, bounds, layer


def reference(q, k, v, positions, key_mask, layer):
    return np.asarray(dense_attention(q, k, v, visible(positions, key_mask, layer.window), layer))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page,t,window,softcap", [(16, 1, None, None), (64, 3, None, None), (32, 1, 40, None),
                                                   (256, 2, None, None), (32, 1, None, 20.0)])
def test_every_backend_reads_pages_like_dense_rows(kind, page, t, window, softcap):
    if kind == "cpu_kernel" and not cpu_kernel_available():
        pytest.skip("no C++ compiler: the CPU kernel is not built")
    rng, q, k, v, positions, key_mask, bounds, layer = case(page + t, t=t, window=window, softcap=softcap)
    pool_k, pool_v, table = paged_layout(rng, k, v, page)
    backend = AttentionBackend(kind, interpret=kind.startswith("pallas"))  # Pallas kernels: interpreted on CPU
    run = jax.jit(functools.partial(backend, layer=layer))
    got = np.asarray(run(q, pool_k, pool_v, table, positions, key_mask, bounds))
    want = reference(q, k, v, positions, key_mask, layer)
    live = bounds > 0  # an empty slot's output is whatever its backend gives: never read
    np.testing.assert_allclose(got[live], want[live], atol=1e-5, rtol=0)
    rows = np.asarray(run(q, k, v, None, positions, key_mask, bounds))  # the same backend on rows
    np.testing.assert_allclose(got[live], rows[live], atol=1e-5, rtol=0)


def test_writes_through_a_page_table_land_in_the_rows_pages_and_past_the_table_are_dropped():
    rng = np.random.default_rng(0)
    page, pages = 8, 6
    pool = jnp.zeros((pages, 1, 2, page), jnp.float32)  # [P, kv, d, page] (keys)
    table = jnp.asarray([[4, 1, pages], [0, 5, 2]], jnp.int32)  # row 0 has no third page yet
    new = jnp.asarray(rng.standard_normal((2, 1, 2, 3)), jnp.float32)  # 3 positions a row
    index = jnp.asarray([14, 7], jnp.int32)  # row 0: 14, 15 in page 1, 16 has no page; row 1: 7 | 8, 9
    out = np.asarray(write(pool, new, index, 3, table))
    np.testing.assert_array_equal(out[1, :, :, 6:8], new[0, :, :, :2])
    np.testing.assert_array_equal(out[0, :, :, 7], new[1, :, :, 0])
    np.testing.assert_array_equal(out[5, :, :, 0:2], new[1, :, :, 1:3])
    assert np.count_nonzero(out) == np.count_nonzero(new) - np.count_nonzero(new[0, :, :, 2])
