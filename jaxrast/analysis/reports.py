"""JSON-ready summaries and PNG plots of the per-position numbers of `jaxrast.analysis.teacher_forcing`.

Host-side numpy only. Tokens are aggregated by their *string* (the decoded token, outer
whitespace stripped, so " wait" and "wait" count together; whitespace-only tokens such as
"\\n" are kept as they are), which is how the paper reports "wait", "check", "instead".
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from jaxrast.analysis.teacher_forcing import PerPosition
from jaxrast.analysis.trajectories import Trajectory


def _num(x: Any) -> float | None:
    """A JSON number: NaN / inf become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def _nan_stat(fn, x) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN / empty inputs give NaN
        return float(fn(x)) if np.size(x) else float("nan")


def token_string(tokenizer, token_id: int) -> str:
    """The aggregation key of one token id (its id as text without a tokenizer)."""
    text = tokenizer.decode([int(token_id)]) if tokenizer is not None else str(int(token_id))
    return text.strip() or text


def token_strings(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Aggregation keys of `ids` (any shape, flattened), decoding each distinct id once."""
    ids = np.asarray(ids, np.int64).ravel()
    if ids.size == 0:
        return np.array([], dtype=str)
    uniq, inverse = np.unique(ids, return_inverse=True)
    return np.array([token_string(tokenizer, i) for i in uniq])[inverse]


def token_table(keys: np.ndarray, selected: np.ndarray, values: Mapping[str, np.ndarray] | None = None, *,
                top_n: int = 20, rank_by: str | None = None, min_occurrences: int = 1) -> list[dict[str, Any]]:
    """Aggregates positions by token string.

    keys, selected (bool) and each of `values` are flat, one entry per position. Each row:
    token, count (selected positions), occurrences (all positions), share = count /
    occurrences and mean_<value> over all occurrences. Ranked by count (default) or by
    mean_<rank_by>; only tokens with count > 0 and >= `min_occurrences` occurrences."""
    values = dict(values or {})
    if len(keys) == 0:
        return []
    uniq, inverse = np.unique(keys, return_inverse=True)
    occurrences = np.bincount(inverse, minlength=len(uniq))
    count = np.bincount(inverse, weights=np.asarray(selected, np.float64), minlength=len(uniq))
    means = {k: np.bincount(inverse, weights=np.asarray(v, np.float64), minlength=len(uniq)) / occurrences
             for k, v in values.items()}
    primary = means[rank_by] if rank_by else count
    order = np.lexsort((-occurrences, -primary))  # last key sorts first
    rows = []
    for i in order:
        if count[i] <= 0 or occurrences[i] < min_occurrences:
            continue
        rows.append({"token": str(uniq[i]), "count": int(count[i]), "occurrences": int(occurrences[i]),
                     "share": float(count[i] / occurrences[i]), **{f"mean_{k}": _num(m[i]) for k, m in means.items()}})
        if len(rows) == top_n:
            break
    return rows


def position_profile(series: Sequence[np.ndarray]) -> dict[str, list]:
    """Mean and interquartile band over trajectories at each trajectory position."""
    length = max((len(s) for s in series), default=0)
    grid = np.full((len(series), length), np.nan)
    for r, s in enumerate(series):
        grid[r, :len(s)] = s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, q25, q75 = np.nanmean(grid, 0), np.nanpercentile(grid, 25, 0), np.nanpercentile(grid, 75, 0)
    return {"mean": [_num(x) for x in mean], "q25": [_num(x) for x in q25], "q75": [_num(x) for x in q75],
            "count": np.sum(~np.isnan(grid), 0).astype(int).tolist()}


def summary(series: Sequence[np.ndarray]) -> dict[str, Any]:
    """mean / median over all positions, mean of per-trajectory means, and those means."""
    flat = np.concatenate([np.asarray(s, np.float64) for s in series]) if series else np.zeros(0)
    per = [_nan_stat(np.nanmean, s) for s in series]
    return {"mean": _num(_nan_stat(np.nanmean, flat)), "median": _num(_nan_stat(np.nanmedian, flat)),
            "mean_trajectory": _num(_nan_stat(np.nanmean, per)), "per_trajectory": [_num(x) for x in per]}


def _names(per_pos: Sequence[PerPosition], suffix: str) -> list[str]:
    return [k[: -len(suffix)] for k in (per_pos[0] if per_pos else {}) if k.endswith(suffix)]


def _series(per_pos: Sequence[PerPosition], key: str) -> list[np.ndarray]:
    return [pp[key] for pp in per_pos]


def _rounded(series: Sequence[np.ndarray], digits: int = 5) -> list[list]:
    return [[_num(round(float(x), digits)) for x in s] for s in series]


def _header(trajs: Sequence[Trajectory]) -> dict[str, Any]:
    return {"trajectories": len(trajs), "positions": int(sum(len(t.token_ids) for t in trajs)),
            "ids": [t.name for t in trajs]}


def coverage_report(trajs: Sequence[Trajectory], per_pos: Sequence[PerPosition], tokenizer=None, *,
                    ks: Sequence[int] = (1, 5), top_n: int = 20) -> dict[str, Any]:
    """Path coverage of each model: the share of trajectory positions where its argmax
    equals the trajectory token (overall = micro average, and per trajectory), coverage@k
    (token within the model's top k), per-trajectory 0/1 strings, and the trajectory tokens
    the model misses most, with its substitutions ("token <- predicted")."""
    targets = [np.asarray(t.token_ids) for t in trajs]
    keys = token_strings(tokenizer, np.concatenate(targets) if targets else [])
    models = {}
    for name in _names(per_pos, "/pred"):
        match = [pp[f"{name}/pred"] == tgt for pp, tgt in zip(per_pos, targets)]
        flat = np.concatenate(match) if match else np.zeros(0, bool)
        rank = np.concatenate(_series(per_pos, f"{name}/rank")) if per_pos else np.zeros(0)
        pred_keys = token_strings(tokenizer, np.concatenate(_series(per_pos, f"{name}/pred")) if per_pos else [])
        subs = np.array([f"{a} <- {b}" for a, b in zip(keys[~flat], pred_keys[~flat])])
        models[name] = {
            "coverage": _num(_nan_stat(np.mean, flat)),
            "mean_trajectory_coverage": _num(_nan_stat(np.mean, [_nan_stat(np.mean, m) for m in match])),
            "coverage_at_k": {str(k): _num(_nan_stat(np.mean, rank < k)) for k in ks},
            "per_trajectory": [_num(_nan_stat(np.mean, m)) for m in match],
            "match": ["".join("1" if x else "0" for x in m) for m in match],
            "missed_tokens": token_table(keys, ~flat, top_n=top_n),
            "substitutions": token_table(subs, np.ones(len(subs), bool), top_n=top_n),
        }
    return {**_header(trajs), "models": models}


def kl_report(trajs: Sequence[Trajectory], per_pos: Sequence[PerPosition], tokenizer=None, *,
              top_fraction: float = 0.05, top_n: int = 20, min_occurrences: int = 3) -> dict[str, Any]:
    """Per series (RAST, each pair, each extra model): KL summary, per-position profile,
    per-position values, and the top shifted tokens: the trajectory tokens at the
    `top_fraction` positions of largest KL, by string with counts and mean KL / Δlog-prob
    (`top_tokens`); the same ranked by mean KL (`top_by_mean_kl`); and the tokens the shift
    promotes most at those positions (`top_promoted`)."""
    keys = token_strings(tokenizer, np.concatenate([t.token_ids for t in trajs]) if trajs else [])
    series = {}
    for name in _names(per_pos, "/kl"):
        kl = _series(per_pos, f"{name}/kl")
        flat = np.concatenate(kl) if kl else np.zeros(0)
        dlogp = np.concatenate(_series(per_pos, f"{name}/dlogp")) if kl else np.zeros(0)
        top = np.zeros(len(flat), bool)
        top[np.argsort(-flat, kind="stable")[: max(1, math.ceil(top_fraction * len(flat)))]] = True
        promoted = token_strings(tokenizer, np.concatenate(_series(per_pos, f"{name}/promoted")) if kl else [])
        stats = {"kl": flat, "dlogp": dlogp}
        series[name] = {
            "kl": summary(kl), "profile": position_profile(kl),
            "top_threshold": _num(flat[top].min()) if flat.size else None,
            "top_tokens": token_table(keys, top, stats, top_n=top_n),
            "top_by_mean_kl": token_table(keys, np.ones(len(flat), bool), stats, top_n=top_n, rank_by="kl",
                                          min_occurrences=min_occurrences),
            "top_promoted": token_table(promoted, top, {"kl": flat}, top_n=top_n),
            "per_position": _rounded(kl),
        }
    return {**_header(trajs), "top_fraction": top_fraction, "series": series}


def similarity_report(trajs: Sequence[Trajectory], per_pos: Sequence[PerPosition]) -> dict[str, Any]:
    """Per comparison "a|b" and per row set (full, shared): cosine summary, profile and values."""
    comparisons = {}
    for name in _names(per_pos, "/full"):
        comparisons[name] = {}
        for kind in ("full", "shared"):
            cos = _series(per_pos, f"{name}/{kind}")
            comparisons[name][kind] = {**summary(cos), "profile": position_profile(cos), "per_position": _rounded(cos)}
    return {**_header(trajs), "comparisons": comparisons}


def trace_records(trajs: Sequence[Trajectory], per_pos: Sequence[PerPosition], tokenizer=None, *,
                  has_delta: bool = True) -> list[dict[str, Any]]:
    """One record per trajectory with a step list: the token, its log-prob under base and
    combined, KL(P_combined ‖ P_base), and the top tokens [string, id, value] of the base
    and combined distributions and of the delta (promoted and suppressed). Without pairs
    (`has_delta` False) only the base model's side is recorded."""
    def tops(pp, name, s):
        return [[token_string(tokenizer, i), int(i), round(float(v), 6)]
                for i, v in zip(pp[f"{name}/ids"][s], pp[f"{name}/values"][s])]

    records = []
    for t, pp in zip(trajs, per_pos):
        steps = []
        for s, tok in enumerate(t.token_ids):
            step = {"step": s, "id": int(tok), "token": token_string(tokenizer, tok),
                    "logp_base": round(float(pp["logp_base"][s]), 6), "base": tops(pp, "base", s)}
            if has_delta:
                step.update(logp_combined=round(float(pp["logp_combined"][s]), 6), kl=round(float(pp["kl"][s]), 6),
                            combined=tops(pp, "combined", s), delta=tops(pp, "delta", s),
                            delta_low=tops(pp, "delta_low", s))
            steps.append(step)
        prompt = tokenizer.decode(t.prompt_ids) if tokenizer is not None else None
        records.append({"id": t.id, "sample": t.sample, "prompt": prompt, "steps": steps})
    return records


# ---- plots (matplotlib, Agg) ----------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_coverage(report: Mapping[str, Any], path: str) -> str:
    """Histogram of per-trajectory coverage, one step outline per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["models"].items():
        values = [x for x in m["per_trajectory"] if x is not None]
        ax.hist(values, bins=np.linspace(0, 1, 41), histtype="step", linewidth=1.5,
                label=f"{name} (overall {100 * (m['coverage'] or 0):.1f}%)")
    ax.set(xlabel="path coverage of a trajectory", ylabel="trajectories",
           title=f"Path coverage, {report['trajectories']} trajectories")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_profiles(profiles: Mapping[str, Mapping[str, list]], path: str, *, ylabel: str, title: str) -> str:
    """Per-position mean over trajectories with the interquartile band, one line per series;
    positions reached by fewer than 5% of the trajectories (a noisy tail) are not drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, prof in profiles.items():
        count = np.array(prof["count"])
        x = np.arange(int(np.sum(count >= max(1, 0.05 * count.max(initial=0)))))
        as_array = lambda key, prof=prof, x=x: np.array([np.nan if v is None else v for v in prof[key][:len(x)]], float)  # noqa: E731
        ax.plot(x, as_array("mean"), label=name, linewidth=1.2)
        ax.fill_between(x, as_array("q25"), as_array("q75"), alpha=0.2)
    ax.set(xlabel="trajectory position (token)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_token_bars(tables: Mapping[str, Sequence[Mapping[str, Any]]], path: str, *, title: str,
                    value: str = "count") -> str:
    """Horizontal bars of `value` per token, one panel per table (most frequent on top)."""
    plt = _pyplot()
    tables = {k: v for k, v in tables.items() if v} or {"(none)": []}
    height = 0.28 * max(map(len, tables.values()), default=1) + 1.5
    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), height), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        labels = [repr(r["token"])[1:-1] if not r["token"].strip() else r["token"] for r in rows][::-1]
        ax.barh(range(len(rows)), [r[value] for r in rows][::-1])
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set(xlabel=value, title=name)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    return _save(fig, path)


def write_trace(path: str, trajs: Sequence[Trajectory], base, pairs: Sequence = (), tokenizer=None, *, vocab: int,
                top_k: int = 5, lam_schedule=None, batch_size: int = 8, progress: bool | None = None) -> str:
    """Teacher-forces `trajs` through `base` and `pairs` and writes their `trace_records` as JSONL."""
    import json
    import os

    from jaxrast.analysis.teacher_forcing import trace_positions
    from jaxrast.runtime.distributed import is_main

    per_pos = trace_positions(trajs, base, pairs, vocab=vocab, top_k=top_k, lam_schedule=lam_schedule,
                              batch_size=batch_size, progress=progress)
    if not is_main():  # every process joins the teacher forcing; process 0 writes
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in trace_records(trajs, per_pos, tokenizer, has_delta=bool(pairs)):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
