"""The decoder-only transformer (Qwen2 / Qwen3 / Llama / Gemma 3) in Flax NNX.

One forward serves every use: full-sequence scoring (training, analysis) and cached
decoding (prefill, then one token per step). Shapes: tokens `[batch, time]`, hidden
`[batch, time, hidden]`, logits `[batch, time, vocab]` (float32), KV cache
per layer: keys `[batch, kv_heads, head_dim, max_len]`, values
`[batch, kv_heads, max_len, head_dim]`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrast.models.attention import LayerAttention, dense_attention, visible
from jaxrast.models.attention_backend import AttentionBackend
from jaxrast.models.config import ModelConfig
from jaxrast.models.kv_cache import KVCache, write

_INIT = nnx.initializers.normal(stddev=0.02)


def rope_inv_freq(cfg: ModelConfig, sliding: bool = False) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]`, with linear or llama3 scaling applied; a
    `sliding` layer (Gemma 3's local attention) has its own theta and no scaling."""
    dim = cfg.head_dim
    theta = cfg.rope_local_base_freq if sliding else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = {} if sliding else dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1).
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > old_len / low, inv_freq / factor,
                            np.where(wavelen < old_len / high, inv_freq, mid))
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates `x` [batch, time, heads, head_dim] by `positions` [batch, time] (HF rotate-half layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) scaled by (offset + weight), in float32; `offset` 1 for Gemma, whose
    checkpoints store each scale minus one (its weights start at 0, the others' at 1)."""

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0, dtype, param_dtype):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))
        self.eps = eps
        self.offset = offset
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return ((self.offset + self.weight[...].astype(jnp.float32)) * x32).astype(self.dtype)


def _norm(cfg: ModelConfig, dim: int, dtype, param_dtype) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype, param_dtype=param_dtype)


def _linear(cfg_in: int, cfg_out: int, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(cfg_in, cfg_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_INIT, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        window = cfg.layer_window(layer)
        self.sliding = window is not None
        # how this layer scores and which keys it sees: the same for every backend
        self.layer_attention = LayerAttention(cfg.attention_divisor, window, cfg.attn_logit_softcapping)
        self.q_proj = _linear(h, cfg.num_attention_heads * d, cfg.attention_bias, dtype, param_dtype, rngs)
        self.k_proj = _linear(h, cfg.num_key_value_heads * d, cfg.attention_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(h, cfg.num_key_value_heads * d, cfg.attention_bias, dtype, param_dtype, rngs)
        self.o_proj = _linear(cfg.num_attention_heads * d, h, cfg.o_proj_bias, dtype, param_dtype, rngs)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, d, dtype, param_dtype)
            self.k_norm = _norm(cfg, d, dtype, param_dtype)

    def __call__(self, x, positions, key_mask, query_index, k_cache=None, v_cache=None, index=None,
                 attention: AttentionBackend | None = None, kv_len=None, pages=None):
        """x [b, t, h]; key_mask [b, s]; query_index [t] or [b, t] (cache position of each
        query, for causality); index [] or [b] (where the new keys go, see `kv_cache.write`).
        The caches may hold more rows than x: row r of x is the cache's row r; or they are
        page pools and `pages` [b, n] the rows' page table (`kv_cache.KVCache`).

        Without a cache the keys are this call's own tokens (s = t); with one, the new keys
        are written at `index` and the queries attend over the cache through `attention`
        (dense when None), which reads no key at or past a row's `kv_len` [b].
        Returns (out [b, t, h], k_cache, v_cache).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        inv_freq = rope_inv_freq(cfg, self.sliding)
        # Projections run as 2-D matmuls over [b*t, h]: XLA:CPU computes the weight
        # gradient of a 3-D dot ~1.5x slower (two contracting dims).
        x = x.reshape(b * t, -1)
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:  # per head, before RoPE: the cache holds normed, rotated keys
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        # Head-major layouts, keys transposed: k [b, kv, d, time], v [b, kv, time, d]. Both
        # attention matmuls then have their batch dims (b, kv) leading and contract over a
        # non-minor dim, which XLA:CPU runs ~6x faster than a per-row reduction over d; the
        # cache is stored the same way so decoding never transposes it.
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        if k_cache is not None:
            k_cache, v_cache = write(k_cache, k, index, 3, pages), write(v_cache, v, index, 2, pages)
            k, v = k_cache.astype(x.dtype), v_cache.astype(x.dtype)
        # GQA: group query heads by their shared kv head instead of repeating k/v.
        q = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        query_index = jnp.broadcast_to(query_index, (b, t))
        if attention is not None and k_cache is not None:
            bounds = jnp.full((b,), v.shape[2], jnp.int32) if kv_len is None else kv_len
            out = attention(q, k, v, pages, query_index, key_mask, bounds, self.layer_attention)
        else:
            if pages is not None:
                raise ValueError("a paged cache is read through an attention backend (models.attention_backend).")
            allowed = visible(query_index, key_mask, self.layer_attention.window)
            out = dense_attention(q, k[:b], v[:b], allowed, self.layer_attention)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b * t, -1)
        return self.o_proj(out).reshape(b, t, -1), k_cache, v_cache


# MLP activations by their transformers names (`ModelConfig.hidden_act`); pytorch's tanh GELU
# is jax's approximate one
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU; Gemma's GeGLU with tanh GELU)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.hidden_act = cfg.hidden_act
        self.gate_proj = _linear(h, i, cfg.mlp_bias, dtype, param_dtype, rngs)
        self.up_proj = _linear(h, i, cfg.mlp_bias, dtype, param_dtype, rngs)
        self.down_proj = _linear(i, h, cfg.mlp_bias, dtype, param_dtype, rngs)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # 2-D matmuls, as in Attention
        act = _ACTIVATIONS[self.hidden_act]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x)).reshape(shape)


class Block(nnx.Module):
    """Pre-norm residual block. HF's names are kept, and so is their one inconsistency: in
    Qwen / Llama `post_attention_layernorm` norms the MLP's input; with Gemma 3's
    `sandwich_norms` it norms the attention's output, and `pre_feedforward_layernorm` /
    `post_feedforward_layernorm` the MLP's input and output."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.sandwich_norms = cfg.sandwich_norms
        self.input_layernorm = _norm(cfg, cfg.hidden_size, dtype, param_dtype)
        self.self_attn = Attention(cfg, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = _norm(cfg, cfg.hidden_size, dtype, param_dtype)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = _norm(cfg, cfg.hidden_size, dtype, param_dtype)
            self.post_feedforward_layernorm = _norm(cfg, cfg.hidden_size, dtype, param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, key_mask, query_index, k_cache=None, v_cache=None, index=None,
                 attention=None, kv_len=None, pages=None):
        attn, k_cache, v_cache = self.self_attn(self.input_layernorm(x), positions, key_mask, query_index, k_cache,
                                                v_cache, index, attention, kv_len, pages)
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class CausalLM(nnx.Module):
    """Qwen2 / Qwen3 / Llama / Gemma 3 causal language model.

    Parameter paths mirror HF names (`embed_tokens`, `layers[i].self_attn.q_proj`, ...);
    Linear kernels are stored `[in, out]` (the transpose of torch's `weight`).
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, embedding_init=_INIT, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = _norm(cfg, cfg.hidden_size, dtype, param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, param_dtype, rngs)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_from: int = 0,
        attention: AttentionBackend | None = None,
        kv_len: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the model on `tokens` [batch, time].

        positions: [batch, time] RoPE positions; default: counted over `attention_mask`.
        attention_mask: [batch, time] 1 for real tokens, 0 for (left) padding.
        cache: with a cache the tokens are written at `cache.index` (one position for all
            rows, or one per row) and attend to every earlier real position; without, the
            call is a plain causal forward. A per-row cache may hold more rows than `tokens`
            (an engine step over its low slots): the tokens are its first rows.
        last_only: return logits of the last position only ([batch, 1, vocab]), which
            saves a `[batch, time, vocab]` buffer during prefill.
        logits_from: return logits of positions logits_from.. only ([batch, time -
            logits_from, vocab]): scoring a completion skips the prompt's projections.
        attention: with a cache, the backend that reads it (`models.attention_backend`, chosen
            once by the engine); None: dense attention over the whole cache.
        kv_len: with `attention`, [batch] int32 above each row's query positions: the backend
            reads no key at or past it (0: a free slot, which reads nothing).
        Returns (logits [batch, time, vocab] float32, updated cache or None).
        """
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        if cache is None:
            key_mask, query_index, index = attention_mask, jnp.arange(t), None
        else:
            index = cache.index
            key_mask = write(cache.mask, attention_mask, index, axis=1)
            query_index = index[..., None] + jnp.arange(t)  # [t], or [b, t] with one index per row

        # remat saves memory for a backward pass; a cached (decoding) forward has none
        block_fn = nnx.remat(Block.__call__) if self.remat and cache is None else Block.__call__
        x = self.embed_tokens(tokens)
        if self.cfg.embed_scale is not None:  # in the compute dtype, as transformers does (bf16: 25.25 for 25.3)
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            kc = cache.k[i] if cache is not None else None
            vc = cache.v[i] if cache is not None else None
            x, kc, vc = block_fn(layer, x, positions, key_mask[:b], query_index, kc, vc, index, attention, kv_len,
                                 None if cache is None or cache.pages is None else cache.pages[:b])
            ks.append(kc)
            vs.append(vc)
        if last_only:
            x = x[:, -1:]
        elif logits_from:
            x = x[:, logits_from:]
        logits = self.logits(self.norm(x))
        if cache is not None:
            cache = KVCache(k=tuple(ks), v=tuple(vs), mask=key_mask, index=index + t, pages=cache.pages)
        return logits, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final projection of normed hidden states [b, t, h] -> float32 logits [b, t, vocab]."""
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])  # 2-D matmul, as in Attention
        if self.cfg.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        out = out.reshape(*shape[:-1], -1).astype(jnp.float32)
        cap = self.cfg.final_logit_softcapping
        return out if cap is None else jnp.tanh(out / cap) * cap


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions [batch, time] for a left-padded mask: 0 at each row's first real token."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
