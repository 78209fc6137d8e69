"""Token-level analyses along decoding trajectories: path coverage, the KL of the RAST shift,
ΔR similarity across scales and per-step traces for case studies.

Every analysis teacher-forces `prompt + trajectory` through each model's own forward
(`CausalLM.__call__`, one call per batch, never token by token): the logits at position j
are the model's next-token prediction given the trajectory's exact prefix, so one forward
scores every step. Rows are right-padded and bucketed to powers of two (one compile per
bucket); the statistics are computed inside the same jit, so only per-position numbers
`[batch, time(, k)]` come back to the host, never `[batch, time, vocab]` logits.

Shapes: tokens `[batch, time]`; logits `[batch, time, vocab_i]`, where `vocab_i` may exceed
the tokenizer's `vocab` (padded rows are sliced off before any softmax or argmax).
Reports (`coverage_report`, ...) live in `jaxrast.analysis.reports`.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxrast.analysis.trajectories import Trajectory
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.ensemble import Combination, Ensemble, Pair
from jaxrast.runtime.distributed import host_array
from jaxrast.runtime.shapes import bucket_length

PerPosition = dict[str, np.ndarray]  # one trajectory: name -> [num_tokens, ...]




# ---- pure math over logits ------------------------------------------------------------------

def real_log_probs(z: jax.Array, vocab: int) -> jax.Array:
    """log softmax over the first `vocab` (real) tokens, float32: [..., V] -> [..., vocab]."""
    return jax.nn.log_softmax(z[..., :vocab].astype(jnp.float32), axis=-1)


def kl_divergence(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(P‖Q) = Σ p (log p − log q) over the last axis, from log-probs: [..., V] -> [...].

    Works in log space (no log of a rounded probability); terms with p = 0 are 0, and float
    noise below 0 is clipped, so identical inputs give exactly 0."""
    p = jnp.exp(logp)
    terms = jnp.where(p > 0, p * (logp - logq), 0.0)
    return jnp.maximum(jnp.sum(terms, axis=-1), 0.0)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine of `a`, `b` along the last axis: [..., V] -> [...]; NaN where either is 0."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.where(norms > 0, jnp.sum(a * b, axis=-1) / jnp.where(norms > 0, norms, 1.0), jnp.nan)


def _take(x: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, ids[..., None], axis=-1)[..., 0]


# ---- batched teacher forcing ----------------------------------------------------------------

class TeacherForcer:
    """Runs distinct models (each once) over trajectories in right-padded, length-bucketed,
    fixed-size batches, and applies a jitted statistics function to their logits."""

    def __init__(self, models: Sequence[CausalLM], *, vocab: int, batch_size: int = 8, pad_id: int = 0):
        self.ensemble = Ensemble(models, vocab=vocab)
        self.models, self.index, self.combination = self.ensemble.models, self.ensemble.index, self.ensemble.combination
        self.batch_size, self.pad_id, self.vocab = batch_size, pad_id, vocab
        self._graphdefs = tuple(nnx.graphdef(m) for m in self.models)
        self._apply = jax.jit(self._apply_impl, static_argnames=("stats",))

    def _apply_impl(self, states, tokens, mask, steps, *, stats):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        # position j predicts token j + 1: drop the last position and shift the targets
        logits = [m(tokens, attention_mask=mask)[0][:, :-1] for m in models]
        return stats(logits, tokens[:, 1:], steps)

    def run(self, stats: Callable, trajs: Sequence[Trajectory], *, progress: bool | None = None,
            desc: str = "teacher forcing") -> list[PerPosition]:
        """`stats(logits [b, t, V_i] per model, targets [b, t], steps [b, t]) -> {name: [b, t, ...]}`
        (a hashable callable: it is a static jit argument). Returns, per trajectory, each
        statistic at the trajectory's own positions: name -> [num_tokens, ...]."""
        for t in trajs:  # an id past the vocabulary gathers NaN logits: wrong numbers, no error
            bad = [i for i in (*t.prompt_ids, *t.token_ids) if not 0 <= i < self.vocab]
            if bad:
                raise ValueError(f"trajectory {t.id} (sample {t.sample}) holds token id {bad[0]}, outside the "
                                 f"vocabulary of {self.vocab} tokens: it was decoded with another tokenizer.")
        states = tuple(nnx.state(m) for m in self.models)
        order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].prompt_ids) + len(trajs[i].token_ids))
        size = max(1, min(self.batch_size, len(trajs)))
        out: list[PerPosition | None] = [None] * len(trajs)
        bar = tqdm(total=len(trajs), desc=desc, unit="traj",
                   disable=progress is False or (progress is None and len(trajs) <= size))
        for start in range(0, len(trajs), size):
            chunk = order[start:start + size]
            rows = chunk + [chunk[-1]] * (size - len(chunk))  # fixed batch: one compile per bucket
            width = bucket_length(max(len(trajs[i].prompt_ids) + len(trajs[i].token_ids) for i in rows))
            tokens = np.full((size, width), self.pad_id, np.int32)
            mask = np.zeros((size, width), bool)
            steps = np.zeros((size, width - 1), np.int32)
            for r, i in enumerate(rows):  # right padding: causal attention keeps real tokens from seeing it
                seq = trajs[i].prompt_ids + trajs[i].token_ids
                tokens[r, :len(seq)], mask[r, :len(seq)] = seq, True
                steps[r] = np.arange(1, width) - len(trajs[i].prompt_ids)
            # host inputs are replicated by jit; the gather reads results on every process
            res = host_array(self._apply(states, tokens, mask, steps, stats=stats))
            for r, i in enumerate(chunk):
                first, n = len(trajs[i].prompt_ids) - 1, len(trajs[i].token_ids)
                out[i] = {k: np.asarray(v[r, first:first + n]) for k, v in res.items()}
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


# ---- statistics (pure, run inside the jit) --------------------------------------------------

def _coverage_stats(logits, targets, steps, *, vocab: int, models: tuple[tuple[str, int], ...],
                    rast: Combination | None):
    zs = {name: logits[i][..., :vocab] for name, i in models}
    if rast is not None:
        zs["RAST"] = rast(logits, steps, vocab)
    out = {}
    for name, z in zs.items():
        out[f"{name}/pred"] = jnp.argmax(z, axis=-1).astype(jnp.int32)
        # rank of the trajectory token: how many tokens the model scores strictly higher
        out[f"{name}/rank"] = jnp.sum(z > _take(z, targets)[..., None], axis=-1).astype(jnp.int32)
    return out


def _shift_stats(lp: jax.Array, lq: jax.Array, targets: jax.Array, name: str) -> dict[str, jax.Array]:
    """Per-position KL(P‖Q), Δ log-prob of the trajectory token, and the most promoted token."""
    return {f"{name}/kl": kl_divergence(lp, lq), f"{name}/dlogp": _take(lp, targets) - _take(lq, targets),
            f"{name}/promoted": jnp.argmax(jnp.exp(lp) - jnp.exp(lq), axis=-1).astype(jnp.int32)}


def _kl_stats(logits, targets, steps, *, vocab: int, rast: Combination, pairs: tuple[tuple[str, int, int], ...],
              models: tuple[tuple[str, int], ...]):
    base = real_log_probs(logits[rast.base], vocab)
    out = _shift_stats(real_log_probs(rast(logits, steps, vocab), vocab), base, targets, "RAST")
    for name, rl, ref in pairs:  # the small RL shift itself: KL(P_rl ‖ P_ref)
        out.update(_shift_stats(real_log_probs(logits[rl], vocab), real_log_probs(logits[ref], vocab), targets, name))
    for name, i in models:  # e.g. the large RL model: KL(P_M_RL ‖ P_base)
        out.update(_shift_stats(real_log_probs(logits[i], vocab), base, targets, name))
    return out


def _similarity_stats(logits, targets, steps, *, vocab: int, pairs: tuple[tuple[int, int], ...],
                      comparisons: tuple[tuple[str, int, int], ...]):
    out = {}
    for name, a, b in comparisons:
        (rl_a, ref_a), (rl_b, ref_b) = pairs[a], pairs[b]
        rows = min(logits[i].shape[-1] for i in (rl_a, ref_a, rl_b, ref_b))  # rows all four have
        da = logits[rl_a][..., :rows] - logits[ref_a][..., :rows]
        db = logits[rl_b][..., :rows] - logits[ref_b][..., :rows]
        out[f"{name}/full"] = cosine(da, db)
        out[f"{name}/shared"] = cosine(da[..., :vocab], db[..., :vocab])
    return out


def _trace_stats(logits, targets, steps, *, vocab: int, rast: Combination, top_k: int):
    zb = logits[rast.base][..., :vocab].astype(jnp.float32)
    z = rast(logits, steps, vocab)
    lb, lz = jax.nn.log_softmax(zb, axis=-1), jax.nn.log_softmax(z, axis=-1)
    delta = z - zb  # schedule(step) · Σ λ_i (rl_i − ref_i), on the real vocab
    out = {"logp_base": _take(lb, targets), "logp_combined": _take(lz, targets), "kl": kl_divergence(lz, lb)}
    for name, x in (("base", jnp.exp(lb)), ("combined", jnp.exp(lz)), ("delta", delta), ("delta_low", -delta)):
        values, ids = jax.lax.top_k(x, top_k)
        out[f"{name}/ids"], out[f"{name}/values"] = ids.astype(jnp.int32), values
    out["delta_low/values"] = -out["delta_low/values"]
    return out


# ---- analyses: per-position numbers (summaries in jaxrast.analysis.reports) -----------------

def coverage_positions(trajs: Sequence[Trajectory], models: Mapping[str, CausalLM], *, vocab: int,
                       base: CausalLM | None = None, pairs: Sequence[Pair] = (), lam_schedule=None,
                       batch_size: int = 8, progress: bool | None = None) -> list[PerPosition]:
    """Per trajectory: `{name}/pred` (the model's argmax given the trajectory's prefix) and
    `{name}/rank` of the trajectory token, for each model and, given `base` and `pairs`,
    for RAST's combined logits under the name "RAST"."""
    forcer = TeacherForcer([*models.values(), *([base] if base is not None else []),
                           *(m for p in pairs for m in (p.rl, p.ref))], vocab=vocab, batch_size=batch_size)
    rast = forcer.combination(base, pairs, lam_schedule) if base is not None else None
    stats = functools.partial(_coverage_stats, vocab=vocab, rast=rast,
                              models=tuple((n, forcer.index(m)) for n, m in models.items()))
    return forcer.run(stats, trajs, progress=progress, desc="coverage")


def kl_positions(trajs: Sequence[Trajectory], base: CausalLM, pairs: Sequence[Pair], *, vocab: int,
                 models: Mapping[str, CausalLM] | None = None, pair_names: Sequence[str] | None = None,
                 lam_schedule=None, batch_size: int = 8, progress: bool | None = None) -> list[PerPosition]:
    """Per trajectory `{name}/kl`, `/dlogp`, `/promoted` for KL(P_RAST ‖ P_base) ("RAST"),
    each pair's KL(P_rl ‖ P_ref) (`pair_names`, default "pair0", ...) and each extra model's
    KL(P_model ‖ P_base)."""
    models = dict(models or {})
    pair_names = list(pair_names or [f"pair{i}" for i in range(len(pairs))])
    forcer = TeacherForcer([base, *(m for p in pairs for m in (p.rl, p.ref)), *models.values()],
                           vocab=vocab, batch_size=batch_size)
    stats = functools.partial(
        _kl_stats, vocab=vocab, rast=forcer.combination(base, pairs, lam_schedule),
        pairs=tuple((n, forcer.index(p.rl), forcer.index(p.ref)) for n, p in zip(pair_names, pairs)),
        models=tuple((n, forcer.index(m)) for n, m in models.items()))
    return forcer.run(stats, trajs, progress=progress, desc="kl")


def similarity_positions(trajs: Sequence[Trajectory], pairs: Mapping[str, tuple[CausalLM, CausalLM]], *,
                         vocab: int, batch_size: int = 8, progress: bool | None = None) -> list[PerPosition]:
    """Per trajectory, for every two pairs a < b (named "a|b"): `a|b/full`, the cosine of
    ΔR_a = z_rl_a − z_ref_a and ΔR_b over the rows all four models have, and `a|b/shared`,
    the same over the first `vocab` (tokenizer) ids."""
    names = list(pairs)
    if len(names) < 2:
        raise ValueError("ΔR similarity compares pairs: give at least two (rl, ref) pairs.")
    forcer = TeacherForcer([m for rl_ref in pairs.values() for m in rl_ref], vocab=vocab, batch_size=batch_size)
    index = tuple((forcer.index(rl), forcer.index(ref)) for rl, ref in pairs.values())
    comparisons = tuple((f"{names[a]}|{names[b]}", a, b) for a in range(len(names)) for b in range(a + 1, len(names)))
    stats = functools.partial(_similarity_stats, vocab=vocab, pairs=index, comparisons=comparisons)
    return forcer.run(stats, trajs, progress=progress, desc="similarity")


def trace_positions(trajs: Sequence[Trajectory], base: CausalLM, pairs: Sequence[Pair] = (), *, vocab: int,
                    top_k: int = 5, lam_schedule=None, batch_size: int = 8,
                    progress: bool | None = None) -> list[PerPosition]:
    """Per step of each trajectory: top-`top_k` (ids, values) of the base and combined
    distributions (probabilities), of the delta s·Σλ(z_rl − z_ref) (most promoted: `delta`,
    most suppressed: `delta_low`, in logits), the trajectory token's log-prob under base and
    combined, and KL(P_combined ‖ P_base)."""
    forcer = TeacherForcer([base, *(m for p in pairs for m in (p.rl, p.ref))], vocab=vocab, batch_size=batch_size)
    stats = functools.partial(_trace_stats, vocab=vocab, top_k=min(top_k, vocab),
                              rast=forcer.combination(base, pairs, lam_schedule))
    return forcer.run(stats, trajs, progress=progress, desc="trace")
