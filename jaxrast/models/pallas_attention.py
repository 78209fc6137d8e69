"""Decode attention through the Pallas kernels JAX ships for accelerators, on the engine's
page pools (`kv_cache.KVCache.paged`).

- GPU: `jax.experimental.pallas.ops.gpu.paged_attention` (one query per row, grouped KV
  heads, soft-capped scores). Its pages are [kv_heads, pages, page_size, head_dim]; the
  engine's pools keep keys transposed for the CPU kernel, so this adapter transposes them
  per call (an engine built for this kernel would store its layout instead).
- TPU: `jax.experimental.pallas.ops.tpu.ragged_paged_attention` is the kernel for mixed
  prefill and decode; JAX 0.10.2's TPU interpreter cannot run it on CPU (reshaped VMEM refs),
  so it is not wired here yet: a TPU engine reads pages through XLA's ragged blocks.

`interpret=True` runs a kernel in Pallas's interpreter: how the tests exercise it on CPU
(exact, and slow: ~1 s a call). Shapes as `models.attention_backend`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrast.models.attention import LayerAttention


def gpu_paged_decode(q, k, v, pages, bounds, layer: LayerAttention, *, interpret: bool = False):
    """Attention of one query per row, q [b, kv, g, 1, d], over keys below bounds [b] in the
    pools k [P, kv, d, page], v [P, kv, page, d] through the rows' page table pages [b, n].
    A row of bound 0 (a free slot) reads one key: its output is never used."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    b, kv, g, _, d = q.shape
    # the kernel does not scale scores: the query comes scaled
    queries = (q[:, :, :, 0, :].astype(jnp.float32) / layer.divisor).astype(q.dtype).reshape(b, kv * g, d)
    out = paged_attention(queries, k.transpose(1, 0, 3, 2), v.transpose(1, 0, 2, 3), jnp.minimum(pages, k.shape[0] - 1),
                          jnp.maximum(bounds, 1).astype(jnp.int32), block_h=16, pages_per_compute_block=1,
                          k_splits=1, interpret=interpret, attn_logits_soft_cap=layer.softcap)
    return out.reshape(b, kv, g, 1, d).astype(v.dtype)


def takes(q, pages, layer: LayerAttention) -> bool:
    """Whether `gpu_paged_decode` computes this call: a paged cache, one query per row, no
    sliding window (the kernel has none)."""
    return pages is not None and q.shape[3] == 1 and layer.window is None



