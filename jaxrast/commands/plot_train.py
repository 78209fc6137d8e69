"""`jaxrast plot-train`: PNG curves of GRPO metrics.jsonl files."""

from __future__ import annotations

import argparse

NAME = "plot-train"
HELP = "Plot GRPO training curves (reward, accuracy, KL, clipping, entropy, length, ...) to a PNG."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="metrics.jsonl files or run directories holding one")
    parser.add_argument("--out", default="train_curves.png", metavar="PNG",
                        help="output image (default train_curves.png)")
    parser.add_argument("--metrics", nargs="+", metavar="KEY", help="metrics to plot (default: the main ones)")


def run(args: argparse.Namespace) -> int:
    import os

    from jaxrast.grpo.log import plot_metrics
    from jaxrast.runtime.files import check_writable

    check_writable(args.out, "--out")
    paths = [os.path.join(p, "metrics.jsonl") if os.path.isdir(p) else p for p in args.runs]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no metrics file {p}; pass a metrics.jsonl or a run's output_dir.")
    print(f"wrote {plot_metrics(paths, args.out, args.metrics)}")
    return 0
