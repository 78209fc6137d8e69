#!/usr/bin/env python
"""Rebuild the embedded toy family from nothing (about 1–1.5 hours on 2 CPU cores).

    python train/build_toy_family.py --work build/toy --out jaxrast/toy/family

Stages (each skipped when its output already exists, so an interrupted build resumes):
  1. pretrain S (~0.1M params) and M (~0.8M) from scratch on the chain corpus
  2. GRPO S_base -> S_RL and M_base -> M_RL with the project's trainer (configs/grpo_toy_*.yaml)
  3. diagnostics of all four (style share, accuracy per style, per-op step accuracy)
  4. copy the four HF checkpoints to --out and write PROVENANCE.md there
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# S gets fewer steps on purpose: it should execute a step right only ~85-90% of the time,
# so that M's own competence, unlocked by ΔR_S, takes RAST above S_RL (the paper's point).
PRETRAIN = {"s_base": dict(size="S", lr=2e-3, steps=2000), "m_base": dict(size="M", lr=1e-3, steps=3000)}
GRPO = {"s_rl": ("s_base", "configs/grpo_toy_s.yaml"), "m_rl": ("m_base", "configs/grpo_toy_m.yaml")}
GRPO_ROWS_SEED = 101  # training problems for GRPO; the demo's held-out seed is jaxrast.toy.demo.HELD_OUT_SEED
KEEP = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def run(cmd: list[str], log: dict) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    log.setdefault("commands", []).append({"cmd": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="build/toy")
    ap.add_argument("--out", default="jaxrast/toy/family")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(work, "build_log.json")
    log = json.load(open(log_path)) if os.path.exists(log_path) else {}
    py = sys.executable

    for name, spec in PRETRAIN.items():
        if not os.path.exists(os.path.join(work, name, "model.safetensors")):
            run([py, "train/pretrain_toy.py", "--size", spec["size"], "--out", os.path.join(work, name),
                 "--steps", str(spec["steps"]), "--lr", str(spec["lr"]), "--seed", str(args.seed)], log)
    rows = os.path.join(work, "grpo_rows.jsonl")
    if not os.path.exists(rows):
        from jaxrast.toy.task import ChainTask
        with open(rows, "w") as f:
            for r in ChainTask().rows(4000, seed=GRPO_ROWS_SEED, id_prefix="train"):
                f.write(json.dumps(r) + "\n")
    for name, (base, config) in GRPO.items():
        out = os.path.join(work, "grpo_" + name)
        if not os.path.exists(os.path.join(out, "hf", "model.safetensors")):
            run([py, "-m", "jaxrast.cli", "train", "--config", config,
                 "--set", f"model.path={os.path.join(work, base)}",
                 "--set", f"data.source={rows}", "--set", f"output_dir={out}", "--set", "progress=false",
                 "--resume"], log)
    json.dump(log, open(log_path, "w"), indent=1)

    paths = {"s_base": os.path.join(work, "s_base"), "m_base": os.path.join(work, "m_base"),
             "s_rl": os.path.join(work, "grpo_s_rl", "hf"), "m_rl": os.path.join(work, "grpo_m_rl", "hf")}
    stats = diagnostics(paths)
    os.makedirs(args.out, exist_ok=True)
    for name, src in paths.items():
        dst = os.path.join(args.out, name)
        os.makedirs(dst, exist_ok=True)
        for f in KEEP:
            if os.path.exists(os.path.join(src, f)):
                shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    write_provenance(args, work, log, stats)
    print(json.dumps(stats, indent=1))


def diagnostics(paths: dict[str, str]) -> dict[str, dict]:
    from jaxrast.models.hf import load_model
    from jaxrast.rast.decoding import RAST
    from jaxrast.toy.demo import HELD_OUT_SEED
    from jaxrast.toy.stats import drill_accuracy, style_stats
    from jaxrast.toy.task import ChainTask

    task = ChainTask()
    rows = task.rows(500, HELD_OUT_SEED + 1)  # a seed of its own: not the demo's problems
    out = {}
    for name, path in paths.items():
        model, _, tok = load_model(path, progress=False)
        engine = RAST(model, tokenizer=tok, batch_size=1000)
        out[name] = {**style_stats(engine, task, rows, k=4), "drill_greedy": drill_accuracy(engine, task)}
    return out


def write_provenance(args, work: str, log: dict, stats: dict) -> None:
    lines = ["# Toy family provenance", "",
             "Four Qwen2-architecture HuggingFace checkpoints trained from scratch on the chain task",
             "(`jaxrast/toy/task.py`), CPU only. Rebuild everything with:", "",
             f"    python train/build_toy_family.py --work {os.path.relpath(work, ROOT)} --out {args.out}"
             f" --seed {args.seed}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.", "",
             "| stage | command | wall time (s) |", "|---|---|---|"]
    total = 0.0
    for name in PRETRAIN:  # read back from the checkpoint's own log
        meta = json.load(open(os.path.join(work, name, "pretrain_log.json")))
        cfg = meta["config"]
        cmd = (f"python train/pretrain_toy.py --size {cfg['size']} --out {os.path.relpath(work, ROOT)}/{name} "
               f"--steps {cfg['steps']} --lr {cfg['lr']} --seed {cfg['seed']}")
        last = meta["history"][-1]
        lines.append(f"| pretrain {name} (final loss {last['loss']:.3f}, drill digit acc. "
                     f"{last.get('drill_digit_acc', float('nan')):.3f}) | `{cmd}` | {meta['wall_seconds']:.0f} |")
        total += meta["wall_seconds"]
    for c in log.get("commands", []):
        if "pretrain_toy" not in c["cmd"]:
            cmd = c["cmd"].replace(sys.executable, "python").replace(work, os.path.relpath(work, ROOT))
            lines.append(f"| GRPO | `{cmd}` | {c['seconds']} |")
            total += c["seconds"]
    lines += ["", f"Total training wall time: {total / 60:.1f} minutes (measured on a shared 2-core machine; "
              "other jobs ran beside the M pretraining).", "",
              "Seeds: pretraining data/init seed as in the commands; GRPO rows: chain problems of seed "
              f"{GRPO_ROWS_SEED}; GRPO run seed: `seed` in `configs/grpo_toy_*.yaml`. The demo's held-out "
              "problems use a seed used nowhere here.", "",
              "Diagnostics on 500 problems × 4 samples (τ = 1, top-p 0.95) of another unused seed, and greedy "
              "single-step drills:", "",
              "| model | stepwise share | acc. stepwise | acc. direct | avg@4 | step acc. "
              "| drill + | drill − | drill × |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        d = s["drill_greedy"]
        pct = lambda x: "–" if x != x else f"{100 * x:.1f}%"  # noqa: E731  (nan: no such answers)
        lines.append(f"| {name} | {100 * s['stepwise_share']:.0f}% | {pct(s['acc_stepwise'])} | "
                     f"{pct(s['acc_direct'])} | {100 * s['avg']:.1f}% | {100 * s['step_accuracy']:.1f}% | "
                     f"{100 * d.get('+', 0):.0f}% | {100 * d.get('-', 0):.0f}% | {100 * d.get('*', 0):.0f}% |")
    with open(os.path.join(args.out, "PROVENANCE.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
