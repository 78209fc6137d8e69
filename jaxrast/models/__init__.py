"""Decoder-only transformer models (Qwen2, Llama) in Flax NNX."""

from jaxrast.models.config import ModelConfig
from jaxrast.models.decoder import CausalLM, KVCache

__all__ = ["CausalLM", "KVCache", "ModelConfig"]
