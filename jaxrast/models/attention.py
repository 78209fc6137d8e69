"""Attention over a KV cache in XLA's ops: `dense_attention` reads every key (the reference),
`ragged_attention` only each row's own blocks of keys, so a step costs the rows' summed
lengths rather than the slot count times the longest (`models.attention_backend` chooses).

Shapes: q [b, kv, g, t, d], k [b, kv, d, s], v [b, kv, s, d], allowed [b, t, s].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# A finite "minus infinity" for masked attention scores: a fully masked row (a left-pad
# query) then gives a harmless uniform average instead of NaN.
MASKED = -1e30
# Keys per block of the ragged kernel. Its block loop has a fixed cost per layer that
# halved the toy family's decode speed at 256 positions, so shorter caches are read whole.
KV_BLOCK = 128
RAGGED_FROM = 4 * KV_BLOCK


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """What one decoder layer's attention computes, fixed when the model is built (static
    under jit): scores are q·k / `divisor` (sqrt(head_dim); Gemma: sqrt(query_pre_attn_scalar)),
    soft-capped to `softcap`·tanh(score / `softcap`) when set, and a sliding layer's query at
    cache position p sees only keys in (p - `window`, p]; None: every earlier key."""

    divisor: float
    window: int | None = None
    softcap: float | None = None


def visible(query_positions, key_mask, window: int | None = None):
    """allowed [b, t, s]: key j is visible to the query at cache position p when j <= p,
    j > p - window (a sliding layer) and key_mask[b, j]. query_positions [b, t], key_mask [b, s]."""
    keys = jnp.arange(key_mask.shape[1])
    allowed = keys <= query_positions[..., None]
    if window is not None:
        allowed &= keys > query_positions[..., None] - window
    return allowed & key_mask[:, None, :]


def scores(q, k, layer: LayerAttention):
    """Attention scores [b, kv, g, t, s] in float32, scaled and soft-capped as `layer` says."""
    out = jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=jnp.float32) / layer.divisor
    if layer.softcap is not None:
        out = jnp.tanh(out / layer.softcap) * layer.softcap
    return out


def cache_length(max_len: int) -> int:
    """Positions a cache of `max_len` usable positions holds: a cache long enough for the
    ragged kernel is rounded up to whole `KV_BLOCK`s (blocks must tile it; smaller blocks
    cost loop iterations), a shorter one to a multiple of 8 (the CPU kernel's tile)."""
    return -(-max_len // KV_BLOCK) * KV_BLOCK if max_len >= RAGGED_FROM else -(-max_len // 8) * 8


def _block_size(s: int) -> int:
    return next((n for n in (KV_BLOCK, 64, 32) if s % n == 0), s)  # slices must tile the cache


def _partial(q, kb, vb, seen, layer: LayerAttention):
    """Softmax pieces of one block of keys: (max, sum of weights, weighted values) per
    query, with q [b, kv, g, t, d], kb [b, kv, d, n], vb [b, kv, n, d], seen [b, t, n]."""
    masked = jnp.where(seen[:, None, None], scores(q, kb, layer), MASKED)
    top = jnp.max(masked, axis=-1)
    weights = jnp.exp(masked - top[..., None])
    vb = _unseen_zero(vb, seen)
    pv = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return top, jnp.sum(weights, axis=-1), pv


def _unseen_zero(v, allowed):
    """v [b, kv, s, d] with 0 at the keys no query of its row sees (allowed [b, t, s]): their
    weight is exactly 0, and 0 · x must be 0 even where a recycled page holds a non-finite x."""
    return jnp.where(jnp.any(allowed, axis=1)[:, None, :, None], v, 0)


def dense_attention(q, k, v, allowed, layer: LayerAttention):
    """Softmax attention over every key of the cache (the definition the kernels equal):
    allowed [b, t, s] says which keys each query sees (`visible`)."""
    probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores(q, k, layer), MASKED), axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, _unseen_zero(v, allowed))


def row_pages(k) -> jax.Array:
    """The page table of a cache in rows: row r is page r, of the whole row's length."""
    return jnp.arange(k.shape[0], dtype=jnp.int32)[:, None]


def gather_pages(k, v, pages):
    """Rows [b, kv, d, s] and [b, kv, s, d] of a paged cache (pools [P, kv, d, page] and
    [P, kv, page, d], table pages [b, n]; s = n · page): what dense attention reads."""
    pages = jnp.minimum(pages, k.shape[0] - 1)  # an entry with no page: any page (masked)
    kr, vr = k[pages], v[pages]  # [b, n, kv, d, page], [b, n, kv, page, d]
    b, n, kv, d, size = kr.shape
    return (kr.transpose(0, 2, 3, 1, 4).reshape(b, kv, d, n * size),
            vr.transpose(0, 2, 1, 3, 4).reshape(b, kv, n * size, d))


def ragged_attention(q, k, v, allowed, bounds, layer: LayerAttention, query_positions, pages=None):
    """Softmax attention of row r over the cache's blocks below ceil(bounds[r] / block)
    (none for a bound of 0: the row's output is 0); a sliding layer's row starts at the
    block holding its first query's first visible key (query_positions [b, t]), so a step
    reads about `window` keys a row however long it is. The rows' (row, block) pairs are
    numbered end to end and computed b at a time (gathered blocks, one batched product
    each); each pair's softmax pieces land in a [b, blocks] table reduced over blocks in a
    fixed order. A row's result is a function of its own blocks only: bit for bit the same
    whatever its neighbours' bounds, its slot, or where its pairs fell in the loop (a block
    a row does not need adds an exact 0). `pages` [b, n]: k and v are page pools and this the
    rows' page table (`kv_cache.KVCache`; blocks tile pages); None: k and v hold rows."""
    pages = row_pages(k) if pages is None else jnp.minimum(pages, k.shape[0] - 1)
    b, page, d = q.shape[0], v.shape[2], q.shape[-1]
    block = _block_size(page)
    blocks = pages.shape[1] * page // block
    # a bound of 0 (a free slot) reads no block and gives 0
    last = jnp.clip((bounds + block - 1) // block, 0, blocks).astype(jnp.int32)  # [b]
    first = jnp.zeros_like(last)
    if layer.window is not None:  # blocks wholly behind every query's window hold no visible key
        first = jnp.clip((jnp.min(query_positions, axis=1) - layer.window + 1) // block, 0, blocks).astype(jnp.int32)
    need = jnp.maximum(last - first, 0)
    ends = jnp.cumsum(need)
    # the plan: pair p (iteration p // b, lane p % b) is block `at` of row `row`; b pairs an
    # iteration (more were no faster on CPU); past the last pair, `dest` drops it
    pair = jnp.arange(blocks * b, dtype=jnp.int32)
    row = jnp.minimum(jnp.sum(ends[None, :] <= pair[:, None], axis=1), b - 1).astype(jnp.int32)
    at = jnp.clip(pair - (ends - need)[row] + first[row], 0, blocks - 1)
    dest = jnp.where(pair < ends[-1], row, b)
    row, at, dest = (x.reshape(blocks, b) for x in (row, at, dest))

    def take(x, r, at, axis):  # `block` positions of row (or page) r from `at` along `axis`
        start = [r if a == 0 else at if a == axis else 0 for a in range(x.ndim)]
        size = [1 if a == 0 else block if a == axis else n for a, n in enumerate(x.shape)]
        return jax.lax.dynamic_slice(x, start, size)[0]

    def take_keys(x, r, j, axis):  # block j of row r: in its page (x[r] would copy a whole page)
        return take(x, pages[r, j * block // page], j * block % page, axis)

    def body(i, table):
        rows, ats = row[i], at[i]
        kb = jax.vmap(lambda r, j: take_keys(k, r, j, 3))(rows, ats)
        vb = jax.vmap(lambda r, j: take_keys(v, r, j, 2))(rows, ats)
        seen = jax.vmap(lambda r, j: take(allowed, r, j * block, 2))(rows, ats)
        top, total, acc = _partial(q[rows], kb, vb, seen, layer)
        piece = jnp.concatenate([acc, top[..., None], total[..., None]], axis=-1)
        return table.at[dest[i], ats].set(piece, mode="drop")

    shape = (b, blocks, *q.shape[1:-1])  # table [b, blocks, kv, g, t, d + 2]: acc, max, sum
    table = jnp.concatenate([jnp.zeros((*shape, d), jnp.float32), jnp.full((*shape, 1), -jnp.inf, jnp.float32),
                             jnp.zeros((*shape, 1), jnp.float32)], axis=-1)
    table = jax.lax.fori_loop(0, (ends[-1] + b - 1) // b, body, table)
    accs, tops, totals = table[..., :d], table[..., d], table[..., d + 1]
    top = jnp.max(tops, axis=1, keepdims=True)
    top = jnp.where(top > -jnp.inf, top, 0.0)  # a row that read no block: every scale 0
    scale = jnp.exp(tops - top)  # 0 for blocks a row does not need
    total = jnp.sum(totals * scale, axis=1)
    # a product over the blocks axis: XLA:CPU runs a multiply-and-sum here ~14x slower
    acc = jnp.einsum("bjkgtd,bjkgt->bkgtd", accs, scale, preferred_element_type=jnp.float32)
    return (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(v.dtype)
