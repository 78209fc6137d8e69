"""The models one RAST computation runs: each distinct model once, the pairs as indices into
them, one real vocabulary, and the combination rule over their logits.

Shared by decoding (`RAST`, the engine) and the teacher-forced analyses, so both run a
model used by several pairs (a shared ref) once per step, refuse models that cannot share
the tokenizer, and combine logits with one rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxrast.models.transformer import CausalLM
from jaxrast.rast.combine import combine_logits
from jaxrast.rast.combine import lam_schedule as make_lam_schedule


@dataclasses.dataclass
class Pair:
    """One small pair: `rl` (RL-tuned), `ref` (its base) and the weight `lam` of rl − ref."""

    rl: CausalLM
    ref: CausalLM
    lam: float = 1.0
    tokenizer: Any = None  # if given, checked against the base tokenizer


@dataclasses.dataclass(frozen=True)
class Combination:
    """RAST's combined logits from model indices: base + s(step)·Σ λ_i (rl_i − ref_i)."""

    base: int
    pairs: tuple[tuple[int, int], ...] = ()
    lams: tuple[float, ...] = ()
    schedule: Callable | None = None  # step -> multiplier of every λ (hashable: a static jit argument)

    def __call__(self, logits: Sequence[jax.Array], steps: jax.Array, vocab: int,
                 lams: jax.Array | None = None) -> jax.Array:
        """logits: one [*batch, V_i] per model; steps: the generated-token index of each
        target, broadcastable to `batch` (a scalar in a decode step, [b, t] when teacher
        forcing); lams: [pairs] or [pairs, *batch] weights overriding `self.lams` (traced,
        so new weights do not recompile). Returns float32 [*batch, vocab]."""
        lam = jnp.asarray(self.lams if lams is None else lams, jnp.float32)
        steps = jnp.asarray(steps)
        if self.schedule is not None and self.pairs:
            lam = lam.reshape(lam.shape + (1,) * max(0, steps.ndim - lam.ndim + 1))
            lam = lam * jnp.broadcast_to(self.schedule(steps), steps.shape).astype(jnp.float32)
        if lam.ndim > 1:  # per-row weights: a trailing axis broadcasts them over the vocabulary
            lam = lam[..., None]
        return combine_logits(logits[self.base], [logits[i] for i, _ in self.pairs],
                              [logits[j] for _, j in self.pairs], lam, vocab)


class Ensemble:
    """Distinct models (by identity) in first-seen order, with the real vocabulary checked
    against every model's embedding rows."""

    def __init__(self, models: Sequence[CausalLM], *, vocab: int | None = None, tokenizer=None):
        self.models: list[CausalLM] = []
        for m in models:
            if all(m is not seen for seen in self.models):
                self.models.append(m)
        if not self.models:
            raise ValueError("no model to run; give at least one model.")
        self.vocab = vocab or (len(tokenizer) if tokenizer is not None else
                               min(m.cfg.vocab_size for m in self.models))
        for j, m in enumerate(self.models):
            if m.cfg.vocab_size < self.vocab:
                raise ValueError(f"model {j} has {m.cfg.vocab_size} vocab rows but the tokenizer has "
                                 f"{self.vocab} tokens; the models do not share the tokenizer.")

    @classmethod
    def of_pairs(cls, base: CausalLM, pairs: Sequence[Pair], *, extra: Sequence[CausalLM] = (),
                 vocab: int | None = None, tokenizer=None) -> "Ensemble":
        """The base first, then each pair's rl and ref, then any `extra` models."""
        return cls([base, *(m for p in pairs for m in (p.rl, p.ref)), *extra], vocab=vocab, tokenizer=tokenizer)

    def index(self, model: CausalLM) -> int:
        return next(i for i, m in enumerate(self.models) if m is model)

    def combination(self, base: CausalLM, pairs: Sequence[Pair], schedule=None) -> Combination:
        """The combination of `base` and `pairs` over this ensemble's model indices;
        schedule: a λ-schedule spec ('warmup:N', ...) or a callable step -> multiplier."""
        schedule = schedule if callable(schedule) or schedule is None else make_lam_schedule(schedule)
        return Combination(self.index(base), tuple((self.index(p.rl), self.index(p.ref)) for p in pairs),
                           tuple(float(p.lam) for p in pairs), schedule)
