"""Diagnostics of a toy model: answer style, accuracy per style, per-operation step accuracy.

The recipe's lesson: watch the per-step accuracy, not only the reward — an RL run that
re-weights the style must leave the step tokens alone.
"""

from __future__ import annotations

import numpy as np

from jaxrast.toy.task import ChainTask


def style_stats(engine, task: ChainTask, rows: list[dict], k: int = 4, seed: int = 0,
                temperature: float = 1.0, top_p: float = 0.95) -> dict[str, float]:
    """Sampled answers: stepwise share, accuracy of each style, avg@k, written-step accuracy."""
    from jaxrast.rast.decoding import SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=64, n=k, seed=seed)
    results = engine.generate([r["question"] for r in rows], params, progress=False)
    by_style: dict[str, list[bool]] = {"stepwise": [], "direct": [], "other": []}
    ok_steps = total_steps = 0
    for row, samples in zip(rows, results):
        for c in samples:
            by_style[task.style(c.text)].append(task.is_correct(c.text, row["answer"]))
            ok, n = task.step_accuracy(c.text)
            ok_steps, total_steps = ok_steps + ok, total_steps + n
    count = sum(len(v) for v in by_style.values())
    acc = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"stepwise_share": len(by_style["stepwise"]) / count, "acc_stepwise": acc(by_style["stepwise"]),
            "acc_direct": acc(by_style["direct"]), "avg": acc(sum(by_style.values(), [])),
            "step_accuracy": ok_steps / total_steps if total_steps else float("nan")}


def drill_accuracy(engine, task: ChainTask, n: int = 300, seed: int = 1) -> dict[str, float]:
    """Greedy accuracy of single steps per operation, prompted as drill lines 'F 374+05='."""
    from jaxrast.rast.decoding import SamplingParams

    rng = np.random.default_rng(seed)
    out = {}
    for op in task.ops:
        single = ChainTask(modulus=task.modulus, steps=1, ops=op, add_max=task.add_max, mul_max=task.mul_max,
                           value_digits=task.value_digits, operand_digits=task.operand_digits)
        problems = [single.sample(rng) for _ in range(n)]
        prompts = [f"F {single.v(p['start'])}{op}{single.o(p['chain'][0][1])}=" for p in problems]
        params = SamplingParams(temperature=0.0, max_new_tokens=task.value_digits, stop_token_ids=())
        res = engine.generate(prompts, params, progress=False)
        out[op] = float(np.mean([r[0].text == single.v(p["answer"]) for r, p in zip(res, problems)]))
    return out
