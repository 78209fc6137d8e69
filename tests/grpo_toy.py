"""A toy verifiable task for GRPO tests: a tiny random policy is rewarded for writing 'a'."""

from __future__ import annotations

import random

import jax.numpy as jnp
from flax import nnx

from jaxrast.models.config import ModelConfig
from jaxrast.models.transformer import CausalLM
from jaxrast.toy.tokenizer import char_tokenizer

CHARS = "abcdefgh"
MAX_NEW = 8


def a_reward(prompts, completions, **_):
    """Fraction of the MAX_NEW completion slots that hold an 'a' (dense, in [0, 1])."""
    return [c.count("a") / MAX_NEW for c in completions]


def toy_rows(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": str(i), "question": "".join(rng.choice(CHARS[1:]) for _ in range(rng.randint(2, 6))),
             "answer": "a"} for i in range(n)]


def toy_policy(seed: int = 0, hidden: int = 32, layers: int = 1, dtype=jnp.float32):
    """(CausalLM, tokenizer): a randomly initialised 1-layer qwen2 over 11 char tokens."""
    tok = char_tokenizer(CHARS)
    cfg = ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      attention_bias=True, eos_token_id=(tok.eos_token_id,))
    return CausalLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)), tok
