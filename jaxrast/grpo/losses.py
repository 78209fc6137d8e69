"""GRPO math as pure functions: group advantages, token log-probs, the clipped surrogate,
the k3 KL estimator and the loss aggregation modes.

Shapes: rewards `[groups, G]`; per-token arrays `[batch, time]` over completion tokens,
with `mask` 1 on real completion tokens and 0 on padding; advantages `[batch]`.
Host-side helpers (advantages, token weights) take numpy; the token-level functions are
jax and run inside the jitted train step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrast.rast.sampling import entropy_of

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")


def group_advantages(rewards: np.ndarray, *, scale: bool = True, eps: float = 1e-6
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-group advantages `(r - mean) / (std + eps)`, or `r - mean` with `scale=False`
    (Dr. GRPO, which drops the std so easy/hard groups are not re-weighted).

    rewards: [groups, G]. std is the population std (ddof 0) of each group.
    Returns (advantages [groups, G] float64, zero_variance [groups] bool): a group whose G
    rewards are all equal gets advantage 0 everywhere and teaches nothing; it is reported.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, G], got shape {rewards.shape}.")
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    zero_variance = np.all(rewards == rewards[:, :1], axis=1)
    if scale:
        centred = centred / (rewards.std(axis=1, keepdims=True) + eps)
    # exactly 0, not the rounding residue of r - mean(r) (e.g. eight rewards of 0.1): such
    # rows then have exactly zero gradient and can skip the backward (LossSpec.skip_zero_advantage)
    centred[zero_variance] = 0.0
    return centred, zero_variance


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0
                   ) -> tuple[jax.Array, jax.Array]:
    """log π(target) and the entropy of π at each position, π = softmax(logits / τ).

    The temperature is the sampler's, so the policy being optimised is the distribution
    the completions were drawn from (top-p/top-k truncation aside).
    logits: [batch, time, vocab] float32; targets: [batch, time] int.
    Returns (logp [batch, time], entropy [batch, time]), both float32.
    """
    z = logits.astype(jnp.float32) / temperature
    logp = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    # A masked sum, not take_along_axis: its gradient is elementwise instead of a scatter
    # (slow on CPU and TPU), and XLA fuses it with the pass over logp.
    hit = jnp.arange(z.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    picked = jnp.sum(jnp.where(hit, logp, 0.0), axis=-1)
    return picked, entropy_of(logp)  # reuses logp: one exp pass, not a softmax


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(π || π_ref) per token: exp(d) - d - 1 with d = log π_ref - log π.

    Unbiased for samples from π, always >= 0, and its gradient pulls π toward π_ref.
    """
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


class TokenLoss(NamedTuple):
    loss: jax.Array  # [batch, time] per-token loss (to be aggregated)
    ratio: jax.Array  # [batch, time] π/π_old
    clipped_low: jax.Array  # [batch, time] bool: ratio < 1-ε_low with A < 0 (gradient cut)
    clipped_high: jax.Array  # [batch, time] bool: ratio > 1+ε_high with A > 0 (gradient cut)
    kl: jax.Array  # [batch, time] k3 estimate (zeros without a reference)


def grpo_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                    epsilon_low: float, epsilon_high: float, ref_logp: jax.Array | None = None,
                    beta: float = 0.0) -> TokenLoss:
    """PPO-style clipped surrogate per token, plus β·KL to the reference.

    loss = -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) + β·k3(π, π_ref), ρ = exp(logp - old_logp).
    Separate ε_low/ε_high allow DAPO's "clip-higher". advantages: [batch] (one per sequence).
    """
    adv = advantages[:, None].astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    loss = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(logp) if ref_logp is None else k3_kl(logp, ref_logp)
    if ref_logp is not None and beta:
        loss = loss + beta * kl
    return TokenLoss(loss=loss, ratio=ratio,
                     clipped_low=(ratio < 1.0 - epsilon_low) & (adv < 0),
                     clipped_high=(ratio > 1.0 + epsilon_high) & (adv > 0), kl=kl)


def token_weights(mask: np.ndarray, mode: str, max_len: int) -> np.ndarray:
    """Weights w [batch, time] such that the aggregated loss is Σ w·loss.

    token_mean:          Σ loss / (number of completion tokens in the batch)   (DAPO)
    seq_mean_token_mean: mean over sequences of each sequence's token mean     (GRPO paper)
    dr_grpo:             Σ loss / (batch · max_len), a constant normaliser     (Dr. GRPO)

    Computed once for the whole optimiser batch, so summing Σ w·loss over its micro-batches
    gives exactly the full-batch loss (gradient accumulation changes nothing).
    mask: [batch, time] 0/1; max_len: the configured maximum completion length.
    """
    mask = np.asarray(mask, np.float64)
    batch = mask.shape[0]
    if mode == "token_mean":
        w = mask / max(mask.sum(), 1.0)
    elif mode == "seq_mean_token_mean":
        w = mask / np.maximum(mask.sum(axis=1, keepdims=True), 1.0) / batch
    elif mode == "dr_grpo":
        w = mask / (batch * max_len)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; use one of {AGGREGATIONS}.")
    return w.astype(np.float32)


def aggregate(per_token: jax.Array, mask: np.ndarray, mode: str, max_len: int) -> jax.Array:
    """Aggregates a per-token loss [batch, time] with one of `AGGREGATIONS` (see `token_weights`)."""
    return jnp.sum(per_token * token_weights(mask, mode, max_len))
