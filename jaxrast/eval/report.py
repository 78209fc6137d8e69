"""Evaluate prediction files: join to gold by id, grade, summarise, print, plot.

Two prediction row formats are accepted (one row per sample):

- `jaxrast decode` rows: `{"id", "sample", "completion", ["benchmark"], ...}`, joined
  to the gold rows of the benchmark by `id` (never by line order);
- seed-repo rows: `{"question", "model_output", "answer"}` (model_output may be a list
  of samples), graded against their own `answer`; rows with the same question are
  samples of one problem.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxrast.data.rows import Gold, Row, benchmark_spec, canonical_name, list_benchmarks, load_benchmark, read_jsonl
from jaxrast.eval.extract import last_boxed
from jaxrast.eval.metrics import ProblemResult, accuracy_metric, recovery_rate, summarise, summarise_groups

SCHEMA = "jaxrast.eval/v1"
SEED_BENCHMARK = "seed"  # the benchmark name given to seed-repo rows graded on their own answers


@dataclass(frozen=True)
class Sample:
    """One prediction row, resolved to the problem and gold it is graded against."""

    line: int  # 1-based line in the predictions file (blank lines skipped)
    benchmark: str
    id: str
    sample: int
    completion: str
    gold: Gold
    groups: Mapping[str, Any]
    finish_reason: str | None


def resolve_samples(
    rows: Sequence[Row],
    *,
    benchmark: str | None = None,
    gold_rows: Sequence[Row] | None = None,
    group_by: Sequence[str] = (),
) -> list[Sample]:
    """Attach each prediction row to its gold answer.

    `gold_rows` (normalised rows, e.g. from `load_rows`) replaces the shipped benchmark;
    `benchmark` names it in the report (default "custom"). Decode rows without a
    `benchmark` field need `benchmark` or `gold_rows`.
    """
    if not rows:
        raise ValueError("the predictions file has no rows")
    gold_index: dict[str, dict[str, Row]] = {}
    if gold_rows is not None:
        name = benchmark or "custom"
        gold_index[name] = {str(r["id"]): r for r in gold_rows}
    samples: list[Sample] = []
    seen: dict[tuple[str, str, int], int] = {}
    unknown: dict[str, list[str]] = {}
    seed_counts: Counter[str] = Counter()
    for line, row in enumerate(rows, 1):
        if "completion" in row and "id" in row:
            name = _row_benchmark(row, benchmark, gold_rows is not None, line)
            if name not in gold_index:
                gold_index[name] = {r["id"]: r for r in load_benchmark(name)}
            rid = str(row["id"])
            gold_row = gold_index[name].get(rid)
            if gold_row is None:
                unknown.setdefault(name, []).append(rid)
                continue
            index = int(row.get("sample", 0))
            groups = {f: gold_row.get(f) for f in _group_fields(name, group_by)}
            new = Sample(line, name, rid, index, str(row["completion"]), gold_row["answer"], groups,
                         row.get("finish_reason"))
            key = (name, rid, index)
            if key in seen:
                raise ValueError(
                    f"prediction rows {seen[key]} and {line} are both sample {index} of id {rid!r}; "
                    "remove the duplicate (or give the samples distinct 'sample' numbers)"
                )
            seen[key] = line
            samples.append(new)
        elif "model_output" in row and "answer" in row:
            outputs = row["model_output"] if isinstance(row["model_output"], list) else [row["model_output"]]
            rid = str(row.get("id", row.get("idx", row.get("question", line))))
            for output in outputs:
                samples.append(
                    Sample(line, SEED_BENCHMARK, rid, seed_counts[rid], str(output), seed_gold(row["answer"]), {}, None)
                )
                seed_counts[rid] += 1
        else:
            raise ValueError(
                f"prediction row {line} has fields {sorted(row)}; expected 'id' and 'completion' "
                "(jaxrast decode) or 'model_output' and 'answer' (seed repo)"
            )
    if unknown:
        name, ids = next(iter(unknown.items()))
        raise ValueError(
            f"{sum(map(len, unknown.values()))} prediction ids are not in benchmark {name!r} "
            f"(e.g. {ids[:5]}); check --benchmark, or give the gold file with --data"
        )
    return samples


def _row_benchmark(row: Row, flag: str | None, custom: bool, line: int) -> str:
    if custom:
        return flag or "custom"
    name = flag or row.get("benchmark")
    if not name:
        raise ValueError(
            f"prediction row {line} has no 'benchmark' field; pass --benchmark NAME "
            f"(one of {', '.join(list_benchmarks())}) or --data GOLD.jsonl"
        )
    return canonical_name(str(name))


def _group_fields(name: str, extra: Sequence[str]) -> tuple[str, ...]:
    try:
        shipped = benchmark_spec(name).group_by
    except ValueError:
        shipped = ()
    return tuple(dict.fromkeys((*shipped, *extra)))


def seed_gold(answer: Any) -> Gold:
    """A seed row's `answer`: GSM8K solutions give the number after ####, a solution
    with a box gives the box, lists stay lists of acceptable answers."""
    if isinstance(answer, list):
        return [str(a) for a in answer]
    text = str(answer)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return last_boxed(text) or text.strip()


def _last_number_default(name: str) -> bool:
    try:
        return benchmark_spec(name).last_number_fallback
    except ValueError:
        return True


def evaluate_rows(
    rows: Sequence[Row],
    *,
    benchmark: str | None = None,
    gold_rows: Sequence[Row] | None = None,
    group_by: Sequence[str] = (),
    ks: Sequence[int] | None = None,
    pool: Any = None,
    last_number_fallback: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Grade prediction rows and build the report (schema: docs/eval.md, 'Output JSON')."""
    from jaxrast.eval.judge import Verdict
    from jaxrast.eval.pool import shared_pool  # imported here: sympy is slow to load

    samples = resolve_samples(rows, benchmark=benchmark, gold_rows=gold_rows, group_by=group_by)
    pool = pool or shared_pool()
    verdicts: list[Verdict] = [None] * len(samples)  # type: ignore[list-item]
    for name in dict.fromkeys(s.benchmark for s in samples):
        idx = [i for i, s in enumerate(samples) if s.benchmark == name]
        fallback = _last_number_default(name) if last_number_fallback is None else last_number_fallback
        graded = pool.grade_many(
            [samples[i].completion for i in idx], [samples[i].gold for i in idx],
            last_number_fallback=fallback, progress=progress,
        )
        for i, v in zip(idx, graded):
            verdicts[i] = v
    report: dict[str, Any] = {"schema": SCHEMA, "benchmarks": {}, "verdicts": []}
    for name in dict.fromkeys(s.benchmark for s in samples):
        mine = [(s, v) for s, v in zip(samples, verdicts) if s.benchmark == name]
        report["benchmarks"][name] = _benchmark_report(name, mine, gold_rows, group_by, ks)
    report["verdicts"] = [
        {
            "line": s.line, "benchmark": s.benchmark, "id": s.id, "sample": s.sample,
            "correct": v.correct, "extracted": v.answer, "method": v.method,
            "status": v.status, "gold": s.gold,
        }
        for s, v in zip(samples, verdicts)
    ]
    return report


def _benchmark_report(name, pairs, gold_rows, group_by, ks) -> dict[str, Any]:
    by_id: dict[str, list[tuple[Sample, Any]]] = {}
    for s, v in pairs:
        by_id.setdefault(s.id, []).append((s, v))
    problems = []
    for pid, members in by_id.items():
        members.sort(key=lambda sv: sv[0].sample)
        problems.append(
            ProblemResult(
                pid,
                tuple(v.correct for _, v in members),
                tuple(v.vote_key for _, v in members),
                members[0][0].groups,
            )
        )
    summary = summarise(problems, ks)
    if name == SEED_BENCHMARK:
        total = len(problems)
    elif gold_rows is not None:
        total = len(gold_rows)
    else:
        total = len(load_benchmark(name))
    summary.update(
        num_gold_problems=total,
        num_predictions=len(pairs),
        status_counts=dict(Counter(v.status for _, v in pairs)),
        method_counts=dict(Counter(str(v.method) for _, v in pairs)),
        finish_reason_counts=dict(Counter(str(s.finish_reason) for s, _ in pairs if s.finish_reason)),
        groups=summarise_groups(problems, _group_fields(name, group_by), ks),
    )
    if summary["num_problems"] < total:
        print(
            f"warning: {name}: predictions cover {summary['num_problems']} of {total} problems; "
            "metrics are over the covered problems only",
            file=sys.stderr,
        )
    return summary


def evaluate_file(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`evaluate_rows` on a predictions JSONL file; the report records the path."""
    report = evaluate_rows(read_jsonl(path), **kwargs)
    return {"schema": SCHEMA, "predictions": str(path), **{k: v for k, v in report.items() if k != "schema"}}


def load_report(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """A report: read from a `.json` written by `jaxrast eval --json`, or evaluated from
    a predictions `.jsonl`."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a JSON file (a jaxrast eval --json report); pass that, or the "
                             "predictions .jsonl.") from None
        if not isinstance(report, dict) or report.get("schema") != SCHEMA:
            raise ValueError(f"{path} is not a jaxrast eval report (schema {SCHEMA}); pass predictions .jsonl")
        return report
    return evaluate_file(path, **kwargs)


# ------------------------------------------------------------------ presentation


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _render(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:  # first column left-aligned, numbers right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def format_table(reports: Sequence[Mapping[str, Any]], *, groups: bool = False) -> str:
    """One line per (file, benchmark): problems, samples, then every table metric (%).
    With `groups`, one line per subject / level / ... value under each benchmark."""
    metric_names: list[str] = []
    for rep in reports:
        for bench in rep["benchmarks"].values():
            metric_names += [m for m in bench["metrics"] if m not in metric_names]
    show_file = len(reports) > 1
    header = [*(["file"] if show_file else []), "benchmark", "problems", "n", *metric_names]
    body = []
    for rep in reports:
        label = Path(rep.get("predictions", "?")).name
        for name, bench in rep["benchmarks"].items():
            n = bench["samples"]
            nn = str(n["min"]) if n["min"] == n["max"] else f"{n['min']}-{n['max']}"
            body.append([*([label] if show_file else []), name, str(bench["num_problems"]), nn,
                         *(_pct(bench["metrics"].get(m)) for m in metric_names)])
            for field_name, values in (bench.get("groups", {}).items() if groups else ()):
                for value, row in values.items():
                    body.append([*([""] if show_file else []), f"  {field_name}={value}", str(row["num_problems"]), "",
                                 *(_pct(row.get(m)) for m in metric_names)])
    return _render(header, body)


def compare_reports(base: Mapping, rast: Mapping, rl: Mapping, metric: str = "avg") -> dict[str, Any]:
    """Paper-style comparison: per benchmark (present in all three) the metric of each
    model and the recovery rate; "average" is over benchmarks (macro)."""
    names = [n for n in base["benchmarks"] if n in rast["benchmarks"] and n in rl["benchmarks"]]
    if not names:
        raise ValueError("the three result files share no benchmark; check that they evaluate the same data")
    rows: dict[str, dict[str, float | None]] = {}
    for name in names:
        _check_same_problems(name, base, rast, rl)
        accs = [accuracy_metric(r["benchmarks"][name]["metrics"], metric) for r in (base, rast, rl)]
        rows[name] = {"base": accs[0], "rast": accs[1], "rl": accs[2], "rr": recovery_rate(*accs)}
    if len(names) > 1:
        avg = {k: sum(rows[n][k] for n in names) / len(names) for k in ("base", "rast", "rl")}  # type: ignore[misc]
        rows["average"] = {**avg, "rr": recovery_rate(avg["base"], avg["rast"], avg["rl"])}
    return {"schema": SCHEMA, "metric": metric, "files": {k: r.get("predictions") for k, r in
            zip(("base", "rast", "rl"), (base, rast, rl))}, "rows": rows}


def _check_same_problems(name: str, *reports: Mapping) -> None:
    """RR compares three models on one problem set: refuse reports of different problems."""
    labels = ("base", "RAST", "RL")
    ids = [{v["id"] for v in r.get("verdicts", ()) if v["benchmark"] == name} for r in reports]
    if all(ids) and any(i != ids[0] for i in ids):
        counts = ", ".join(f"{label} {len(i)}" for label, i in zip(labels, ids))
        raise ValueError(f"{name}: the three runs grade different problems ({counts}; "
                         f"{len(set.intersection(*ids))} in common); an RR over them would be meaningless. "
                         "Decode the same problems with each model (same --dataset and --limit).")
    counts = [r["benchmarks"][name]["num_problems"] for r in reports]
    if len(set(counts)) > 1:
        graded = ", ".join(f"{label} {c}" for label, c in zip(labels, counts))
        raise ValueError(f"{name}: the three runs grade {graded} "
                         "problems; decode the same problems with each model (same --dataset and --limit).")


def format_comparison(comparison: Mapping[str, Any]) -> str:
    metric = comparison["metric"]
    header = ["benchmark", f"base {metric}", f"RAST {metric}", f"RL {metric}", "RR"]
    body = [[name, *(_pct(r[k]) for k in ("base", "rast", "rl", "rr"))] for name, r in comparison["rows"].items()]
    return _render(header, body)


def plot_pass_at_k(reports: Sequence[Mapping[str, Any]], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """pass@k curves (log2 k axis), one panel per benchmark, one line per report; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    labels = list(labels or [Path(r.get("predictions", f"run {i}")).stem for i, r in enumerate(reports)])
    names = list(dict.fromkeys(n for r in reports for n in r["benchmarks"]))
    if not names:
        raise ValueError("nothing to plot: the reports have no benchmarks")
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for rep, label in zip(reports, labels):
            curve = rep["benchmarks"].get(name, {}).get("pass_at_k", {})
            if curve:
                ks = sorted(int(k) for k in curve)
                ax.plot(ks, [100 * curve[str(k)] for k in ks], marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 8, not 2^3
        ax.set(title=name, xlabel="k", ylabel="pass@k (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
