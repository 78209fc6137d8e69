"""The jitted GRPO programs: scoring a rollout (old / reference log-probs) and one
optimiser update (gradient accumulation over micro-batches with `lax.scan`).

Everything is functional over `(params, opt_state)` pytrees placed by the partition rules
of `jaxrast.models.partitioning`, so the same program runs on one device or a data/fsdp/tensor mesh.
Batch arrays are `[micro_batches, micro_batch_size, ...]`, split over the batch axes.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrast.grpo.config import LossSpec, OptimSpec
from jaxrast.grpo.losses import grpo_token_loss, token_logprobs
from jaxrast.models.partitioning import fit_spec, path_str, rule_for
from jaxrast.runtime.distributed import put_global
from jaxrast.runtime.mesh import BATCH


@flax.struct.dataclass
class Batch:
    """One optimiser update's data; every leaf is [micro_batches, micro_batch_size, ...]."""

    tokens: jax.Array  # [..., P + T] int32: left-padded prompt, right-padded completion
    mask: jax.Array  # [..., P + T] bool
    completion_mask: jax.Array  # [..., T] float32
    weights: jax.Array  # [..., T] float32: aggregation weights (losses.token_weights)
    advantages: jax.Array  # [...] float32
    old_logp: jax.Array  # [..., T] float32 (unused on-policy)
    ref_logp: jax.Array  # [..., T] float32 (unused when beta == 0)
    entropy: jax.Array  # [..., T] float32: the sampler's entropies (used with stats_from_rollout)
    active: jax.Array  # [micro_batches] bool: False = no row has a gradient (see Programs)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for params *and* optimiser state: a leaf whose path ends with a
    parameter path (Adam's mu/nu mirror the params) follows that parameter's rule; any
    other leaf (step counts) is replicated."""
    def one(path, leaf):
        name = path_str(path)
        return NamedSharding(mesh, fit_spec(rule_for(name, default=P()), leaf.shape, mesh, name))
    return jax.tree_util.tree_map_with_path(one, tree)


def make_optimizer(optim: OptimSpec, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up then cosine decay, after global-norm clipping.

    Weight decay skips vectors (norm scales, biases), as is usual for transformers.
    """
    decay_steps = max(total_updates, optim.warmup_steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, decay_steps,
                                                  end_value=optim.lr * optim.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    if optim.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), adamw), schedule
    return adamw, schedule


class Programs:
    """Compiled score / update functions for one policy graph and loss configuration.

    A micro-batch that is not `active` (every row has advantage 0 and β = 0, so its
    gradient is exactly 0) skips the backward. With `stats_from_rollout` (on-policy only)
    the logged entropy is the one the sampler recorded from the same policy, for every row,
    so no forward computes it, and an inactive micro-batch skips its forward too: its ratio
    is 1, nothing is clipped, and its loss and KL are 0.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, tx: optax.GradientTransformation, *,
                 loss: LossSpec, temperature: float, vocab: int, mesh: Mesh, on_policy: bool, use_ref: bool,
                 stats_from_rollout: bool = False):
        if stats_from_rollout and not (on_policy and not use_ref):
            raise ValueError("stats_from_rollout needs an on-policy run with beta = 0.")
        self.graphdef, self.tx, self.loss_spec = graphdef, tx, loss
        self.temperature, self.vocab, self.mesh = temperature, vocab, mesh
        self.on_policy, self.use_ref, self.stats_from_rollout = on_policy, use_ref, stats_from_rollout
        self.param_shardings = state_shardings(params, mesh)
        self.opt_shardings = state_shardings(jax.eval_shape(tx.init, params), mesh)
        self.init_opt = jax.jit(tx.init, out_shardings=self.opt_shardings)
        self.update = jax.jit(self._update, donate_argnums=(0, 1),
                              out_shardings=(self.param_shardings, self.opt_shardings, None))
        self.score = jax.jit(self._score, static_argnames=("width_t",))

    def put(self, x: Any) -> jax.Array:
        """Places a host array [micro_batches, micro_batch_size, ...] with its batch axis split
        (in a multi-process run each process feeds only its own devices' slices)."""
        spec = fit_spec(P(None, BATCH), x.shape, self.mesh, "micro-batch")
        return put_global(x, NamedSharding(self.mesh, spec))

    def _logprobs(self, params: nnx.State, tokens: jax.Array, mask: jax.Array, width_t: int):
        """log π(completion tokens) and entropies, [batch, T] each, from the model's one forward."""
        model = nnx.merge(self.graphdef, params)
        start = tokens.shape[1] - width_t
        # logits at position j predict token j + 1; padded vocabulary rows are never sampled
        logits, _ = model(tokens, attention_mask=mask, logits_from=start - 1)
        logits = logits[:, :-1, :self.vocab]
        return token_logprobs(logits, tokens[:, start:], self.temperature)

    def _score(self, params: nnx.State, tokens: jax.Array, mask: jax.Array, *, width_t: int) -> jax.Array:
        """Per-token log-probs [micro_batches, micro_batch_size, T], one micro-batch at a time."""
        return jax.lax.map(lambda tm: self._logprobs(params, tm[0], tm[1], width_t)[0], (tokens, mask))

    def _micro_loss(self, params: nnx.State, mb: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp, entropy = self._logprobs(params, mb.tokens, mb.mask, mb.completion_mask.shape[-1])
        if self.stats_from_rollout:
            entropy = mb.entropy  # the computed one is then dead code, which XLA removes
        old = jax.lax.stop_gradient(logp) if self.on_policy else mb.old_logp
        spec = self.loss_spec
        out = grpo_token_loss(logp, old, mb.advantages, epsilon_low=spec.epsilon_low,
                              epsilon_high=spec.epsilon_high, ref_logp=mb.ref_logp if self.use_ref else None,
                              beta=spec.beta)
        m = mb.completion_mask
        loss = jnp.sum(out.loss * mb.weights)
        # token sums; divided by the token count once the whole batch is in
        sums = {"kl": jnp.sum(out.kl * m), "clip_low": jnp.sum(out.clipped_low * m),
                "clip_high": jnp.sum(out.clipped_high * m), "entropy": jnp.sum(entropy * m),
                "ratio": jnp.sum(out.ratio * m), "tokens": jnp.sum(m), "loss": loss}
        return loss, sums

    def _update(self, params: nnx.State, opt_state: Any, batch: Batch):
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def with_grad(mb):
            (_, stats), g = grad_fn(params, mb)
            return g, stats

        def forward_only(mb):
            # every row's advantage is 0 and β = 0: the gradient is exactly 0, so only the
            # statistics (entropy, ratio, ...) are computed, at a third of the cost
            _, stats = self._micro_loss(params, mb)
            return jax.tree.map(jnp.zeros_like, params), stats

        def rollout_stats(mb):
            # ... and on-policy: the statistics are known without a forward (see the class)
            m, zero = mb.completion_mask, jnp.zeros((), jnp.float32)
            stats = {"kl": zero, "clip_low": zero, "clip_high": zero, "entropy": jnp.sum(mb.entropy * m),
                     "ratio": jnp.sum(m), "tokens": jnp.sum(m), "loss": zero}
            return jax.tree.map(jnp.zeros_like, params), stats

        skip = rollout_stats if self.stats_from_rollout else forward_only

        def accumulate(carry, mb):
            grads, sums = carry
            g, stats = jax.lax.cond(mb.active, with_grad, skip, mb)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, jax.tree.map(jnp.add, sums, stats)), None

        # accumulate in float32 even for bf16 params
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        names = ("kl", "clip_low", "clip_high", "entropy", "ratio", "tokens", "loss")
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, {k: jnp.zeros((), jnp.float32) for k in names}), batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        tokens = jnp.maximum(sums.pop("tokens"), 1.0)
        metrics = {k: v / tokens for k, v in sums.items() if k != "loss"}
        metrics.update(loss=sums["loss"], grad_norm=grad_norm,
                       clip_frac=(sums["clip_low"] + sums["clip_high"]) / tokens)
        return params, opt_state, metrics
