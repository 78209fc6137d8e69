"""jaxrast: RAST (Reasoning Activation via Small-model Transfer) in JAX / Flax NNX.

The public API is imported lazily so `import jaxrast` (and the CLI's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "jaxrast.checkpoints",
    "save_hf": "jaxrast.checkpoints",
    "make_mesh": "jaxrast.sharding",
    "shard_model": "jaxrast.sharding",
    "ModelConfig": "jaxrast.models.config",
    "CausalLM": "jaxrast.models.decoder",
    "KVCache": "jaxrast.models.decoder",
    "RAST": "jaxrast.decoding",
    "Pair": "jaxrast.decoding",
    "SamplingParams": "jaxrast.decoding",
    "Completion": "jaxrast.decoding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxrast' has no attribute {name!r}")
