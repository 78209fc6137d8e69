"""The GRPO loop: rollout → rewards → group advantages → μ passes of clipped-ratio updates,
with a JSONL line per step and Orbax checkpoints that resume exactly.

Exact resume: a step's randomness is the rollout seed, drawn from the checkpointed RNG
key; the sampler's per-row streams depend only on (seed, row id, sample); the prompt
order depends only on (seed, epoch) and the checkpointed position; params and optimiser
state are restored bit for bit onto the same shardings. So steps after a restore replay
those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxrast.data.prompts import adds_special_tokens, encode_prompts, get_template, render
from jaxrast.grpo.batch import (
    PromptStream,
    RolloutArrays,
    build_rollout,
    pack_zero_advantage,
    rows_for,
    split_micro,
    usable_prompts,
)
from jaxrast.grpo.checkpoint import Checkpointer, abstract_like
from jaxrast.grpo.config import GRPOConfig
from jaxrast.grpo.log import MetricsLog
from jaxrast.grpo.losses import group_advantages, token_weights
from jaxrast.grpo.rewards import Reward, as_rewards, close_rewards, compute_rewards, resolve_rewards
from jaxrast.grpo.step import Batch, Programs, make_optimizer
from jaxrast.models.partitioning import shard_model
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.decoding import RAST, SamplingParams
from jaxrast.runtime.config import save_config, to_dict
from jaxrast.runtime.distributed import any_process, host_array, is_main
from jaxrast.runtime.files import DirectoryLock
from jaxrast.runtime.mesh import mesh_of

# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"steps", "progress", "output_dir", "save_every", "keep_checkpoints", "async_checkpointing",
                      "export_hf", "reward_workers"}


class NonFiniteError(ValueError):
    """A training step produced a NaN/inf loss, gradient norm or parameter."""


@jax.jit
def _all_finite(params) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class GRPOTrainer:
    """Owns the policy's training state; `run()` trains to `cfg.steps`.

    policy: the model to train (updated in place after every step, so the sampler and the
    caller see the new weights). ref: the frozen KL reference (only used when beta > 0;
    default: a copy of the initial policy). rows: data rows with the fields the prompt
    template and the rewards need.
    """

    def __init__(self, cfg: GRPOConfig, *, policy: CausalLM, tokenizer, rows: Sequence[Mapping[str, Any]],
                 rewards: Sequence[Reward], ref: CausalLM | None = None, mesh: Mesh | None = None):
        self.cfg = cfg.validate()
        if tokenizer is None:
            raise ValueError("GRPO needs the policy's tokenizer (prompts and rewards are text).")
        self.mesh = mesh if mesh is not None else mesh_of(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self.policy, self.tokenizer, self.rewards = shard_model(policy, self.mesh), tokenizer, list(rewards)
        template = get_template(cfg.data.template)
        texts = [render(template, row, tokenizer, cfg.data.system) for row in rows]
        encoded = encode_prompts(tokenizer, texts, special_tokens=adds_special_tokens(template))  # as decode does
        kept = usable_prompts(encoded, cfg.data.max_prompt_tokens)
        self.prompt_ids = [encoded[i] for i in kept]
        self.rows, self.prompts = [rows[i] for i in kept], [texts[i] for i in kept]
        self.stream = PromptStream(len(self.rows), seed=cfg.seed, shuffle=cfg.data.shuffle)
        longest = max(map(len, self.prompt_ids), default=1) + cfg.rollout.max_new_tokens
        self.sampler = RAST(policy, tokenizer=tokenizer, mesh=self.mesh, batch_size=cfg.rollout.batch_size,
                            max_len=-(-longest // 64) * 64)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        graphdef, params = nnx.split(policy)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.total_updates)
        self.programs = Programs(graphdef, params, self.tx, loss=cfg.loss, temperature=cfg.rollout.temperature,
                                 vocab=self.sampler.vocab, mesh=self.mesh, on_policy=cfg.on_policy,
                                 use_ref=cfg.loss.beta > 0,
                                 stats_from_rollout=cfg.loss.packs_zero_advantage and cfg.on_policy)
        self.params = jax.device_put(params, self.programs.param_shardings)
        self.opt_state = self.programs.init_opt(self.params)
        self.ref_params = self._reference(ref) if cfg.loss.beta > 0 else None
        self.step = 0
        self.key = jax.random.key(cfg.seed)
        self.ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpointing)
        self._saved_step = 0
        self._stop_requested = False

    def _reference(self, ref: CausalLM | None) -> nnx.State:
        if ref is None or ref is self.policy:  # the initial policy, copied before any update donates it
            return jax.tree.map(jnp.copy, self.params)
        state = nnx.state(shard_model(ref, self.mesh))
        shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)  # noqa: E731
        if jax.tree.structure(state) != jax.tree.structure(self.params) or \
                jax.tree.leaves(shapes(state)) != jax.tree.leaves(shapes(self.params)):
            raise ValueError("the reference model must have the policy's architecture and dtypes "
                             "(it is the policy's initial checkpoint).")
        return state

    # ---- checkpoints ----------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state}

    def save(self) -> None:
        meta = {"step": self.step, "rng_key": np.asarray(jax.random.key_data(self.key)).tolist(),
                "data": self.stream.state(), "config": to_dict(self.cfg)}
        self.ckpt.save(self.step, self._state(), meta)
        self._saved_step = self.step

    def restore(self) -> int | None:
        """Restores the newest intact checkpoint; returns its step (None: nothing to resume)."""
        shardings = {"params": self.programs.param_shardings, "opt_state": self.programs.opt_shardings}
        found = self.ckpt.restore_latest(abstract_like(self._state(), shardings))
        if found is None:
            return None
        step, state, meta = found
        self.params, self.opt_state = state["params"], state["opt_state"]
        nnx.update(self.policy, self.params)
        self.step = self._saved_step = step
        self.key = jax.random.wrap_key_data(np.asarray(meta["rng_key"], np.uint32))
        self.stream.load_state(meta["data"])
        self._check_config(meta.get("config", {}))
        return step

    def _check_config(self, saved: Mapping[str, Any]) -> None:
        now = to_dict(self.cfg)
        changed = sorted(k for k in set(now) | set(saved) if k not in _RESUMABLE_CHANGES and now.get(k) != saved.get(k))
        if changed:
            warnings.warn(f"resuming with a config that differs from the checkpoint's in {changed}; "
                          "the run will not replay an uninterrupted one.", stacklevel=3)

    # ---- one step -------------------------------------------------------------------------

    def _rollout(self, indices: list[int], seed: int):
        ro = self.cfg.rollout
        params = SamplingParams(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                max_new_tokens=ro.max_new_tokens, n=ro.group_size,
                                stop_strings=tuple(ro.stop_strings), seed=seed,
                                logprobs=not self.cfg.on_policy,  # on-policy ratios need no sampler log-probs
                                entropies=self.programs.stats_from_rollout)
        # row ids are positions in this step's batch: the seed already differs per step
        result = self.sampler.generate([self.prompt_ids[i] for i in indices], params,
                                       row_ids=list(range(len(indices))), progress=False)
        return [c for group in result for c in group]  # prompt-major

    def _optimise(self, arrays: RolloutArrays, advantages: np.ndarray) -> tuple[list[dict], dict[str, float]]:
        cfg, lo = self.cfg, self.cfg.loss
        rows, width_t = arrays.tokens.shape[0], arrays.completion_width
        put = lambda x: self.programs.put(split_micro(x, lo.micro_batch_size))  # noqa: E731
        score = lambda params: host_array(self.programs.score(  # noqa: E731
            params, put(arrays.tokens), put(arrays.mask), width_t=width_t)).reshape(rows, width_t)
        extra = {}
        zeros = np.zeros_like(arrays.sampler_logp)
        ref_logp = score(self.ref_params) if self.ref_params is not None else zeros
        old_logp = zeros
        if not cfg.on_policy:
            old_logp = arrays.sampler_logp if lo.old_logprobs == "sampler" else score(self.params)
            if lo.old_logprobs == "recompute" and cfg.rollout.temperature == 1.0:
                # the sampler's log-probs are of the τ=1 policy: the gap is a numerics health check
                gap = np.abs(old_logp - arrays.sampler_logp) * arrays.completion_mask
                extra["logprob_gap"] = float(gap.sum() / max(arrays.completion_mask.sum(), 1.0))
        size = rows // lo.mini_batches
        batches = []  # built and placed once, reused by every one of the μ passes
        for j in range(lo.mini_batches):
            rows_j = np.arange(j * size, (j + 1) * size)
            weights = token_weights(arrays.completion_mask[rows_j], lo.aggregation, cfg.rollout.max_new_tokens)
            order, active = pack_zero_advantage(advantages[rows_j], lo.micro_batch_size,
                                                enabled=lo.packs_zero_advantage)
            part = rows_j[order]
            batches.append(Batch(tokens=put(arrays.tokens[part]), mask=put(arrays.mask[part]),
                                 completion_mask=put(arrays.completion_mask[part]), weights=put(weights[order]),
                                 advantages=put(advantages[part].astype(np.float32)),
                                 old_logp=put(old_logp[part]), ref_logp=put(ref_logp[part]),
                                 entropy=put(arrays.sampler_entropy[part]), active=active))
        metrics = []
        updates_before = (self.step - 1) * lo.iterations * lo.mini_batches
        for it in range(lo.iterations):
            for j, batch in enumerate(batches):
                self.params, self.opt_state, m = self.programs.update(self.params, self.opt_state, batch)
                m["lr"] = self.schedule(updates_before + it * lo.mini_batches + j)
                metrics.append(m)
        return host_array(metrics), extra

    def train_step(self) -> dict[str, Any]:
        """One rollout batch and its updates; returns the step's metrics."""
        cfg, ro = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        self.step += 1
        indices = self.stream.take(ro.prompts_per_step)
        self.key, sub = jax.random.split(self.key)
        completions = self._rollout(indices, int(jax.random.randint(sub, (), 0, 2**31 - 1)))
        t_rollout = time.perf_counter()

        prompts = [self.prompts[i] for i in indices for _ in range(ro.group_size)]
        total, parts = compute_rewards(self.rewards, prompts, [c.text for c in completions],
                                       rows_for(self.rows, indices, ro.group_size))
        advantages, zero_var = group_advantages(total.reshape(-1, ro.group_size), scale=cfg.loss.scale_rewards,
                                                eps=cfg.loss.adv_eps)
        arrays = build_rollout([self.prompt_ids[i] for i in indices for _ in range(ro.group_size)],
                               [c.token_ids for c in completions], [c.logprobs for c in completions],
                               pad_id=self.pad_id, max_new_tokens=ro.max_new_tokens,
                               sampler_entropy=[c.entropies for c in completions])
        t_update = time.perf_counter()
        updates, extra = self._optimise(arrays, advantages.reshape(-1))
        nnx.update(self.policy, self.params)  # the sampler reads the new weights next step
        t_end = time.perf_counter()

        lengths = np.array([c.num_tokens for c in completions])
        mean = lambda key: float(np.mean([u[key] for u in updates]))  # noqa: E731
        metrics: dict[str, Any] = {
            "step": self.step, "reward_mean": float(total.mean()), "reward_std": float(total.std()),
            **({"accuracy": float(parts["math"].mean())} if "math" in parts else {}),
            **{f"reward/{name}": float(v.mean()) for name, v in parts.items()},
            "zero_std_frac": float(zero_var.mean()),
            "loss": mean("loss"), "kl": mean("kl"), "clip_frac": mean("clip_frac"), "clip_low": mean("clip_low"),
            "clip_high": mean("clip_high"), "ratio": mean("ratio"), "entropy": mean("entropy"),
            "response_len_mean": float(lengths.mean()),
            "truncated_frac": float(np.mean([c.finish_reason == "length" for c in completions])),
            "grad_norm": mean("grad_norm"), "lr": float(updates[-1]["lr"]), **extra,
            "tokens": int(lengths.sum()), "tokens_per_s": float(lengths.sum() / (t_end - t0)),
            "rollout_time": t_rollout - t0, "update_time": t_end - t_update, "step_time": t_end - t0,
        }
        return metrics

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Trains from the current step to cfg.steps; returns the metrics of the steps run.

        Checkpoints every `save_every` steps and at exit. SIGTERM / Ctrl-C finish the
        current step, save and return (a second Ctrl-C aborts at once).
        """
        cfg, main = self.cfg, is_main()
        if main:  # in a multi-process run process 0 writes the files; orbax coordinates checkpoints
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=self.step, enabled=main)
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="grpo", unit="step", disable=not (cfg.progress and main))
        restore_signals = self._catch_signals()
        try:
            # all processes must stop at the same step, even if a signal reached only some of them
            while self.step < cfg.steps and not any_process(self._stop_requested):
                metrics = self.train_step()
                history.append(metrics)
                log.write(metrics)
                self._check_finite(metrics)  # before any checkpoint of this step is written
                bar.update()
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                                len=f"{metrics['response_len_mean']:.0f}")
                if self.step % cfg.save_every == 0:
                    self.save()
            if self.step > self._saved_step:
                self.save()
        finally:
            restore_signals()
            bar.close()
            self.ckpt.wait()
        if cfg.export_hf and self.step >= cfg.steps:
            self.export(os.path.join(cfg.output_dir, "hf"))
        return history

    def _check_finite(self, metrics: dict[str, Any]) -> None:
        """Stops the run (NonFiniteError) when the step's loss or gradient norm, or the
        updated parameters, are NaN/inf: saving them would replace the last good checkpoint
        with one that decodes nothing. The step's metrics line is kept for the diagnosis."""
        bad = [k for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])]
        if not bad and not bool(host_array(_all_finite(self.params))):
            bad = ["parameters"]
        if bad:
            kept = (f"The last good checkpoint, step {self._saved_step} in {self.ckpt.directory}, is kept"
                    if self._saved_step else "No checkpoint had been written yet")
            raise NonFiniteError(
                f"step {self.step}: {' and '.join(bad)} became NaN or infinite "
                f"({', '.join(f'{k}={metrics[k]}' for k in ('loss', 'grad_norm'))}); stopped before writing a "
                f"checkpoint of it. {kept}. Lower optim.lr, check the rewards, or keep max_grad_norm > 0, then "
                "rerun (with --resume to continue from the last good checkpoint).")

    def export(self, directory: str) -> str:
        """Writes the policy as a HuggingFace checkpoint (usable as `rl` in decode, transformers, vLLM)."""
        from jaxrast.models.hf import save_hf
        return save_hf(self.policy, self.tokenizer, directory, source=self.cfg.model.path or None)

    def close(self) -> None:
        self.ckpt.close()
        close_rewards(self.rewards)

    def _catch_signals(self):
        """Turns the first SIGINT/SIGTERM into "stop after this step"; returns an undo function."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            tqdm.write(f"signal {signum}: finishing step {self.step + 1}, then saving a checkpoint")

        for s in previous:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def train(cfg: GRPOConfig, *, policy: CausalLM, tokenizer, rows: Sequence[Mapping[str, Any]],
          reward_fns: Sequence[Any] | None = None, ref: CausalLM | None = None, mesh: Mesh | None = None,
          resume: bool = False) -> list[dict[str, Any]]:
    """Trains `policy` in place with GRPO; returns the metrics of each step run.

    reward_fns: Reward objects, callables `fn(prompts, completions, **row_columns)`,
    `(fn, weight)` or `(name, fn, weight)`; default: `cfg.rewards` ("math" and/or
    "module:function" names). resume: continue from the newest intact checkpoint in
    `cfg.output_dir` (starting fresh if there is none); without it an output_dir that
    already holds checkpoints is an error.
    """
    # one writer per output_dir: a second process training into it is refused (process 0 holds the lock)
    with DirectoryLock(cfg.output_dir, "output_dir") if is_main() else contextlib.nullcontext():
        workers = cfg.reward_workers
        rewards = (resolve_rewards(cfg.rewards, workers=workers) if reward_fns is None
                   else as_rewards(reward_fns, workers=workers))
        trainer = GRPOTrainer(cfg, policy=policy, tokenizer=tokenizer, rows=rows, rewards=rewards, ref=ref, mesh=mesh)
        try:
            if resume:
                step = trainer.restore()
                tqdm.write(f"resumed from step {step}" if step is not None else
                           "no checkpoint to resume; starting fresh")
            elif trainer.ckpt.steps():
                raise ValueError(f"{cfg.output_dir} already holds checkpoints (steps {trainer.ckpt.steps()}); "
                                 "pass --resume (resume=True) to continue, or choose another output_dir.")
            return trainer.run()
        finally:
            trainer.close()

