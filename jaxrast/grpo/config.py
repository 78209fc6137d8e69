"""`GRPOConfig`: every setting of a GRPO run, read from YAML by `jaxrast.runtime.config`.

Sections nest (`rollout.group_size: 8`, overrides `--set optim.lr=1e-6`). One *step* is
one rollout batch (prompts_per_step × group_size completions) followed by
`loss.iterations` (μ) passes over it, each pass `loss.mini_batches` optimiser updates,
each update accumulated over micro-batches of `loss.micro_batch_size` sequences.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated

from pydantic import Field

from jaxrast.grpo.losses import AGGREGATIONS
from jaxrast.runtime.config import Finite, MeshSize, NonNegative, Positive, Texts, config_dataclass

DTYPES = ("float32", "bfloat16", "float16")


@config_dataclass
class ModelSpec:
    path: str = ""  # HF checkpoint (dir or cached hub id): the policy's initial weights
    ref_path: str = ""  # frozen KL reference; default: `path`. Loaded only when loss.beta > 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage of params and optimiser state ("bfloat16" halves memory)
    remat: bool = False  # recompute each block's activations in the backward pass


@config_dataclass
class DataSpec:
    source: str = ""  # benchmark name, .jsonl file, `datasets` directory or hub name
    fields: dict[str, str | None] = field(default_factory=dict)  # FieldMap: id/question/answer/answer_format
    split: str = "train"  # split of a `datasets` source
    template: str = "paper"  # prompt template name ("chat": the tokenizer's) or format string over row fields
    system: str | None = None  # with template "chat": the system turn
    max_prompt_tokens: Positive = 512  # longer prompts are dropped (with a warning)
    shuffle: bool = True  # visit rows in a seeded random order, re-shuffled every epoch


@config_dataclass
class RolloutSpec:
    prompts_per_step: Positive = 8
    group_size: Positive = 8  # G completions per prompt
    temperature: Finite = 1.0
    top_p: Finite = 1.0
    top_k: NonNegative = 0
    max_new_tokens: Positive = 256
    stop_strings: Texts = ()
    batch_size: Positive = 64  # sampler rows decoded together


@config_dataclass
class LossSpec:
    epsilon_low: Finite = 0.2
    epsilon_high: Finite = 0.2  # > epsilon_low: DAPO clip-higher
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | dr_grpo
    scale_rewards: bool = True  # divide advantages by the group std (False: Dr. GRPO)
    adv_eps: Annotated[Finite, Field(gt=0)] = 1e-6
    beta: Annotated[Finite, Field(ge=0)] = 0.0  # KL weight; 0 neither loads nor runs the reference
    iterations: Positive = 1  # μ: optimisation passes over each rollout batch
    mini_batches: Positive = 1  # optimiser updates per pass
    micro_batch_size: Positive = 8  # sequences per forward/backward (gradient accumulation)
    # With beta = 0 a row whose advantage is 0 (a group with equal rewards) has exactly zero
    # gradient: rows are packed so such rows fill whole micro-batches, which skip the
    # backward. On-policy they skip the forward too: the sampler records the policy's
    # entropies, the only statistic not known in advance. Same update, less compute.
    skip_zero_advantage: bool = True
    # Old log-probs for the ratio when μ > 1 or mini_batches > 1: "recompute" scores the
    # rollout with a training-dtype forward before the first update (exact, and right for
    # τ != 1); "sampler" reuses the decoder's (τ = 1 only). On-policy runs need neither.
    old_logprobs: str = "recompute"

    @property
    def packs_zero_advantage(self) -> bool:
        """skip_zero_advantage in effect: a zero advantage means a zero gradient only without KL."""
        return self.skip_zero_advantage and self.beta == 0


@config_dataclass
class OptimSpec:
    lr: Finite = 1e-6
    warmup_steps: NonNegative = 0  # optimiser updates of linear warm-up from 0
    min_lr_ratio: Finite = 0.0  # cosine decays to lr * min_lr_ratio at the last update
    weight_decay: Annotated[Finite, Field(ge=0)] = 0.0  # AdamW decay of matrices (not of norms and biases)
    b1: Finite = 0.9
    b2: Finite = 0.999
    eps: Annotated[Finite, Field(gt=0)] = 1e-8
    max_grad_norm: Annotated[Finite, Field(ge=0)] = 1.0  # global-norm clipping; 0 disables


@config_dataclass
class MeshSpec:
    data: MeshSize = 1
    fsdp: MeshSize = -1  # -1: all remaining devices
    tensor: MeshSize = 1


@config_dataclass
class GRPOConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    mesh: MeshSpec = field(default_factory=MeshSpec)
    # reward name -> weight; "math" = rule-based correctness (1/0) against the row's answer,
    # "package.module:function" = any fn(prompts, completions, **row_columns) -> list[float]
    rewards: dict[str, Finite] = field(default_factory=lambda: {"math": 1.0})
    reward_workers: NonNegative | None = None  # grading processes for "math" (None: all cores)
    steps: Positive = 100
    seed: NonNegative = 0
    output_dir: str = "runs/grpo"
    save_every: Positive = 50  # checkpoint every N steps (and always at exit)
    keep_checkpoints: Positive = 3
    async_checkpointing: bool = True
    export_hf: bool = True  # write the final policy to output_dir/hf (save_hf)
    progress: bool = True

    @property
    def rollout_size(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size

    @property
    def total_updates(self) -> int:
        return self.steps * self.loss.iterations * self.loss.mini_batches

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the old policy is the current one (ratio exactly 1)."""
        return self.loss.iterations == 1 and self.loss.mini_batches == 1

    def validate(self) -> "GRPOConfig":
        """Raises ValueError naming the setting and the fix; returns self."""
        r, lo, o = self.rollout, self.loss, self.optim
        checks = [
            (r.group_size >= 2, "rollout.group_size must be >= 2: advantages compare completions within a group"),
            (r.prompts_per_step >= 1 and r.max_new_tokens >= 1 and r.batch_size >= 1,
             "rollout.prompts_per_step, max_new_tokens and batch_size must be >= 1"),
            (lo.aggregation in AGGREGATIONS, f"loss.aggregation must be one of {AGGREGATIONS}"),
            (lo.iterations >= 1 and lo.mini_batches >= 1, "loss.iterations and loss.mini_batches must be >= 1"),
            (self.rollout_size % lo.mini_batches == 0,
             f"prompts_per_step × group_size = {self.rollout_size} must be divisible by loss.mini_batches "
             f"= {lo.mini_batches}"),
            (lo.micro_batch_size >= 1 and (self.rollout_size // lo.mini_batches) % lo.micro_batch_size == 0,
             f"each mini-batch has {self.rollout_size // max(lo.mini_batches, 1)} sequences; "
             f"loss.micro_batch_size = {lo.micro_batch_size} must divide it"),
            (0 <= lo.epsilon_low < 1 and lo.epsilon_high >= 0, "need 0 <= loss.epsilon_low < 1 and epsilon_high >= 0"),
            (lo.beta >= 0, "loss.beta must be >= 0"),
            (lo.old_logprobs in ("recompute", "sampler"), "loss.old_logprobs must be 'recompute' or 'sampler'"),
            (lo.old_logprobs != "sampler" or (r.temperature == 1.0 and r.top_p == 1.0 and r.top_k == 0),
             "loss.old_logprobs=sampler needs temperature 1 and no top-p/top-k (the sampler's log-probs are "
             "of the unfiltered τ=1 policy); use old_logprobs=recompute"),
            (r.temperature > 0, "rollout.temperature must be > 0 for GRPO (greedy groups have no variance)"),
            (0 < r.top_p <= 1 and r.top_k >= 0, "need 0 < rollout.top_p <= 1 and rollout.top_k >= 0 (0: off)"),
            (o.lr > 0 and o.warmup_steps >= 0 and 0 <= o.min_lr_ratio <= 1, "need optim.lr > 0, "
             "warmup_steps >= 0 and 0 <= min_lr_ratio <= 1"),
            (self.steps >= 1 and self.save_every >= 1 and self.keep_checkpoints >= 1,
             "steps, save_every and keep_checkpoints must be >= 1"),
            (bool(self.rewards), "rewards is empty; give at least one (e.g. {math: 1.0})"),
            (self.model.dtype in DTYPES and self.model.param_dtype in DTYPES,
             f"model.dtype and model.param_dtype must be one of {DTYPES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad GRPO config: {message}.")
        return self
