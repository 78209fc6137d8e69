"""`jaxrast serve`: RAST behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os

from jaxrast.commands.model_flags import add_config_and_models, add_loading_and_processes, add_speculative

NAME = "serve"
HELP = "Serve RAST (a base model plus the RL shift of small pairs) behind an OpenAI-compatible HTTP API."

EPILOG = """examples:
  jaxrast serve --base jaxrast/toy/family/m_base --pair jaxrast/toy/family/s_rl jaxrast/toy/family/s_base 1.0
  jaxrast serve --base Qwen/Qwen2.5-7B --pair SimpleRL-1.5B Qwen/Qwen2.5-1.5B 1.0 --max-slots 64 --max-len 4096 \\
                --mesh 1,-1,1 --api-key $KEY
then:  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "jaxrast", "prompt": "Q 37 *4 +9 -5 *3\\nA:", "max_tokens": 40, "lam": 1.0}'
"""

API_KEY_ENV = "JAXRAST_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add_config_and_models(parser, "jaxrast.serve.config.ServeConfig",
                          pair_help="a small pair and its default weight (repeatable)")
    add("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    add("--port", type=int, help="port (default 8000)")
    add("--max-slots", type=int, help="requests decoded at once (default 16)")
    add("--max-len", type=int, help="positions per slot: prompt + generated tokens (default: the models' context)")
    add("--max-waiting", type=int, help="requests queued for a slot before answering 429 (default 256)")
    add("--served-model-name", help="the model name clients send (default 'jaxrast')")
    add("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions (default: the "
                                                "tokenizer's)")
    add("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})")
    add("--grace", type=float, help="seconds running requests get to finish on SIGTERM (default 10)")
    add_speculative(parser, "adaptive (default): time speculative and plain calls and run the faster")
    add_loading_and_processes(parser)


_FLAGS = ("base", "host", "port", "max_slots", "max_len", "max_waiting", "served_model_name", "chat_template",
          "grace", "dtype", "mesh", "speculative", "speculative_mode")


def config_from_args(args: argparse.Namespace):
    from jaxrast.runtime.config import load_config, replace
    from jaxrast.serve.config import ServeConfig

    flags = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    if args.pair:
        flags["pairs"] = tuple(tuple(p) for p in args.pair)
    if args.allow_pickle:
        flags["allow_pickle"] = True
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key:
        flags["api_key"] = api_key
    return replace(load_config(ServeConfig, args.config, args.set), **flags)


def run(args: argparse.Namespace) -> int:
    from jaxrast.runtime.distributed import maybe_initialize
    from jaxrast.serve.server import serve

    cfg = config_from_args(args)
    maybe_initialize(args)  # before anything touches devices
    return serve(cfg)
