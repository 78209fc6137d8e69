"""jaxrast: RAST (Reasoning Activation via Small-model Transfer) in JAX / Flax NNX."""

__version__ = "0.1.0"
