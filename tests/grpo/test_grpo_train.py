"""GRPO end to end in-process: learning on a toy task, HF export parity, mesh invariance,
checkpoint fallback, config errors."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from grpo_toy import MAX_NEW, a_reward, toy_policy, toy_rows
from hf_fixtures import SMALL

from jaxrast.grpo.config import DataSpec, GRPOConfig, LossSpec, MeshSpec, OptimSpec, RolloutSpec
from jaxrast.grpo.log import TIMING_KEYS, read_metrics
from jaxrast.grpo.rewards import as_rewards
from jaxrast.grpo.trainer import GRPOTrainer, train
from jaxrast.models.hf import load_model
from jaxrast.runtime.mesh import make_mesh


def toy_config(out, **kw) -> GRPOConfig:
    base = dict(data=DataSpec(template="{question}"),
                rollout=RolloutSpec(prompts_per_step=8, group_size=8, max_new_tokens=MAX_NEW, batch_size=64),
                loss=LossSpec(micro_batch_size=16), optim=OptimSpec(lr=1e-2), mesh=MeshSpec(1, 1, 1),
                steps=30, output_dir=str(out), save_every=100, progress=False)
    base.update(kw)
    return GRPOConfig(**base)


def same_metrics(a: dict, b: dict, tol: float, rel: float = 0.0) -> None:
    keys = set(a) - set(TIMING_KEYS)
    assert keys == set(b) - set(TIMING_KEYS)
    for k in keys:
        assert a[k] == pytest.approx(b[k], abs=tol, rel=rel), k


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """30 steps of the toy task, checkpointed every 10: (history, trained policy, tokenizer,
    output dir). The checkpoint tests work on copies of its output dir."""
    out = tmp_path_factory.mktemp("learn")
    policy, tok = toy_policy(seed=0)
    history = train(toy_config(out, save_every=10), policy=policy, tokenizer=tok, rows=toy_rows(),
                    reward_fns=[a_reward])
    return history, policy, tok, out


def test_reward_rises_on_a_toy_task(learned):
    history, _, _, out = learned
    rewards = [m["reward_mean"] for m in history]
    print("reward curve:", " ".join(f"{r:.2f}" for r in rewards))
    assert len(history) == 30 and [m["step"] for m in history] == list(range(1, 31))
    start, end = np.mean(rewards[:3]), np.mean(rewards[-5:])
    assert start < 0.2 and end > 0.8, (start, end)
    assert history[-1]["entropy"] < history[0]["entropy"]
    assert [m["step"] for m in read_metrics(os.path.join(out, "metrics.jsonl"))] == list(range(1, 31))
    for key in ("reward_std", "kl", "clip_frac", "entropy", "response_len_mean", "grad_norm", "lr",
                "tokens_per_s", "step_time", "zero_std_frac"):
        assert np.isfinite(history[0][key]), key


def test_exported_checkpoint_matches_policy_in_transformers(learned):
    import torch
    from transformers import AutoModelForCausalLM

    _, policy, tok, out = learned
    hf_dir = os.path.join(out, "hf")  # written by train() at the end (export_hf)
    ids = tok("bcdaaaa" + "efgh", add_special_tokens=False)["input_ids"]
    forward = nnx.jit(lambda model, x: model(x)[0])  # one compile, not one per op
    ours = np.asarray(forward(policy, jax.numpy.asarray([ids])))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    print("export max |logit diff|:", np.abs(ours - theirs).max())
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # and it loads back as a jaxrast model (the `rl` of a RAST pair)
    again, _, tok2 = load_model(hf_dir)
    np.testing.assert_allclose(np.asarray(forward(again, jax.numpy.asarray([ids]))), ours, atol=1e-5)
    assert tok2("bcdaaaa", add_special_tokens=False)["input_ids"] == ids[:7]


@pytest.mark.slow
def test_first_step_is_mesh_and_micro_batch_invariant(ckpt_dir, tmp_path):
    """The first step's metrics (loss, KL with β>0, μ=2 with recomputed old log-probs) on one
    device equal those on a 4-device mesh (data and fsdp axes) with smaller micro-batches
    (accumulation). Each case compiles its own programs, so one mesh case covers both: a
    difference from either shows there."""
    path = ckpt_dir("qwen2", **SMALL)
    cases = {"1 device": (MeshSpec(1, 1, 1), 16), "data=2,fsdp=2, micro=4": (MeshSpec(2, 2, 1), 4)}
    results = {}
    for name, (spec, micro) in cases.items():
        mesh = make_mesh(spec.data, spec.fsdp, spec.tensor, devices=jax.devices()[:spec.data * spec.fsdp])
        policy, _, tok = load_model(path, mesh=mesh)
        cfg = toy_config(tmp_path / name.replace(" ", "_").replace(",", "_"), steps=1, export_hf=False,
                         loss=LossSpec(micro_batch_size=micro, beta=0.05, iterations=2))
        results[name] = train(cfg, policy=policy, tokenizer=tok, rows=toy_rows(), reward_fns=[a_reward],
                              mesh=mesh)[0]
    ref = results["1 device"]
    assert ref["kl"] > 0 and ref["loss"] != 0
    for name, m in results.items():
        print(f"{name}: loss {m['loss']:.8f} (diff {abs(m['loss'] - ref['loss']):.2e})")
        assert m["response_len_mean"] == ref["response_len_mean"] and m["reward_mean"] == ref["reward_mean"]
        assert m["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        same_metrics(m, ref, 1e-5, rel=1e-5)  # float32 sums in another order: grad_norm ~10 differs by ~5e-6


def half_constant(prompts, completions, id, **_):
    """Even prompt ids: the same reward for every completion (a zero-variance group)."""
    return [0.5 if int(i) % 2 == 0 else c.count("a") / MAX_NEW for c, i in zip(completions, id)]


def test_skipping_zero_advantage_rows_changes_nothing(tmp_path):
    """Micro-batches whose rows all have advantage 0 skip the backward: the params and
    every metric after two steps equal those of a run that back-propagates everything."""
    runs = {}
    for skip in (True, False):
        policy, tok = toy_policy(seed=0)
        cfg = toy_config(tmp_path / f"skip_{skip}", steps=2, export_hf=False,
                         loss=LossSpec(micro_batch_size=8, skip_zero_advantage=skip))
        history = train(cfg, policy=policy, tokenizer=tok, rows=toy_rows(), reward_fns=[half_constant])
        runs[skip] = history, jax.tree.leaves(nnx.state(policy, nnx.Param))
    (on, params_on), (off, params_off) = runs[True], runs[False]
    assert on[0]["zero_std_frac"] >= 0.5
    for a, b in zip(on, off):
        same_metrics(a, b, 1e-6, rel=1e-6)
    for a, b in zip(params_on, params_off):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def copy_run(learned, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(learned[3], out, ignore=shutil.ignore_patterns("hf"))
    return out


def test_corrupt_newest_checkpoint_falls_back(learned, tmp_path):
    out, full = copy_run(learned, tmp_path), learned[0]
    # flip one byte of the largest array file of step 30: Orbax alone would restore it silently
    step_dir = out / "checkpoints" / "30" / "state"
    target = max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=os.path.getsize)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    policy, tok = toy_policy()
    trainer = GRPOTrainer(toy_config(out, save_every=10), policy=policy, tokenizer=tok, rows=toy_rows(),
                          rewards=as_rewards([a_reward]))
    with pytest.warns(UserWarning, match="step 30 .* corrupt"):
        assert trainer.restore() == 20
    assert trainer.ckpt.steps() == [10, 20]
    assert [p.name.split("-")[0] for p in (out / "checkpoints.corrupt").iterdir()] == ["30"]  # kept aside
    replay = trainer.run()  # steps 21..30 again, identical to the first run
    trainer.close()
    assert [m["step"] for m in replay] == list(range(21, 31))
    for again, first in zip(replay, full[20:]):
        same_metrics(again, first, 1e-6)
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == list(range(1, 31))


def test_resume_with_a_changed_optimiser_is_refused_and_deletes_nothing(learned, tmp_path):
    """Without clipping the optimiser state has other arrays: that is a config error, not
    corruption, so every checkpoint and the metrics stay as they were."""
    out = copy_run(learned, tmp_path)
    metrics = (out / "metrics.jsonl").read_text()
    changed = toy_config(out, steps=40, save_every=10, optim=OptimSpec(lr=1e-2, max_grad_norm=0.0))
    policy, tok = toy_policy()
    with pytest.raises(ValueError, match="other arrays than this run builds.*Nothing was deleted"):
        train(changed, policy=policy, tokenizer=tok, rows=toy_rows(), reward_fns=[a_reward], resume=True)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20, 30]
    assert (out / "metrics.jsonl").read_text() == metrics


def test_existing_checkpoints_need_resume_and_bad_configs_are_named(learned, tmp_path):
    out = copy_run(learned, tmp_path)
    cfg = toy_config(out, save_every=10)
    policy, tok = toy_policy()
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, policy=policy, tokenizer=tok, rows=toy_rows(), reward_fns=[a_reward])
    with pytest.raises(ValueError, match="module:function"):
        train(cfg, policy=policy, tokenizer=tok, rows=toy_rows(), reward_fns=["no_such_reward"])
    for bad, match in [(dict(loss=LossSpec(micro_batch_size=5)), "micro_batch_size"),
                       (dict(rollout=RolloutSpec(group_size=1)), "group_size"),
                       (dict(loss=LossSpec(old_logprobs="sampler"), rollout=RolloutSpec(temperature=0.7)),
                        "recompute")]:
        with pytest.raises(ValueError, match=match):
            toy_config(tmp_path, **bad).validate()


def test_new_rollout_seeds_do_not_recompile_the_sampler():
    """Every GRPO step samples with a new seed; the seed must not be a jit cache key."""
    from jaxrast.rast.decoding import RAST, SamplingParams

    policy, tok = toy_policy()
    engine = RAST(policy, tokenizer=tok, batch_size=8, max_len=64)
    runs = [engine.generate(["bcd"], SamplingParams(max_new_tokens=4, n=4, seed=s)) for s in range(3)]
    programs = engine.scheduler.groups[0].engine
    assert programs._decode._cache_size() == 1 and programs._admit._cache_size() == 1
    assert len({tuple(c.token_ids) for run in runs for c in run[0]}) > 1
