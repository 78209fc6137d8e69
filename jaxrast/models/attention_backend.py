"""The attention backend of cached forwards: one object, chosen once per engine from the
platform and the cache layout, that every layer of every model calls.

- `dense`: tests, and short caches (< `RAGGED_FROM` positions) without a kernel; reads the
  whole slot: the definition the others equal.
- `cpu_kernel`: CPU, float32 (`models.cpu_attention`, C++ through `jax.ffi`); reads exactly
  each query's visible keys.
- `xla_ragged`: long caches without a kernel (`models.attention.ragged_attention`); reads
  each row's own key blocks.

On a mesh the chosen backend runs per device under `shard_map`, over the cache's own split
(slots over the batch axes, KV heads over `tensor`): attention never mixes rows or KV heads,
so each device reads only its own rows' keys, exactly as on one device. The paged-KV work
adds its kernels (Pallas ragged paged attention on TPU, paged / decode attention on GPU)
here. Shapes: q [b, kv, g, t, d], k [B, kv, d, s], v [B, kv, s, d] (B >= b: query row r
reads cache row r), query positions [b, t], key mask [b, s], bounds [b] (attention reads no
key at or past a row's bound). Each call also gets the calling layer's `LayerAttention`
(static): its score scale, soft-cap and sliding window, which every kind applies exactly as
`dense` does.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrast.models.attention import (
    RAGGED_FROM,
    LayerAttention,
    dense_attention,
    gather_pages,
    ragged_attention,
    visible,
)
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.models.cpu_attention import decode_attention
from jaxrast.models.pallas_attention import gpu_paged_decode
from jaxrast.models.pallas_attention import takes as pallas_takes
from jaxrast.models.partitioning import fit_spec
from jaxrast.runtime.mesh import BATCH

log = logging.getLogger(__name__)

KINDS = ("dense", "cpu_kernel", "xla_ragged", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """`kind` (one of `KINDS`) on one device, or per device of `mesh`; `interpret`: a Pallas
    kind runs in Pallas's interpreter (CPU tests)."""

    kind: str = "dense"
    mesh: Mesh | None = None
    interpret: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attention backend {self.kind!r}: choose one of {', '.join(KINDS)}.")
        if self.kind == "cpu_kernel" and not cpu_kernel_available():
            raise ValueError("the cpu_kernel attention backend needs the C++ kernel (a C++ compiler, and "
                             "JAXRAST_CPU_KERNEL not 0); use 'xla_ragged' or 'dense'.")

    @property
    def name(self) -> str:
        """How logs and /metrics call it: the kind, and where a mesh runs it."""
        return self.kind if self.mesh is None else f"{self.kind} per device of {self.mesh.devices.size}"

    def __call__(self, q, k, v, pages, query_positions, key_mask, bounds, layer: LayerAttention):
        """pages: None (k and v hold rows) or the rows' page table [b, n] into the pools k
        and v (`kv_cache.KVCache`)."""
        if self.mesh is None or self.mesh.devices.size == 1:
            return _attend(self, layer, q, k, v, pages, query_positions, key_mask, bounds)
        mesh = self.mesh
        specs = [fit_spec(P(BATCH, "tensor"), q.shape, mesh, warn=False),
                 fit_spec(P(BATCH, "tensor"), k.shape, mesh, warn=False),
                 fit_spec(P(BATCH, "tensor"), v.shape, mesh, warn=False)]
        rows, heads = specs[0][0], specs[0][1]
        # q, k and v must agree on how rows (pages) and heads split, or a device would see
        # another's keys; a row's pages are on its own device (`rast.pages.PagePool`)
        specs = [P(rows, heads)] * 3 + [P(rows)] * 4
        paged = pages is not None

        def local(q, k, v, pages, query_positions, key_mask, bounds):
            if paged and rows is not None:  # global page ids -> this device's pool
                pages = pages - jax.lax.axis_index(rows) * k.shape[0]
            return _attend(self, layer, q, k, v, pages if paged else None, query_positions, key_mask, bounds)

        run = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(rows, heads), check_vma=False)
        table = pages if paged else jnp.zeros((q.shape[0], 1), jnp.int32)
        return run(q, k, v, table, query_positions, key_mask, bounds)


def _attend(backend: AttentionBackend, layer: LayerAttention, q, k, v, pages, query_positions, key_mask, bounds):
    # k and v may hold more rows than q (a step over an engine's low slots): query row r reads
    # cache row r (or its pages); the kernels index rows, the dense reference reads the first rows
    kind = backend.kind
    if kind == "pallas_gpu":  # decode steps through the kernel, the rest (prefill, verification) ragged
        if pallas_takes(q, pages, layer):
            return gpu_paged_decode(q, k, v, pages, bounds, layer, interpret=backend.interpret)
        kind = "xla_ragged"
    if kind == "cpu_kernel":
        return decode_attention(q, k, v, query_positions, key_mask, layer, pages).astype(v.dtype)
    allowed = visible(query_positions, key_mask, layer.window)  # [b, t, s]
    if kind == "xla_ragged":
        return ragged_attention(q, k, v, allowed, bounds, layer, query_positions, pages)
    if pages is not None:
        k, v = gather_pages(k, v, pages)
    return dense_attention(q, k[:q.shape[0]], v[:q.shape[0]], allowed, layer)


def choose(*, platform: str, mesh: Mesh | None, dtypes, head_dims, cache_len: int) -> AttentionBackend:
    """The backend for an engine's caches: the CPU kernel where it takes the shapes (float32,
    head size and cache length multiples of 8), else XLA's ragged kernel for caches of at least
    `RAGGED_FROM` positions, else dense attention (a short cache is cheaper read whole)."""
    fits = (all(d == jnp.float32 for d in dtypes) and all(h % 8 == 0 for h in head_dims) and cache_len % 8 == 0)
    if platform == "cpu" and fits and cpu_kernel_available():
        kind = "cpu_kernel"
    elif cache_len >= RAGGED_FROM:
        kind = "xla_ragged"
    else:
        kind = "dense"
    backend = AttentionBackend(kind, mesh if mesh is not None and mesh.devices.size > 1 else None)
    log.info("attention backend: %s", backend.name)
    return backend
