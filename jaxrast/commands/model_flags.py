"""The flags `jaxrast decode` and `jaxrast serve` share: a YAML config with --set
overrides, the models (--base, --pair), how they load (--dtype, --mesh, --allow-pickle),
speculative decoding and the multi-process flags. Plain argparse, so building the CLI
imports nothing heavy; each command maps them onto its own config dataclass."""

from __future__ import annotations

import argparse

from jaxrast.runtime.distributed import add_arguments as add_distributed_arguments


def add_config_and_models(parser: argparse.ArgumentParser, config: str, pair_help: str) -> None:
    """--config (fields of the dataclass named by `config`), --set, --base and --pair."""
    add = parser.add_argument
    add("--config", help=f"YAML config (fields of {config})")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    add("--base", help="base model: checkpoint directory or hub id")
    add("--pair", nargs=3, action="append", metavar=("RL", "REF", "LAM"), help=pair_help)


def add_speculative(parser: argparse.ArgumentParser, mode_help: str) -> None:
    add = parser.add_argument
    add("--speculative", type=int, metavar="GAMMA",
        help="speculative RAST: the first pair's rl model drafts GAMMA tokens per round (exact; 0: off)")
    add("--speculative-mode", choices=("on", "adaptive"), help=mode_help)


def add_loading_and_processes(parser: argparse.ArgumentParser) -> None:
    """--dtype, --mesh, --allow-pickle and the multi-process flags."""
    add = parser.add_argument
    add("--dtype", choices=("auto", "float32", "bfloat16"))
    add("--mesh", help="device mesh 'DATA,FSDP,TENSOR' (e.g. 1,-1,1)")
    add("--allow-pickle", action="store_true", help="accept pytorch_model.bin checkpoints (pickles run code)")
    add_distributed_arguments(parser)
