"""`jaxrast demo`: the paper's table on the embedded toy family (no arguments needed)."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "Run RAST on the shipped toy family: S_base, S_RL, M_base, RAST, M_RL with avg@k, pass@k, RR and plots."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--problems", type=int, help="held-out problems (default 1000)")
    add("--k", type=int, help="samples per problem: avg@k and pass@1..k (default 8)")
    add("--lam", type=float, help="λ of the RAST row (default 1.0)")
    add("--sweep", type=float, nargs="+", metavar="LAM", help="λ values of the sweep plot")
    add("--sweep-problems", type=int, help="problems in the λ sweep (default 250)")
    add("--seed", type=int, help="sampling seed (default 0)")
    add("--speculative", type=int, metavar="GAMMA", help="decode the RAST rows speculatively, S_RL drafting GAMMA "
                                                         "tokens per round (the same law; default 0: off)")
    add("--data-seed", type=int, help="seed of the held-out problems (default: one never used in training)")
    add("--family", help="directory with s_base/ s_rl/ m_base/ m_rl/ (default: the shipped family)")
    add("--out-dir", help="where the plots go (default ./jaxrast_demo)")
    add("--json", metavar="PATH", help="write the table as JSON")
    add("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from jaxrast.runtime.config import replace
    from jaxrast.toy.demo import DemoConfig, format_table, run_demo

    flags = {f: getattr(args, f) for f in ("problems", "k", "lam", "sweep_problems", "seed", "data_seed", "family",
                                           "out_dir", "json", "speculative") if getattr(args, f) is not None}
    if args.sweep:
        flags["sweep"] = tuple(args.sweep)
    cfg = replace(DemoConfig(), **flags)
    if cfg.sweep_problems > cfg.problems:
        raise ValueError(f"--sweep-problems ({cfg.sweep_problems}) cannot exceed --problems ({cfg.problems}): "
                         "the sweep runs on the first held-out problems.")
    from jaxrast.runtime.files import check_directory, check_writable

    check_directory(cfg.out_dir, "--out-dir")  # found now, not after minutes of decoding
    if cfg.json:
        check_writable(cfg.json, "--json")
    print(f"jaxrast demo: {cfg.problems} held-out toy problems × {cfg.k} samples, τ={cfg.temperature}, "
          f"top-p={cfg.top_p}")
    result = run_demo(cfg, progress=not args.no_progress)
    print()
    print(format_table(result))
    print(f"\nplots: {result['plots']['pass_at_k']}  {result['plots']['lambda_sweep']}")
    if cfg.json:
        print(f"table written to {cfg.json}")
    print(f"({result['seconds']:.0f} s)")
    return 0
