"""Decoder-only transformer models (Qwen2, Llama) in Flax NNX."""

from jaxrast.models.config import ModelConfig
from jaxrast.models.kv_cache import KVCache
from jaxrast.models.transformer import CausalLM

__all__ = ["CausalLM", "KVCache", "ModelConfig"]
