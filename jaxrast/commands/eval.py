"""`jaxrast eval`: grade prediction files, print metrics, write JSON, compare, plot."""

from __future__ import annotations

import argparse
import os

NAME = "eval"
HELP = "Grade predictions against gold answers: avg@n, pass@k, maj@k, recovery rate."

EPILOG = """examples:
  jaxrast eval --pred runs/rast_math500.jsonl --json runs/rast_math500.metrics.json
  jaxrast eval --pred a.jsonl b.jsonl --benchmark math500 --k 1 8 32 --plot passk.png
  jaxrast eval --compare base.jsonl rast.jsonl rl.jsonl --metric avg
  jaxrast eval --pred preds.jsonl --data gold.jsonl --fields id=uid,question=problem,answer=target
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--pred", nargs="+", metavar="FILE", help="prediction JSONL file(s) (or report .json)")
    what.add_argument("--compare", nargs=3, metavar=("BASE", "RAST", "RL"),
                      help="three result files (.jsonl predictions or .json reports): prints base / RAST / RL and RR")
    parser.add_argument("--benchmark", help="gold benchmark when rows have no 'benchmark' field")
    parser.add_argument("--data", metavar="GOLD", help="custom gold data: JSONL file or datasets name/dir")
    parser.add_argument("--fields", metavar="MAP",
                        help="field map for --data: id=..,question=..,answer=..,answer_format=plain|gsm8k|boxed|list")
    parser.add_argument("--split", help="split for a datasets source given by --data (default: test)")
    parser.add_argument("--k", nargs="+", type=int, metavar="K", help="k values for pass@k / maj@k columns")
    parser.add_argument("--metric", help="metric for --compare (avg, pass@K, maj@K; default avg)")
    parser.add_argument("--json", metavar="PATH", help="write the report(s) as JSON")
    parser.add_argument("--plot", metavar="PNG", help="plot pass@k curves of the --pred files")
    parser.add_argument("--groups", action="store_true", help="also print per-subject / level rows")
    parser.add_argument("--group-by", nargs="+", default=[], metavar="FIELD", help="extra gold fields to group by")
    parser.add_argument("--workers", type=int, default=None,
                        help="grading processes (default: all cores; 0: in-process)")
    parser.add_argument("--timeout", type=float, help="seconds per judgement (default 5)")
    parser.add_argument("--last-number", choices=("auto", "on", "off"), default="auto",
                        help="fall back to the last number when no box / 'answer is' (auto: per benchmark)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_field_map(text: str) -> dict[str, str]:
    """"id=uid,answer=target" -> {"id": "uid", "answer": "target"}."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"--fields item {item!r} is not KEY=FIELD (e.g. id=uid,answer=target)")
        out[key.strip()] = value.strip()
    return out


def check_flags(args: argparse.Namespace):
    """Refuses flags that would be ignored (each would leave the output other than asked)
    and out-of-range values, naming the flag and what to do instead."""
    from jaxrast.commands.flags import EvalFlags
    from jaxrast.runtime.config import check_flags as validate_flags
    from jaxrast.runtime.files import check_writable

    flags = validate_flags(args, EvalFlags)
    inputs = args.compare or args.pred
    if args.compare:
        for flag, given in (("--plot", args.plot), ("--groups", args.groups), ("--group-by", args.group_by)):
            if given:
                raise ValueError(f"{flag} applies to --pred (--compare prints one accuracy per benchmark); "
                                 f"drop it, or grade the files with --pred.")
    elif args.metric is not None:
        raise ValueError("--metric chooses the accuracy of --compare; with --pred every metric is printed "
                         "(choose columns with --k).")
    if args.group_by and not args.compare and not (args.groups or args.json):
        raise ValueError("--group-by adds rows to --groups (printed) and to --json (written); add one of them.")
    for flag, given in (("--fields", args.fields), ("--split", args.split)):
        if given is not None and not args.data:
            raise ValueError(f"{flag} describes the gold data of --data, which is not given.")
    if args.split is not None and args.data and os.path.isfile(args.data):
        raise ValueError(f"--split chooses a split of a datasets source; --data {args.data} is a JSONL file.")
    reports = [p for p in inputs if str(p).endswith(".json")]
    regrading = [(flag, given) for flag, given in (
        ("--k", args.k), ("--data", args.data), ("--benchmark", args.benchmark), ("--group-by", args.group_by),
        ("--last-number", args.last_number != "auto"), ("--timeout", args.timeout is not None))]
    for flag, given in regrading:
        if given and reports:
            raise ValueError(f"{flag} does not apply to {reports[0]}: a .json report is already graded and is read "
                             "as it is. Pass the predictions .jsonl to grade it with these settings.")
    for path in (args.json, args.plot):
        if path:
            check_writable(path, "--json" if path == args.json else "--plot")
    return flags


def _check_ks(ks, reports) -> None:
    """A k above a benchmark's samples per problem would be dropped from the table silently."""
    for rep in reports:
        for name, bench in rep["benchmarks"].items():
            n = bench["samples"]["min"]
            too_big = [k for k in ks or () if k > n]
            if too_big:
                raise ValueError(f"--k {too_big[0]}: {rep.get('predictions', 'a report')} has only {n} sample(s) "
                                 f"per problem of {name}, and pass@k/maj@k need k <= n; choose k values up to {n} "
                                 f"(or decode more samples with --n).")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from jaxrast.data.rows import load_rows
    from jaxrast.eval import report as evaluate
    from jaxrast.eval.pool import GraderPool

    flags = check_flags(args)
    gold_rows = None
    if args.data:
        gold_rows = load_rows(args.data, parse_field_map(args.fields or "") or None, split=args.split or "test")
    options = dict(
        benchmark=args.benchmark,
        gold_rows=gold_rows,
        group_by=args.group_by,
        ks=list(flags.k) if flags.k else None,
        last_number_fallback={"auto": None, "on": True, "off": False}[args.last_number],
        progress=not args.no_progress,
    )
    with GraderPool(flags.workers, timeout=flags.timeout) as pool:
        if args.compare:
            reports = [evaluate.load_report(p, pool=pool, **options) for p in args.compare]
            _check_ks(args.k, reports)
            result = evaluate.compare_reports(*reports, metric=args.metric or "avg")
            print(evaluate.format_comparison(result))
        else:
            reports = [evaluate.load_report(p, pool=pool, **options) for p in args.pred]
            _check_ks(args.k, reports)
            print(evaluate.format_table(reports, groups=args.groups))
            result = reports[0] if len(reports) == 1 else reports
            if args.plot:
                print(f"wrote {evaluate.plot_pass_at_k(reports, args.plot)}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0
