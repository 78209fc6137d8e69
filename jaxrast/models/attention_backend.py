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
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrast.models.attention import RAGGED_FROM, LayerAttention, dense_attention, ragged_attention, visible
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.models.cpu_attention import decode_attention
from jaxrast.models.partitioning import fit_spec
from jaxrast.runtime.mesh import BATCH

log = logging.getLogger(__name__)

KINDS = ("dense", "cpu_kernel", "xla_ragged")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """`kind` (one of `KINDS`) on one device, or per device of `mesh`."""

    kind: str = "dense"
    mesh: Mesh | None = None

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

    def __call__(self, q, k, v, query_positions, key_mask, bounds, layer: LayerAttention):
        local = functools.partial(_attend, self.kind, layer)
        if self.mesh is None or self.mesh.devices.size == 1:
            return local(q, k, v, query_positions, key_mask, bounds)
        mesh = self.mesh
        specs = [fit_spec(P(BATCH, "tensor"), q.shape, mesh, warn=False),
                 fit_spec(P(BATCH, "tensor"), k.shape, mesh, warn=False),
                 fit_spec(P(BATCH, "tensor"), v.shape, mesh, warn=False),
                 fit_spec(P(BATCH), query_positions.shape, mesh, warn=False),
                 fit_spec(P(BATCH), key_mask.shape, mesh, warn=False),
                 fit_spec(P(BATCH), bounds.shape, mesh, warn=False)]
        rows, heads = specs[0][0], specs[0][1]
        # q, k and v must agree on how rows and heads split, or a device would see another's keys
        specs[:3] = [P(rows, heads)] * 3
        specs[3:] = [P(rows)] * 3
        run = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(rows, heads), check_vma=False)
        return run(q, k, v, query_positions, key_mask, bounds)


def _attend(kind: str, layer: LayerAttention, q, k, v, query_positions, key_mask, bounds):
    # k and v may hold more rows than q (a step over an engine's low slots): query row r reads
    # cache row r; the kernels index rows, the dense reference reads the first rows
    if kind == "cpu_kernel":
        return decode_attention(q, k, v, query_positions, key_mask, layer).astype(v.dtype)
    allowed = visible(query_positions, key_mask, layer.window)  # [b, t, s]
    if kind == "xla_ragged":
        return ragged_attention(q, k, v, allowed, bounds, layer, query_positions)
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
