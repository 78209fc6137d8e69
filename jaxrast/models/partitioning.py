"""The one table of partition rules for parameters, KV caches and batches over the mesh
axes of `jaxrast.runtime.mesh`. Kernels are stored `[in, out]`: column-parallel
layers (q/k/v, gate/up, lm_head) split `out` over `tensor` and `in` over `fsdp`,
row-parallel ones (o, down) the reverse, so a block needs one reduction per matmul pair.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrast.models.kv_cache import KVCache
from jaxrast.runtime.mesh import BATCH

# (regex over the dotted parameter path, spec). First match wins; every parameter must match.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),
    (r"self_attn\.(q_proj|k_proj|v_proj)\.kernel$", P("fsdp", "tensor")),
    (r"self_attn\.(q_proj|k_proj|v_proj)\.bias$", P("tensor")),
    (r"self_attn\.o_proj\.kernel$", P("tensor", "fsdp")),
    (r"self_attn\.o_proj\.bias$", P()),
    (r"mlp\.(gate_proj|up_proj)\.kernel$", P("fsdp", "tensor")),
    (r"mlp\.(gate_proj|up_proj)\.bias$", P("tensor")),
    (r"mlp\.down_proj\.kernel$", P("tensor", "fsdp")),
    (r"mlp\.down_proj\.bias$", P()),
    # norm scales are tiny; q_norm/k_norm's [head_dim] is never split (tensor splits heads)
    (r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm|"
     r"self_attn\.q_norm|self_attn\.k_norm|norm)\.weight$", P()),
    (r"lm_head\.kernel$", P("fsdp", "tensor")),
)
KV_CACHE_SPEC = P(BATCH, "tensor", None, None)  # k [batch, kv_heads, d, len], v [batch, kv_heads, len, d]
CACHE_MASK_SPEC = P(BATCH, None)  # [batch, max_len]
TOKENS_SPEC = P(BATCH, None)  # [batch, time]




def path_str(path: Sequence[Any]) -> str:
    """('layers', 0, 'mlp', 'up_proj', 'kernel') -> 'layers.0.mlp.up_proj.kernel'.

    Accepts plain tuples (flat NNX states) and jax key paths; the Variable's own `.value`
    attribute key is skipped.
    """
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(getattr(p, "key", getattr(p, "idx", p))))
    return ".".join(parts)


def rule_for(path: str, default: P | None = None) -> P:
    """The partition spec the rule table assigns to parameter `path` (its first matching
    rule); `default` for a path no rule covers (None: every path must match)."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            return spec
    if default is not None:
        return default
    raise ValueError(f"no partition rule matches parameter {path!r}; add one to "
                     "jaxrast.models.partitioning.PARAM_RULES.")


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh | Mapping[str, int], name: str = "",
             warn: bool = True) -> P:
    """Drops mesh axes from dimensions they do not divide evenly (replicating them instead).

    `mesh` may be a Mesh or just its axis sizes ({"data": 1, "fsdp": 8, "tensor": 1}), so
    memory planning applies the same rules without devices.
    """
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    out = []
    for dim, kept in _dim_axes(spec, shape):
        size = int(np.prod([sizes[a] for a in kept])) if kept else 1
        if size > 1 and dim % size:
            if warn:
                warnings.warn(f"{name or 'array'}: dimension {dim} is not divisible by mesh axes {kept} "
                              f"(size {size}); replicating it instead.", stacklevel=3)
            kept = ()
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def shard_shape(spec: P, shape: Sequence[int], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` laid out by `spec` (after `fit_spec`)."""
    fitted = fit_spec(spec, shape, sizes, warn=False)
    return tuple(dim // int(np.prod([sizes[a] for a in names])) if names else dim
                 for dim, names in _dim_axes(fitted, shape))


def _dim_axes(spec: P, shape: Sequence[int]) -> list[tuple[int, tuple[str, ...]]]:
    """(dimension, mesh axes it is split over) for each dimension of an array of `shape`."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return [(dim, () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes))
            for dim, axes in zip(shape, entries)]


def named(mesh: Mesh, spec: P, shape: Sequence[int], name: str = "") -> NamedSharding:
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, name))


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A state of `NamedSharding`s matching `state` (concrete or abstract params) via the rule table."""
    def one(path, leaf):
        name = path_str(path)
        return named(mesh, rule_for(name), leaf.shape, name)
    return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every parameter of `model` onto its NamedSharding (in place); returns the model."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def cache_sharding(mesh: Mesh, cache: Any) -> Any:
    """Shardings for a `KVCache` pytree: k/v (rows, or a paged cache's pages) split over
    batch and kv heads."""
    return KVCache(
        k=tuple(named(mesh, KV_CACHE_SPEC, a.shape, "kv cache") for a in cache.k),
        v=tuple(named(mesh, KV_CACHE_SPEC, a.shape, "kv cache") for a in cache.v),
        mask=named(mesh, CACHE_MASK_SPEC, cache.mask.shape, "cache mask"),
        index=NamedSharding(mesh, P()),
        pages=None if cache.pages is None else named(mesh, CACHE_MASK_SPEC, cache.pages.shape, "page table"),
    )


