"""`jaxrast demo`: the paper's table on the shipped toy family, in minutes on a CPU.

Rows: S_base, S_RL, M_base, M_base + λ·(S_RL − S_base) (RAST) and M_RL, each decoded on
held-out chain problems (a data seed never used in training) with k samples per problem;
columns avg@k, pass@k, the share of careful (stepwise) answers and the arithmetic accuracy
of the written steps; then the recovery rate RR, a pass@k plot and a λ-sweep plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from importlib import resources
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from jaxrast.eval import metrics
from jaxrast.eval.metrics import default_ks, recovery_rate
from jaxrast.runtime.config import Finite, NonNegative, Positive, config_dataclass
from jaxrast.toy.task import ChainTask

FAMILY = ("s_base", "s_rl", "m_base", "m_rl")
HELD_OUT_SEED = 777_001  # problems of this seed are never seen in pretraining or GRPO


@config_dataclass
class DemoConfig:
    family: str | None = None  # directory with s_base/ s_rl/ m_base/ m_rl/; default: shipped
    problems: Positive = 1000
    k: Positive = 8  # samples per problem: avg@k and pass@1..k (--k 16: pass@16, ~3 min)
    lam: Finite = 1.0
    sweep: tuple[Finite, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    sweep_problems: Positive = 250
    sweep_k: Positive = 4
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0  # sampling seed
    data_seed: NonNegative = HELD_OUT_SEED
    temperature: Finite = 1.0
    top_p: Finite = 0.95
    max_new_tokens: Positive = 64
    batch_size: Positive = 1000
    speculative: NonNegative = 0  # γ for the RAST rows (exact: the same law, drafted by S_RL)
    out_dir: str = "jaxrast_demo"
    json: str | None = None


def family_dir(path: str | None = None) -> str:
    if path:
        return path
    return str(resources.files("jaxrast").joinpath("toy", "family"))


def load_family(path: str | None = None) -> dict[str, tuple]:
    """name -> (model, tokenizer) for the four checkpoints of the family."""
    from jaxrast.models.hf import load_model

    root = family_dir(path)
    missing = [n for n in FAMILY if not os.path.exists(os.path.join(root, n, "config.json"))]
    if missing:
        raise FileNotFoundError(f"toy family at {root} lacks {missing}; rebuild it with "
                                "train/build_toy_family.py (see jaxrast/toy/family/PROVENANCE.md).")
    out = {}
    for name in FAMILY:
        model, _, tok = load_model(os.path.join(root, name), progress=False)
        out[name] = (model, tok)
    return out


def grade(task: ChainTask, rows: list[dict], completions: list[list]) -> dict[str, Any]:
    """Per-problem correctness plus style and step statistics over all samples."""
    correct = [[task.is_correct(c.text, r["answer"]) for c in samples] for r, samples in zip(rows, completions)]
    styles = [task.style(c.text) for samples in completions for c in samples]
    steps = [task.step_accuracy(c.text) for samples in completions for c in samples]
    ok, total = sum(s[0] for s in steps), sum(s[1] for s in steps)
    return {"correct": correct, "stepwise_share": styles.count("stepwise") / max(len(styles), 1),
            "step_accuracy": ok / total if total else float("nan")}


def summarise(correct: list[list[bool]], ks: list[int]) -> dict[str, float]:
    """avg@k and pass@k of per-problem correctness lists, by `jaxrast.eval.metrics`."""
    summary = metrics.summarise([metrics.ProblemResult(str(i), tuple(c), (None,) * len(c))
                                 for i, c in enumerate(correct)], ks)
    return {"avg": next(v for k, v in summary["metrics"].items() if k.startswith("avg")),
            **{f"pass@{k}": summary["pass_at_k"][str(k)] for k in ks}}


def run_demo(cfg: DemoConfig, progress: bool = True, log=print) -> dict[str, Any]:
    from jaxrast.rast.decoding import RAST, Pair, SamplingParams

    t0 = time.perf_counter()
    task = ChainTask()
    family = load_family(cfg.family)
    (s_base, tok), (s_rl, _), (m_base, _), (m_rl, _) = (family[n] for n in FAMILY)
    rows = task.rows(cfg.problems, cfg.data_seed, id_prefix="heldout")
    prompts = [r["question"] for r in rows]
    ks = default_ks(cfg.k)  # powers of two and k itself: pass@k is always shown
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            n=cfg.k, seed=cfg.seed)
    systems = {
        "S_base": RAST(s_base, tokenizer=tok, batch_size=cfg.batch_size),
        "S_RL": RAST(s_rl, tokenizer=tok, batch_size=cfg.batch_size),
        "M_base": RAST(m_base, tokenizer=tok, batch_size=cfg.batch_size),
        "M_base + ΔR_S (RAST)": RAST(m_base, [Pair(s_rl, s_base, cfg.lam)], tokenizer=tok, batch_size=cfg.batch_size,
                                     speculative=cfg.speculative),
        "M_RL": RAST(m_rl, tokenizer=tok, batch_size=cfg.batch_size),
    }
    table = []
    for name, engine in systems.items():
        t = time.perf_counter()
        graded = grade(task, rows, engine.generate(prompts, params, progress=progress))
        entry = {"name": name, **summarise(graded["correct"], ks), "stepwise_share": graded["stepwise_share"],
                 "step_accuracy": graded["step_accuracy"], "seconds": time.perf_counter() - t}
        table.append(entry)
        log(f"  {name:22s} avg@{cfg.k} {100 * entry['avg']:5.1f}  ({entry['seconds']:.1f}s)")
    by = {e["name"]: e for e in table}
    rr = recovery_rate(by["M_base"]["avg"], by["M_base + ΔR_S (RAST)"]["avg"], by["M_RL"]["avg"])

    # λ sweep: one compiled RAST program, λ changed between calls.
    sweep_engine = systems["M_base + ΔR_S (RAST)"]
    sweep_rows = rows[: cfg.sweep_problems]
    sweep_params = dataclasses.replace(params, n=cfg.sweep_k)
    sweep = []
    for lam in cfg.sweep:
        sweep_engine.lams = np.array([lam], np.float32)
        graded = grade(task, sweep_rows, sweep_engine.generate([r["question"] for r in sweep_rows], sweep_params,
                                                               progress=False))
        sweep.append({"lam": lam, "avg": summarise(graded["correct"], [])["avg"],
                      "stepwise_share": graded["stepwise_share"]})
    sweep_engine.lams = np.array([cfg.lam], np.float32)

    os.makedirs(cfg.out_dir, exist_ok=True)
    plots = {"pass_at_k": os.path.join(cfg.out_dir, "pass_at_k.png"),
             "lambda_sweep": os.path.join(cfg.out_dir, "lambda_sweep.png")}
    _plot_pass_at_k(table, ks, plots["pass_at_k"], cfg)
    _plot_sweep(sweep, by, plots["lambda_sweep"], cfg)
    result = {"config": {k: v for k, v in dataclasses.asdict(cfg).items()}, "k": cfg.k, "rows": table,
              "recovery_rate": rr, "lambda_sweep": sweep, "plots": plots,
              "seconds": time.perf_counter() - t0}
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def format_table(result: dict[str, Any]) -> str:
    k = result["k"]
    ks = [key for key in result["rows"][0] if key.startswith("pass@")]
    head = f"| model | avg@{k} | " + " | ".join(ks) + " | stepwise | step acc. |"
    lines = [head, "|" + "---|" * (4 + len(ks))]
    for e in result["rows"]:
        cells = [f"{100 * e['avg']:.1f}"] + [f"{100 * e[x]:.1f}" for x in ks]
        cells += [f"{100 * e['stepwise_share']:.0f}%", f"{100 * e['step_accuracy']:.1f}%"]
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    rr = result["recovery_rate"]
    lines.append(f"\nRecovery rate RR = (RAST − M_base) / (M_RL − M_base) = "
                 f"{'n/a' if rr is None else f'{100 * rr:.1f}%'}")
    sweep = " ".join(f"λ={s['lam']:g}:{100 * s['avg']:.1f}" for s in result["lambda_sweep"])
    lines.append(f"λ sweep (avg@{result['config']['sweep_k']}, {result['config']['sweep_problems']} problems): {sweep}")
    return "\n".join(lines)


def _axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(6, 4))


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pass_at_k(table, ks, path, cfg) -> None:
    fig, ax = _axes()
    for e in table:
        ax.plot(ks, [100 * e[f"pass@{k}"] for k in ks], marker="o", label=e["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    _finish(fig, ax, path, "k", "pass@k (%)", f"Toy chain task, {cfg.problems} held-out problems")


def _plot_sweep(sweep, by, path, cfg) -> None:
    fig, ax = _axes()
    ax.plot([s["lam"] for s in sweep], [100 * s["avg"] for s in sweep], marker="o", label="M_base + λ·ΔR_S")
    for name, style in (("M_base", ":"), ("M_RL", "--"), ("S_RL", "-.")):
        ax.axhline(100 * by[name]["avg"], linestyle=style, color="gray", label=f"{name} (avg@{cfg.k})")
    _finish(fig, ax, path, "λ", f"avg@{cfg.sweep_k} (%)", f"λ sweep, {cfg.sweep_problems} held-out problems")
