"""How a decode is scheduled on the host: prompt-width buckets, the KV caches' growth
segments, and concurrent programs on one CPU device. Pure Python/numpy plus one tiny jitted
pad; used by `jaxrast.rast.decoding`."""

from __future__ import annotations

import collections
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh


def segment_ends(max_new_tokens: int, segments: int, min_tokens: int = 32) -> list[int]:
    """Where the decode loop's cache segments end: about `segments` equal steps of at
    least `min_tokens` tokens (rounded up to 16), the last ending at max_new_tokens."""
    size = max(min_tokens, -(-max_new_tokens // max(segments, 1)))
    size = -(-size // 16) * 16
    return list(range(size, max_new_tokens, size)) + [max_new_tokens]


@functools.partial(jax.jit, static_argnames=("axis", "size"))
def pad_to(x: jax.Array, *, axis: int, size: int) -> jax.Array:
    """`x` zero-padded at the end of `axis` to `size` entries."""
    return jnp.pad(x, [(0, size - n if a == axis else 0) for a, n in enumerate(x.shape)])


def grow_in_place(arrays: list, axes: list[int], size: int) -> None:
    """Pads each array along its axis (-1: leave it) to `size` slots, replacing the list
    entries one by one: each old array is freed once its copy exists, so growing the caches
    needs one layer's array of extra memory, not a second set of caches."""
    for i, axis in enumerate(axes):
        if axis >= 0 and arrays[i].shape[axis] < size:
            arrays[i] = pad_to(arrays[i], axis=axis, size=size)


def in_order(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """fn over items on `workers` threads, at most `workers` calls in flight (each holds its
    KV caches), results in the items' order."""
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) == workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_workers(batch_size: int, mesh: Mesh | None) -> int:
    """Concurrent decode programs per batch: 2 on one multi-core CPU device in a single
    process (XLA:CPU runs a small decode step on about one core), else 1."""
    cpus = os.cpu_count() or 1
    one_device = mesh is None or mesh.devices.size == 1
    if one_device and jax.default_backend() == "cpu" and jax.process_count() == 1 and cpus > 1:
        return 2 if batch_size % 2 == 0 else 1
    return 1


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt lengths are padded to a power of two so a benchmark compiles a handful of times."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))
