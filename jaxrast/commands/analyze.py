"""`jaxrast analyze coverage|kl|similarity|trace`: token-level analyses of decoded trajectories."""

from __future__ import annotations

import argparse
import json
import os
import time

NAME = "analyze"
HELP = "Token-level analyses of decoded trajectories: path coverage, KL of the RAST shift, ΔR similarity, traces."

EPILOG = """examples (trajectories: `jaxrast decode ... --save-token-ids --out traj.jsonl`):
  jaxrast analyze coverage --traj s_rl.jsonl --model m_base=ckpts/m_base --model ckpts/m_rl \\
                           --base ckpts/m_base --pair ckpts/s_rl ckpts/s_base 1.0 --out runs/coverage
  jaxrast analyze kl --traj rast.jsonl --base ckpts/m_base --pair ckpts/s_rl ckpts/s_base 1.0 \\
                     --model m_rl=ckpts/m_rl --out runs/kl
  jaxrast analyze similarity --traj rast.jsonl --pair ckpts/s_rl ckpts/s_base --pair ckpts/m_rl ckpts/m_base \\
                             --out runs/similarity
  jaxrast analyze trace --traj rast.jsonl --rows q1 q7:0 --base ckpts/m_base --pair ckpts/s_rl ckpts/s_base 1.0 \\
                        --out runs/trace.jsonl
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--traj", required=True, metavar="JSONL",
        help="trajectories: `jaxrast decode` output (exact with --save-token-ids)")
    add("--limit", type=int, help="first N trajectories only")
    add("--batch-size", type=int, default=8,
        help="trajectories per forward (default 8; memory ~ models × batch × length × vocab × 4 bytes)")
    add("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
        help="model compute dtype (auto: float32 on CPU, bfloat16 on accelerators); logits are float32")
    add("--mesh", help="shard every model over a device mesh 'DATA,FSDP,TENSOR' (e.g. 1,-1,1), as in decode")
    add("--allow-pickle", action="store_true", help="accept pytorch_model.bin checkpoints (pickles run code)")
    add("--no-progress", action="store_true")
    rast = argparse.ArgumentParser(add_help=False)
    rast.add_argument("--base", help="RAST's base model (checkpoint directory or hub id)")
    rast.add_argument("--pair", nargs=3, action="append", default=[], metavar=("RL", "REF", "LAM"),
                      help="a small pair and its weight λ (repeatable)")
    rast.add_argument("--lam-schedule", help="constant | warmup:N | first:N, as used when decoding")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                       help="another model (repeatable; coverage: its own coverage, kl: KL(P_model ‖ P_base)); "
                            "NAME defaults to the directory name")

    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    cov = sub.add_parser("coverage", parents=[common, model, rast], help="path coverage: argmax == trajectory token",
                         description="Share of trajectory positions where each --model's argmax (and RAST's, with "
                                     "--base/--pair) given the same prefix equals the trajectory token.")
    cov.add_argument("--k", nargs="+", type=int, default=[1, 5], help="also coverage@k (token in top k; default 1 5)")
    cov.add_argument("--top-n", type=int, default=20, help="tokens listed per table (default 20)")
    cov.add_argument("--out", required=True, metavar="DIR", help="writes coverage.json and coverage.png")
    kl = sub.add_parser("kl", parents=[common, rast, model],
                        help="KL(P_RAST‖P_base) per position, top shifted tokens",
                        description="KL(P_RAST ‖ P_base), each pair's KL(P_rl ‖ P_ref) and each --model's "
                                    "KL(P_model ‖ P_base) along the trajectories, with the most shifted tokens.")
    kl.add_argument("--top-fraction", type=float, default=0.05,
                    help="positions of largest KL whose tokens are counted (default 0.05)")
    kl.add_argument("--top-n", type=int, default=20, help="tokens listed per table (default 20)")
    kl.add_argument("--min-occurrences", type=int, default=3, help="for the mean-KL ranking (default 3)")
    kl.add_argument("--out", required=True, metavar="DIR",
                    help="writes kl.json, kl_per_position.png and top_shifted_tokens.png")
    sim = sub.add_parser("similarity", parents=[common], help="cosine of ΔR = z_rl − z_ref across pairs",
                         description="Cosine similarity of the deltas (z_rl − z_ref) of every two pairs at the "
                                     "trajectories' prefixes, over the full rows and over the tokenizer's vocab.")
    sim.add_argument("--pair", nargs="+", action="append", default=[], metavar="RL REF [LAM]",
                     help="a pair (repeatable, at least two); a λ is accepted and ignored (cosine of raw deltas)")
    sim.add_argument("--out", required=True, metavar="DIR",
                     help="writes similarity.json and similarity_per_position.png")
    tr = sub.add_parser("trace", parents=[common, rast], help="per-step top tokens of base, delta and combined",
                        description="Per step of the selected trajectories: top tokens of the base, delta and "
                                    "combined distributions (teacher-forced, exact).")
    tr.add_argument("--rows", nargs="+", required=True, metavar="ID[:SAMPLE]", help="trajectories to trace")
    tr.add_argument("--top-k", type=int, default=5, help="tokens per distribution (default 5)")
    tr.add_argument("--out", required=True, metavar="JSONL", help="one JSON record per traced trajectory")


def _named(spec: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' (named after its directory)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return os.path.basename(spec.rstrip("/")) or spec, spec


def _pairs(args, load):
    from jaxrast.commands.flags import finite_lam
    from jaxrast.rast.ensemble import Pair

    if args.pair and not args.base:
        raise ValueError("--pair needs --base (RAST combines the base's logits with the pairs' deltas).")
    return [Pair(load(rl), load(ref), finite_lam(lam, f"--pair {rl} {ref} LAM")) for rl, ref, lam in args.pair]


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def _trajectories(args, tokenizer):
    from jaxrast.analysis.trajectories import read_trajectories

    trajs = read_trajectories(args.traj, tokenizer, limit=args.limit)
    kept = [t for t in trajs if t.token_ids]
    if not kept:
        raise ValueError(f"{args.traj} holds no trajectory with generated tokens.")
    if len(kept) < len(trajs):
        print(f"skipping {len(trajs) - len(kept)} empty trajectories")
    return kept


def _write_json(out_dir: str, name: str, report: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False)
    return path


def _models(args, load) -> dict:
    named = [_named(s) for s in args.model]
    return dict(zip(_unique([n for n, _ in named]), (load(p) for _, p in named)))


def _fmt(x, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _coverage(args, load, common, config) -> list[str]:
    from jaxrast.analysis import reports as rep
    from jaxrast.analysis import teacher_forcing as analysis

    # the base first: the first tokenizer loaded is the one the others are checked against
    base = load(args.base) if args.base else None
    pairs, models = _pairs(args, load), _models(args, load)
    if not models and base is None:
        raise ValueError("nothing to measure: give --model PATH and/or --base PATH --pair RL REF LAM.")
    trajs = _trajectories(args, load.tokenizer)
    per_pos = analysis.coverage_positions(trajs, models, vocab=load.vocab, base=base, pairs=pairs,
                                          lam_schedule=args.lam_schedule, **common)
    report = rep.coverage_report(trajs, per_pos, load.tokenizer, ks=args.k, top_n=args.top_n)
    for name, m in report["models"].items():
        missed = ", ".join(f"{r['token']!r}×{r['count']}" for r in m["missed_tokens"][:8])
        print(f"{name}: coverage {_fmt(m['coverage'], '.2%')} ({report['positions']} positions); "
              f"missed: {missed}")
    return [_write_json(args.out, "coverage.json", {"config": config, **report}),
            rep.plot_coverage(report, os.path.join(args.out, "coverage.png"))]


def _kl(args, load, common, config) -> list[str]:
    from jaxrast.analysis import reports as rep
    from jaxrast.analysis import teacher_forcing as analysis

    if not args.base or not args.pair:
        raise ValueError("kl needs --base BASE and at least one --pair RL REF LAM.")
    base = load(args.base)  # first: the other tokenizers are checked against the base's
    pairs, models = _pairs(args, load), _models(args, load)
    pair_names = _unique([f"{_named(rl)[0]} vs {_named(ref)[0]}" for rl, ref, _ in args.pair])
    trajs = _trajectories(args, load.tokenizer)
    per_pos = analysis.kl_positions(trajs, base, pairs, vocab=load.vocab, models=models,
                                    pair_names=pair_names, lam_schedule=args.lam_schedule, **common)
    report = rep.kl_report(trajs, per_pos, load.tokenizer, top_fraction=args.top_fraction, top_n=args.top_n,
                           min_occurrences=args.min_occurrences)
    what = {"RAST": "KL(P_RAST ‖ P_base)", **{n: "KL(P_rl ‖ P_ref)" for n in pair_names},
            **{n: "KL(P_model ‖ P_base)" for n in models}}
    for name, s in report["series"].items():
        s["what"] = what[name]
        top = ", ".join(f"{r['token']!r}×{r['count']}" for r in s["top_tokens"][:10])
        print(f"{name}: {s['what']} mean {_fmt(s['kl']['mean'])}; top shifted: {top}")
    profiles = {f"{n}: {what[n]}": s["profile"] for n, s in report["series"].items()}
    return [_write_json(args.out, "kl.json", {"config": config, **report}),
            rep.plot_profiles(profiles, os.path.join(args.out, "kl_per_position.png"), ylabel="KL (nats)",
                              title=f"KL per position, {report['trajectories']} trajectories"),
            rep.plot_token_bars({n: s["top_tokens"] for n, s in report["series"].items()},
                                os.path.join(args.out, "top_shifted_tokens.png"),
                                title=f"Tokens at the top {100 * args.top_fraction:g}% KL positions")]


def _similarity(args, load, common, config) -> list[str]:
    from jaxrast.analysis import reports as rep
    from jaxrast.analysis import teacher_forcing as analysis

    for p in args.pair:
        if len(p) not in (2, 3):
            raise ValueError(f"--pair takes RL REF [LAM]; got {p}.")
    if len(args.pair) < 2:
        raise ValueError("similarity compares pairs: give --pair RL REF at least twice.")
    names = _unique([_named(p[0])[0] for p in args.pair])
    pairs = {n: (load(p[0]), load(p[1])) for n, p in zip(names, args.pair)}
    trajs = _trajectories(args, load.tokenizer)
    report = rep.similarity_report(trajs, analysis.similarity_positions(trajs, pairs, vocab=load.vocab,
                                                                        **common))
    for name, c in report["comparisons"].items():
        print(f"{name}: mean cosine {_fmt(c['full']['mean'])} (full rows), {_fmt(c['shared']['mean'])} (shared vocab)")
    profiles = {f"{n} ({kind})": c[kind]["profile"] for n, c in report["comparisons"].items()
                for kind in ("full", "shared")}
    return [_write_json(args.out, "similarity.json", {"config": config, **report}),
            rep.plot_profiles(profiles, os.path.join(args.out, "similarity_per_position.png"),
                              ylabel="cos(ΔR_a, ΔR_b)",
                              title=f"ΔR similarity per position, {report['trajectories']} trajectories")]


def _trace(args, load, common, config) -> list[str]:
    from jaxrast.analysis import reports as rep
    from jaxrast.analysis.trajectories import parse_row_selector

    if not args.base:
        raise ValueError("trace needs --base (and usually --pair RL REF LAM).")
    base = load(args.base)  # first: the other tokenizers are checked against the base's
    pairs = _pairs(args, load)
    selected = parse_row_selector(args.rows)
    trajs = [t for t in _trajectories(args, load.tokenizer) if selected(t.id, t.sample)]
    if not trajs:
        raise ValueError(f"no trajectory of {args.traj} matches --rows {' '.join(args.rows)} (ID or ID:SAMPLE).")
    return [rep.write_trace(args.out, trajs, base, pairs, load.tokenizer, vocab=load.vocab,
                            top_k=args.top_k, lam_schedule=args.lam_schedule, **common)]


_RUNNERS = {"coverage": _coverage, "kl": _kl, "similarity": _similarity, "trace": _trace}


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before a model loads: numbers by their types and ranges, λ values
    finite, the trajectories readable and --out usable."""
    from jaxrast.commands.flags import AnalyzeFlags, finite_lam
    from jaxrast.runtime.config import check_flags
    from jaxrast.runtime.files import check_directory, check_writable

    check_flags(args, AnalyzeFlags)
    pairs = getattr(args, "pair", None) or []
    for p in pairs:
        if len(p) == 3:  # similarity takes RL REF [LAM]
            finite_lam(p[2], f"--pair {p[0]} {p[1]} LAM")
    if args.analysis == "kl" and not (args.base and pairs):
        raise ValueError("kl needs --base BASE and at least one --pair RL REF LAM.")
    if args.analysis == "trace" and not args.base:
        raise ValueError("trace needs --base (and usually --pair RL REF LAM).")
    if pairs and args.analysis != "similarity" and not args.base:
        raise ValueError("--pair needs --base (RAST combines the base's logits with the pairs' deltas).")
    if args.analysis == "coverage" and not args.model and not args.base:
        raise ValueError("nothing to measure: give --model PATH and/or --base PATH --pair RL REF LAM.")
    if getattr(args, "lam_schedule", None):
        from jaxrast.rast.combine import lam_schedule

        lam_schedule(args.lam_schedule)  # a bad schedule is named now, not after the models load
    if not os.path.isfile(args.traj):  # found now, not after the models load
        raise FileNotFoundError(f"trajectory file {args.traj} does not exist; write one with "
                                f"`jaxrast decode ... --save-token-ids --out {args.traj}`.")
    if args.analysis == "trace":
        check_writable(args.out, "--out")
    else:
        check_directory(args.out, "--out")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    t0 = time.perf_counter()
    common = dict(batch_size=args.batch_size, progress=False if args.no_progress else None)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "no_progress"}
    from jaxrast.models.table import ModelTable
    from jaxrast.runtime.mesh import parse_mesh

    load = ModelTable(dtype=args.dtype, mesh=parse_mesh(args.mesh), allow_pickle=args.allow_pickle, progress=False)
    files = _RUNNERS[args.analysis](args, load, common, config)
    print(f"wrote {', '.join(files)} ({time.perf_counter() - t0:.1f}s)")
    return 0
