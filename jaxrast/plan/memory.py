"""Memory plans: RAST decoding of a base model with small pairs vs GRPO-training the base.

Pure functions of `ModelConfig`s and mesh *sizes* (no devices, no weights). Every buffer
is an array shape with an element size and a `PartitionSpec`, and its per-device share
comes from `jaxrast.models.partitioning` (the rule table and `fit_spec`'s divisibility fallback), so
the plan shards exactly as `load_model(..., mesh=...)` and the decoder would.

Units: bytes throughout; reports print GB = 1e9 bytes. Notation: B batch rows, Tp prompt
tokens, T = Tp + new tokens, H hidden, I intermediate, L layers, nh / kv query / key-value
heads, d head_dim, V vocab rows.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Mapping, Sequence

from jax.sharding import PartitionSpec as P

from jaxrast.models.config import ModelConfig
from jaxrast.models.partitioning import KV_CACHE_SPEC, rule_for, shard_shape
from jaxrast.runtime.mesh import BATCH

ITEMSIZE = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# Activation layouts the partitioner reaches from the parameter rules: batch over the
# data-parallel axes, head / intermediate / vocab dimensions over `tensor`.
ROWS = P(BATCH)  # [B, ..., H]
SPLIT_LAST = P(BATCH, None, "tensor")  # [B, T, nh·d | I | V]
LOGITS = P(BATCH, "tensor")  # [B, V]
SCORES = P(BATCH, "tensor")  # [B, nh, Tq, Tk]


def itemsize(dtype: str) -> int:
    if dtype.lower() not in ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(ITEMSIZE)}.")
    return ITEMSIZE[dtype.lower()]


@dataclasses.dataclass(frozen=True)
class Buffer:
    """`count` arrays of `shape`, `itemsize` bytes per element, laid out by `spec`."""

    shape: tuple[int, ...]
    itemsize: int
    spec: P = P()
    count: int = 1

    def total(self) -> int:
        return self.count * self.itemsize * math.prod(self.shape)

    def per_device(self, sizes: Mapping[str, int]) -> int:
        return self.count * self.itemsize * math.prod(shard_shape(self.spec, self.shape, sizes))


@dataclasses.dataclass(frozen=True)
class Component:
    """One row of a plan: a named group of buffers (e.g. one model's weights)."""

    name: str
    buffers: tuple[Buffer, ...]
    params: int = 0  # parameter count, for weight rows

    def total(self) -> int:
        return sum(b.total() for b in self.buffers)

    def per_device(self, sizes: Mapping[str, int]) -> int:
        return sum(b.per_device(sizes) for b in self.buffers)


# ---- parameters ---------------------------------------------------------------------------

def layer_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one decoder block, by path relative to `layers.<i>.` (kernels [in, out])."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if cfg.sandwich_norms:
        out["pre_feedforward_layernorm.weight"] = out["post_feedforward_layernorm.weight"] = (h,)
    for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out[f"self_attn.{name}.kernel"] = (h, width)
        if cfg.attention_bias:
            out[f"self_attn.{name}.bias"] = (width,)
    out["self_attn.o_proj.kernel"] = (q, h)
    if cfg.o_proj_bias:
        out["self_attn.o_proj.bias"] = (h,)
    if cfg.qk_norm:
        out["self_attn.q_norm.weight"] = out["self_attn.k_norm.weight"] = (d,)
    for name, shape in (("gate_proj", (h, i)), ("up_proj", (h, i)), ("down_proj", (i, h))):
        out[f"mlp.{name}.kernel"] = shape
        if cfg.mlp_bias:
            out[f"mlp.{name}.bias"] = (shape[1],)
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `CausalLM(cfg)` by dotted path, as `jaxrast.models.partitioning.path_str` names them."""
    out: dict[str, tuple[int, ...]] = {"embed_tokens.embedding": (cfg.vocab_size, cfg.hidden_size)}
    block = layer_param_shapes(cfg)
    for layer in range(cfg.num_hidden_layers):
        out.update({f"layers.{layer}.{k}": v for k, v in block.items()})
    out["norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        out["lm_head.kernel"] = (cfg.hidden_size, cfg.vocab_size)
    return out


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of `CausalLM(cfg)` (tied embeddings counted once)."""
    top = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    block = sum(math.prod(s) for s in layer_param_shapes(cfg).values())
    return top + cfg.num_hidden_layers * block


def param_buffers(cfg: ModelConfig, nbytes: int) -> tuple[Buffer, ...]:
    """The parameters as buffers laid out by `PARAM_RULES` (the L identical blocks folded into counts)."""
    out = [Buffer(shape, nbytes, rule_for(f"layers.0.{k}"), cfg.num_hidden_layers)
           for k, shape in layer_param_shapes(cfg).items()]
    top = {k: v for k, v in param_shapes(cfg).items() if not k.startswith("layers.")}
    out += [Buffer(shape, nbytes, rule_for(k)) for k, shape in top.items()]
    return tuple(out)


# ---- decoding -----------------------------------------------------------------------------

def kv_cache_buffers(cfg: ModelConfig, batch: int, length: int, nbytes: int) -> tuple[Buffer, ...]:
    """K and V of every layer: 2·L arrays [B, kv, T, d] (KV_CACHE_SPEC: batch over data×fsdp,
    kv heads over tensor when divisible), i.e. 2·L·kv·d·bytes per token."""
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    return (Buffer(shape, nbytes, KV_CACHE_SPEC, 2 * cfg.num_hidden_layers),)


def prefill_buffers(cfg: ModelConfig, batch: int, prompt: int, length: int, nbytes: int) -> tuple[Buffer, ...]:
    """The largest live set of one block during prefill (jaxrast attends with a plain einsum,
    not a fused kernel): float32 scores plus probabilities [B, nh, Tp, T], the MLP's gate,
    up and product [B, Tp, I] and ~4 hidden-size buffers [B, Tp, H]."""
    return (Buffer((batch, cfg.num_attention_heads, prompt, length), 4 + nbytes, SCORES),
            Buffer((batch, prompt, cfg.intermediate_size), nbytes, SPLIT_LAST, 3),
            Buffer((batch, prompt, cfg.hidden_size), nbytes, ROWS, 4))


def logits_buffers(vocab: int, batch: int, models: int) -> tuple[Buffer, ...]:
    """float32 last-position logits [B, V] of each model, plus three for the fused step
    (combined z, log-softmax for the token log-probs, sorted probabilities for top-p)."""
    return (Buffer((batch, vocab), 4, LOGITS, models + 3),)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    batch: int = 16  # rows decoded together (prompts × samples): DecodeConfig.batch_size
    prompt_len: int = 512
    new_tokens: int = 1024
    dtype: str = "bfloat16"  # weights, KV cache and activations

    @property
    def length(self) -> int:
        return self.prompt_len + self.new_tokens


def rast_plan(models: Sequence[tuple[str, str, ModelConfig]], shape: DecodeShape) -> list[Component]:
    """Memory of decoding base + pairs. `models`: (role, name, config) with roles 'base',
    'rl', 'ref'; a name listed twice (a shared reference) is loaded and run once, as RAST does."""
    unique: dict[str, tuple[list[str], ModelConfig]] = {}
    for role, name, cfg in models:
        unique.setdefault(name, ([], cfg))[0].append(role)
    nbytes = itemsize(shape.dtype)
    out = []
    for name, (roles, cfg) in unique.items():
        out.append(Component(f"weights {name} ({', '.join(roles)})", param_buffers(cfg, nbytes), param_count(cfg)))
    for name, (_, cfg) in unique.items():
        out.append(Component(f"KV cache {name}", kv_cache_buffers(cfg, shape.batch, shape.length, nbytes)))
    # Models run one after another inside a step: one prefill transient (the largest) at a time.
    cfgs = [cfg for _, cfg in unique.values()]
    peak = max((prefill_buffers(c, shape.batch, shape.prompt_len, shape.length, nbytes) for c in cfgs),
               key=lambda bufs: sum(b.total() for b in bufs))
    vocab = max(c.vocab_size for c in cfgs)
    out.append(Component("activations (prefill peak + logits)", peak + logits_buffers(vocab, shape.batch, len(cfgs))))
    return out


# ---- GRPO training of the base ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainShape:
    micro_batch: int = 8  # sequences per forward/backward over the whole mesh
    seq_len: int = 1536  # prompt + completion tokens
    rollout_batch: int = 16  # rows decoded together when sampling completions
    remat: bool = True  # nnx.remat around each block (CausalLM(remat=True))
    dtype: str = "bfloat16"  # compute, reference weights, rollout KV cache
    master_dtype: str = "float32"  # policy weights and gradients
    optimizer_dtype: str = "float32"  # Adam m and v


def block_activation_buffers(cfg: ModelConfig, batch: int, seq: int, nbytes: int, count: int = 1
                             ) -> tuple[Buffer, ...]:
    """What one block keeps for its backward pass, per token: the input, two norm outputs,
    the residual after attention (4·H), q, k, v and rotated q, k plus the attention output
    (3·nh·d + 3·kv·d), gate, up, silu(gate) and their product (4·I), all in compute dtype,
    and the float32 scores plus probabilities [B, nh, S, S]."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return (Buffer((batch, seq, cfg.hidden_size), nbytes, ROWS, 4 * count),
            Buffer((batch, seq, q), nbytes, SPLIT_LAST, 3 * count),
            Buffer((batch, seq, kv), nbytes, SPLIT_LAST, 3 * count),
            Buffer((batch, seq, cfg.intermediate_size), nbytes, SPLIT_LAST, 4 * count),
            Buffer((batch, cfg.num_attention_heads, seq, seq), 4 + nbytes, SCORES, count))


def train_activation_buffers(cfg: ModelConfig, shape: TrainShape) -> tuple[Buffer, ...]:
    """Activations of one micro-batch's forward + backward.

    Without remat every block's set is kept: (L + 1) sets (the +1: gradients in flight).
    With remat only each block's input [mb, S, H] is kept, and the block being
    differentiated is recomputed: L checkpoints + 2 sets. Both add float32 logits,
    log-probs and the logits' gradient [mb, S, V].
    """
    b, s, nbytes = shape.micro_batch, shape.seq_len, itemsize(shape.dtype)
    layers = cfg.num_hidden_layers
    if shape.remat:
        kept = (Buffer((b, s, cfg.hidden_size), nbytes, ROWS, layers),) + block_activation_buffers(cfg, b, s, nbytes, 2)
    else:
        kept = block_activation_buffers(cfg, b, s, nbytes, layers + 1)
    return kept + (Buffer((b, s, cfg.vocab_size), 4, SPLIT_LAST, 3),)


def grpo_plan(name: str, cfg: ModelConfig, shape: TrainShape) -> list[Component]:
    """Memory of GRPO on `cfg` itself: policy, frozen reference, gradients, Adam, activations
    and the rollout KV cache. Params, gradients and optimiser states shard by the rule table."""
    n = param_count(cfg)
    master, compute = itemsize(shape.master_dtype), itemsize(shape.dtype)
    opt = itemsize(shape.optimizer_dtype)
    remat = "remat" if shape.remat else "no remat"
    return [
        Component(f"policy weights {name} ({shape.master_dtype})", param_buffers(cfg, master), n),
        Component(f"reference weights ({shape.dtype})", param_buffers(cfg, compute), n),
        Component(f"gradients ({shape.master_dtype})", param_buffers(cfg, master)),
        Component(f"Adam m + v ({shape.optimizer_dtype})", param_buffers(cfg, opt) * 2),
        Component(f"activations (micro-batch {shape.micro_batch} × {shape.seq_len}, {remat})",
                  train_activation_buffers(cfg, shape)),
        Component(f"rollout KV cache ({shape.rollout_batch} × {shape.seq_len})",
                  kv_cache_buffers(cfg, shape.rollout_batch, shape.seq_len, compute)),
    ]


# ---- totals, meshes, devices --------------------------------------------------------------

# HBM per device as vendors state it (GiB); one JAX device per chip (v4/v5p: megacore).
DEVICES: dict[str, float] = {"v3": 16, "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "l4": 24, "a100-40": 40,
                             "a100": 80, "h100": 80, "h200": 141, "b200": 180}


def totals(components: Sequence[Component], sizes: Mapping[str, int]) -> tuple[int, int]:
    """(bytes in all, bytes on the most loaded device) — every device holds the same share."""
    return sum(c.total() for c in components), sum(c.per_device(sizes) for c in components)


def smallest_mesh(plan: Callable[[dict[str, int]], Sequence[Component]], capacity: float,
                  max_devices: int = 4096) -> dict[str, int] | None:
    """The smallest power-of-two device count (and its best fsdp×tensor split) whose
    per-device share of `plan(sizes)` fits in `capacity` bytes; None if none up to `max_devices`."""
    n = 1
    while n <= max_devices:
        best = None
        for tensor in (t for t in (1, 2, 4, 8) if n % t == 0):
            sizes = {"data": 1, "fsdp": n // tensor, "tensor": tensor}
            used = totals(plan(sizes), sizes)[1]
            if used <= capacity and (best is None or used < best[0]):
                best = (used, sizes)
        if best:
            return best[1]
        n *= 2
    return None


def resolve_config(spec: str) -> ModelConfig:
    """A checkpoint directory, a config.json path, an embedded preset or a hub id in the local
    HF cache -> ModelConfig; never touches the network."""
    from jaxrast.plan.presets import PRESETS, find_preset

    if os.path.exists(spec):
        return ModelConfig.from_file(spec)
    preset = find_preset(spec)
    if preset:
        return ModelConfig.from_hf_dict(PRESETS[preset], source=f"preset {preset}")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(spec, "config.json")
        except Exception:  # an id the hub library rejects: fall through to the error
            cached = None
        if isinstance(cached, str):
            return ModelConfig.from_file(cached)
    raise FileNotFoundError(
        f"{spec!r} is not a checkpoint directory or config.json, not an embedded model "
        f"({', '.join(sorted(PRESETS))}) and not in the local HuggingFace cache; pass its config.json "
        f"(huggingface-cli download {spec} config.json).")
