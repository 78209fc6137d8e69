"""The paper's equation, z = z_base + Σ_i λ_i · (z_rl_i − z_ref_i), and λ schedules.
Pure functions; shapes: logits `[..., vocab]`."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def combine_logits(base: jax.Array, rl: Sequence[jax.Array] = (), ref: Sequence[jax.Array] = (),
                   lam: jax.Array | Sequence[float] = (), vocab: int | None = None) -> jax.Array:
    """z = z_base + Σ_i lam_i · (z_rl_i − z_ref_i) over the first `vocab` (real) tokens.

    Each model's logits may be padded beyond the tokenizer (Qwen2.5-7B+: 152064 rows,
    1.5B: 151936); slicing every input to the real vocabulary makes the padded rows
    impossible to sample rather than relying on their (arbitrary) values.

    base: [..., V_base]; rl[i], ref[i]: [..., V_i]; lam: [num_pairs].
    Returns float32 [..., vocab].
    """
    vocab = vocab or min([base.shape[-1], *(x.shape[-1] for x in (*rl, *ref))])
    if not (len(rl) == len(ref) == len(lam)):
        raise ValueError(f"combine_logits: {len(rl)} rl, {len(ref)} ref logits and {len(lam)} weights; "
                         "each pair needs one of each.")
    z = base[..., :vocab].astype(jnp.float32)
    for i, (z_rl, z_ref) in enumerate(zip(rl, ref)):
        delta = z_rl[..., :vocab].astype(jnp.float32) - z_ref[..., :vocab].astype(jnp.float32)
        z = z + jnp.asarray(lam, jnp.float32)[i] * delta
    return z


# ---- λ schedules: static (hashable) callables step -> multiplier of every λ_i -------------

def _constant(step: jax.Array) -> jax.Array:
    return jnp.ones((), jnp.float32)


def _warmup(step: jax.Array, steps: int) -> jax.Array:
    return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / steps)


def _until(step: jax.Array, steps: int) -> jax.Array:
    return (step < steps).astype(jnp.float32)


def lam_schedule(spec: str | None) -> Callable[[jax.Array], jax.Array]:
    """'constant' (default), 'warmup:N' (λ ramps linearly over the first N tokens) or
    'first:N' (ΔR applied to the first N generated tokens only)."""
    if spec in (None, "", "constant"):
        return _constant
    kind, _, arg = spec.partition(":")
    if kind in ("warmup", "first") and arg.isdigit() and int(arg) > 0:
        return functools.partial(_warmup if kind == "warmup" else _until, steps=int(arg))
    raise ValueError(f"unknown λ schedule {spec!r}; use 'constant', 'warmup:N' or 'first:N'.")
