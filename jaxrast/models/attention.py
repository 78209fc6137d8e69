"""Decode-time attention over a long KV cache, reading only the blocks of keys a row needs.

The engine's slots hold `max_len` positions (1,152 for 1,024-token budgets) while most
live rows are far shorter. Two exact kernels, both built from online-softmax pieces:

- `blocked_attention(q, k, v, allowed, kv_len)`: one bound [] for every row; block i of
  every row at step i. A row's cost is the longest row's.
- `ragged_attention(q, k, v, allowed, bounds)`: one bound per row [b]; the (row, block)
  pairs the rows need are laid end to end and computed `b` pairs at a time, so a step
  costs the rows' summed lengths, not b times the longest: 8 rows at 1000, 100, 60, 200,
  80, 120, 50 and 90 positions read 15 blocks instead of 64, and a random 10M base's
  decode step took 6.9 ms instead of 11.8 (CPU).

Shapes: q [b, kv, g, t, d], k [b, kv, d, s], v [b, kv, s, d], allowed [b, t, s].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# A finite "minus infinity" for masked attention scores: a fully masked row (a left-pad
# query) then gives a harmless uniform average instead of NaN.
MASKED = -1e30
# Keys per block when a decode call reads only the cache positions below a bound: reading
# the whole 1088-position cache every step cost the long-tail benchmark ~2x its tokens/s
# on CPU (630 -> 913 tok/s with blocks, random 10M/1M models). The block loop has a fixed
# cost per layer that halved the toy family's tokens/s (256 positions: 12.6K -> 6.6K), so
# short caches are read whole.
KV_BLOCK = 128
BLOCKED_FROM = 4 * KV_BLOCK


def cache_length(max_len: int) -> int:
    """Positions a cache of `max_len` usable positions holds: a cache long enough for
    blocked attention is rounded up to whole `KV_BLOCK`s. Blocks must tile the cache, and
    1088 positions (a 32-token prompt + 1024 budget) fell back to 64-key blocks, twice the
    loop iterations: 17.2 -> 11.1 ms a decode step at 1024 live positions (random 10M base,
    8 slots, CPU) for 6% more cache."""
    return -(-max_len // KV_BLOCK) * KV_BLOCK if max_len >= BLOCKED_FROM else max_len


def _block_size(s: int) -> int:
    return next((n for n in (KV_BLOCK, 64, 32) if s % n == 0), s)  # slices must tile the cache


def _partial(q, kb, vb, seen):
    """Softmax pieces of one block of keys: (max, sum of weights, weighted values) per
    query, with q [b, kv, g, t, d], kb [b, kv, d, n], vb [b, kv, n, d], seen [b, t, n]."""
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, kb, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(seen[:, None, None], scores, MASKED)
    top = jnp.max(scores, axis=-1)
    weights = jnp.exp(scores - top[..., None])
    pv = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return top, jnp.sum(weights, axis=-1), pv


def blocked_attention(q, k, v, allowed, kv_len):
    """Softmax attention over the cache's first ceil(kv_len / block) blocks of keys, one
    block at a time with a running max and sum (online softmax). A block a row may not see
    adds exactly nothing (its weights underflow to 0 and the running sums are scaled by 1),
    so a row's output does not depend on the bound, i.e. on how long its neighbours are."""
    s = v.shape[2]
    block = _block_size(s)
    blocks = jnp.clip((kv_len + block - 1) // block, 1, s // block)

    def body(i, carry):
        top, total, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(k, i * block, block, axis=3)
        vb = jax.lax.dynamic_slice_in_dim(v, i * block, block, axis=2)
        seen = jax.lax.dynamic_slice_in_dim(allowed, i * block, block, axis=2)
        b_top, b_total, b_acc = _partial(q, kb, vb, seen)
        new_top = jnp.maximum(top, b_top)
        old, new = jnp.exp(top - new_top), jnp.exp(b_top - new_top)
        return new_top, total * old + b_total * new, acc * old[..., None] + b_acc * new[..., None]

    shape = q.shape[:-1]
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, blocks, body, init)
    return (acc / total[..., None]).astype(v.dtype)


def ragged_attention(q, k, v, allowed, bounds):
    """Softmax attention of row r over the cache's first ceil(bounds[r] / block) blocks
    (none for a bound of 0: the row's output is 0). The rows' (row, block) pairs are
    numbered end to end and computed b at a time (gathered blocks, one batched product
    each); each pair's softmax pieces land in a [b, blocks] table reduced over blocks in a
    fixed order. A row's result is a function of its own blocks only: bit for bit the same
    whatever its neighbours' bounds, its slot, or where its pairs fell in the loop (a block
    a row does not need adds an exact 0).

    Measured on the long-tail benchmark (random 10M/1M models, tok/s, one process): the
    pair plan made once per call and one table (acc, max and sum side by side) instead of
    index arithmetic and three tables per iteration, 1,590-1,610 vs 1,520-1,530; reading
    every row's first block as one product outside the loop, 1,250-1,430 vs 1,370-1,580,
    and a lax.cond skipping the table when every row fits one block was slower still; the
    blocked kernel gave 1,080-1,100."""
    b, s, d = q.shape[0], v.shape[2], q.shape[-1]
    block = _block_size(s)
    blocks = s // block
    # a bound of 0 (a free slot) reads no block and gives 0: a group of 8 slots with 2 rows
    # left reads their blocks, not 6 blocks more for the free slots as well
    need = jnp.clip((bounds + block - 1) // block, 0, blocks).astype(jnp.int32)  # [b]
    ends = jnp.cumsum(need)
    # the plan: pair p (iteration p // b, lane p % b) is block `at` of row `row`; b pairs an
    # iteration (2b or 4b were no faster on CPU); past the last pair, `dest` drops it
    pair = jnp.arange(blocks * b, dtype=jnp.int32)
    row = jnp.minimum(jnp.sum(ends[None, :] <= pair[:, None], axis=1), b - 1).astype(jnp.int32)
    at = jnp.clip(pair - (ends - need)[row], 0, blocks - 1)
    dest = jnp.where(pair < ends[-1], row, b)
    row, at, dest = (x.reshape(blocks, b) for x in (row, at, dest))

    def take(x, r, j, axis):  # block j of row r along `axis` (x[r] would copy the whole row)
        start = [r if a == 0 else j * block if a == axis else 0 for a in range(x.ndim)]
        size = [1 if a == 0 else block if a == axis else n for a, n in enumerate(x.shape)]
        return jax.lax.dynamic_slice(x, start, size)[0]

    def body(i, table):
        rows, ats = row[i], at[i]
        kb = jax.vmap(lambda r, j: take(k, r, j, 3))(rows, ats)
        vb = jax.vmap(lambda r, j: take(v, r, j, 2))(rows, ats)
        seen = jax.vmap(lambda r, j: take(allowed, r, j, 2))(rows, ats)
        top, total, acc = _partial(q[rows], kb, vb, seen)
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
    # a product over the blocks axis: as a multiply-and-sum XLA:CPU took 250 us here for
    # 8 rows x 9 blocks x 320 values (18 us as a product), more than the whole pair loop
    acc = jnp.einsum("bjkgtd,bjkgt->bkgtd", accs, scale, preferred_element_type=jnp.float32)
    return (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(v.dtype)
