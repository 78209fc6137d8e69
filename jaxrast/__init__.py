"""jaxrast: RAST (Reasoning Activation via Small-model Transfer) in JAX / Flax NNX.

The public API is imported lazily so `import jaxrast` (and the CLI's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "jaxrast.models.hf",
    "save_hf": "jaxrast.models.hf",
    "make_mesh": "jaxrast.runtime.mesh",
    "shard_model": "jaxrast.models.partitioning",
    "ModelConfig": "jaxrast.models.config",
    "CausalLM": "jaxrast.models.transformer",
    "KVCache": "jaxrast.models.kv_cache",
    "RAST": "jaxrast.rast.decoding",
    "Pair": "jaxrast.rast.ensemble",
    "SamplingParams": "jaxrast.rast.params",
    "Completion": "jaxrast.rast.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxrast' has no attribute {name!r}")
