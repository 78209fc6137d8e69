"""The KV cache of one model: keys and values of every layer, in rows (one per sequence) or
in pages (a pool of fixed-size blocks of positions that a page table maps each row onto)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxrast.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `max_len` positions per row.

    k:     one array per layer, [batch, kv_heads, head_dim, max_len] (keys transposed)
    v:     one array per layer, [batch, kv_heads, max_len, head_dim]
           (separate arrays per layer so each step updates them in place, no stacking copy)
    mask:  [batch, max_len] bool, True where the position holds a real (non-pad) token
    index: the next position to write: [] int32 when every row writes at the same
           position (a static batch, left-padded), or [batch] int32, one per row (the
           engine's slots, each at its own length)
    pages: None (k and v hold rows), or the page table [batch, max_len / page_size] int32 of a
           paged cache: k and v are then pools [pages, kv_heads, head_dim, page_size] and
           [pages, kv_heads, page_size, head_dim], position p of row r lives in page
           pages[r, p // page_size] at p % page_size, and an entry >= the pool's size (a
           position with no page yet) is never written
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    pages: jax.Array | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, *, per_row: bool = False,
             mask: bool = False) -> "KVCache":
        """Zeros; `per_row`: one write index per row; `mask`: the initial mask value."""
        k_shape = (batch, cfg.num_key_value_heads, cfg.head_dim, max_len)
        v_shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        return cls(
            k=tuple(jnp.zeros(k_shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
            mask=jnp.full((batch, max_len), mask, bool),
            index=jnp.zeros((batch,) if per_row else (), jnp.int32),
        )

    @classmethod
    def paged(cls, cfg: ModelConfig, slots: int, max_len: int, page_size: int, num_pages: int,
              dtype=jnp.float32) -> "KVCache":
        """A paged cache of `num_pages` zero pages of `page_size` positions for `slots` rows of
        `max_len` (a multiple of `page_size`) positions; every table entry is `num_pages`
        (no page yet), every mask position True."""
        if max_len % page_size:
            raise ValueError(f"a paged cache's rows ({max_len} positions) must be whole pages of {page_size}.")
        kv, d, layers = cfg.num_key_value_heads, cfg.head_dim, range(cfg.num_hidden_layers)
        return cls(k=tuple(jnp.zeros((num_pages, kv, d, page_size), dtype) for _ in layers),
                   v=tuple(jnp.zeros((num_pages, kv, page_size, d), dtype) for _ in layers),
                   mask=jnp.ones((slots, max_len), bool), index=jnp.zeros((slots,), jnp.int32),
                   pages=jnp.full((slots, max_len // page_size), num_pages, jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def time_axes(self) -> "KVCache":
        """The same structure holding each array's position axis (-1: none), for code that
        resizes caches array by array (the benchmarks' static baseline grows them)."""
        return KVCache(k=(3,) * len(self.k), v=(2,) * len(self.v), mask=1, index=-1,
                       pages=None if self.pages is None else -1)


def write(cache: jax.Array, new: jax.Array, index: jax.Array, axis: int, pages: jax.Array | None = None
          ) -> jax.Array:
    """`new` [b, ..., t, ...] written into `cache` along `axis` at `index`: one position for
    all rows ([] index, a dynamic slice) or each row at its own ([b] index, one scatter into
    the cache's first b rows: an engine step over the low slots of a larger cache, see
    `rast.engine`; or, with a page table `pages` [b, n], into the pool's pages, see `KVCache`).
    A write past the cache's end, or onto a position with no page, is dropped, never shifted
    onto earlier positions."""
    new = new.astype(cache.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=axis)
    positions = index[:, None] + jnp.arange(new.shape[axis])  # [b, t]
    if pages is None:
        rows = jnp.arange(new.shape[0])[:, None]
    else:
        size = cache.shape[axis]
        past = positions >= pages.shape[1] * size
        rows = jnp.take_along_axis(pages, jnp.minimum(positions // size, pages.shape[1] - 1), axis=1)
        rows = jnp.where(past, cache.shape[0], rows)  # dropped
        positions = positions % size
    at = [slice(None)] * cache.ndim
    at[0], at[axis] = rows, positions
    # the two indexed axes come first in the scattered value: [b, t, ...]
    return cache.at[tuple(at)].set(jnp.moveaxis(new, axis, 1), mode="drop")


def write_row(pool: jax.Array, row: jax.Array, axis: int, table: jax.Array, copies: jax.Array, last: jax.Array
              ) -> jax.Array:
    """One row's keys or values `row` (its positions along `axis`, whole pages of the pool's
    page size) written to the pool's pages `table` [n], and its page `last` also to the
    pages `copies` [c] (a sharer's own copy of a prompt's last page); entries past the pool
    are dropped. The pool is [pages, ...] with a page's positions where the row's were."""
    size = pool.shape[axis + 1]
    shape = row.shape
    pages = jnp.moveaxis(row.reshape(*shape[:axis], shape[axis] // size, size, *shape[axis + 1:]), axis, 0)
    pool = pool.at[table].set(pages, mode="drop")
    page = jax.lax.dynamic_index_in_dim(pages, last, keepdims=True)
    return pool.at[copies].set(jnp.broadcast_to(page, (copies.shape[0], *page.shape[1:])), mode="drop")
