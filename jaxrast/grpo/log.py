"""Training metrics: one JSON line per step, and PNG curves from those lines."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

# Wall-clock metrics: they differ between runs, everything else is reproducible.
TIMING_KEYS = ("step_time", "rollout_time", "update_time", "tokens_per_s")
PLOT_KEYS = ("reward_mean", "accuracy", "kl", "clip_frac", "entropy", "response_len_mean", "grad_norm", "lr")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file (a torn last line from a killed run is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLog:
    """Appends one JSON line per step to `path`.

    On resume from step s, lines of steps > s (written after that checkpoint by the run
    that died) are dropped first, so the file holds each step once. `enabled=False` makes
    it a no-op (the processes other than 0 of a multi-process run).
    """

    def __init__(self, path: str, *, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()


def plot_metrics(paths: Sequence[str], out: str, keys: Sequence[str] | None = None) -> str:
    """Curves of `keys` (default: reward, accuracy, KL, clipping, entropy, length, grad norm,
    lr) against step, one panel per metric and one line per file; writes a PNG to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p: read_metrics(p) for p in paths}
    present = {k for rows in runs.values() for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    keys = [k for k in (keys or PLOT_KEYS) if k in present]
    if not keys:
        raise ValueError(f"none of the requested metrics are in {list(paths)}; present: {sorted(present)}.")
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for path, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
