"""`jaxrast serve`: RAST behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os
import sys

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
    add("--max-slots", type=int, help="requests decoded at once (default: as many as the KV memory holds, at most "
        "64 on CPU and 256 on an accelerator)")
    add("--kv-memory", help="KV cache memory: GiB per device (2.5) or a share of free memory ('50%%'; default: "
        "50%% of a CPU's available RAM, 90%% of an accelerator's free memory)")
    add("--page-size", type=int, help="KV positions per page: a row holds the pages its tokens fill, --kv-memory "
        "sizes the pool, and the rows in flight grow to what it holds (default: dense slots of the whole length)")
    add("--max-len", type=int, help="positions per slot: prompt + generated tokens (default: the models' context)")
    add("--max-waiting", type=int, help="requests queued for a slot before answering 429 (default 256)")
    add("--served-model-name", help="the model name clients send (default 'jaxrast')")
    add("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions (default: the "
                                                "tokenizer's)")
    add("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; a flag's "
                          "value shows in `ps`: prefer the variable or --api-key-file)")
    add("--api-key-file", metavar="FILE", help="read the API key from FILE (its first line)")
    add("--insecure", action="store_true", help="serve a non-loopback --host without an API key (refused otherwise)")
    add("--protect-docs", action="store_true", help="/metrics, /docs and /openapi.json need the key too")
    add("--max-body-bytes", type=int, help="largest request body; larger ones get 413 unread (default 4 MiB)")
    add("--max-prompt-bytes", type=int, help="largest prompt in UTF-8 bytes (default: the most the context's tokens "
                                             "can spell)")
    add("--read-timeout", type=float, help="seconds a client may stall while sending its body (default 30)")
    add("--prepare-timeout", type=float, help="seconds to template and tokenize one request (default 30)")
    add("--max-connections", type=int, help="concurrent connections; beyond them uvicorn answers 503 (default: any)")
    add("--grace", type=float, help="seconds running requests get to finish on SIGTERM (default 10)")
    add_speculative(parser, "adaptive (default): time speculative and plain calls and run the faster")
    add_loading_and_processes(parser)


_FLAGS = ("base", "host", "port", "max_slots", "kv_memory", "page_size",
          "max_len", "max_waiting", "served_model_name", "chat_template",
          "grace", "dtype", "mesh", "speculative", "speculative_mode", "max_body_bytes", "max_prompt_bytes",
          "read_timeout", "prepare_timeout", "max_connections")


def config_from_args(args: argparse.Namespace):
    from jaxrast.runtime.config import load_config, replace
    from jaxrast.serve.config import ServeConfig

    flags = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    if args.pair:
        flags["pairs"] = tuple(tuple(p) for p in args.pair)
    for name in ("allow_pickle", "insecure", "protect_docs"):
        if getattr(args, name):
            flags[name] = True
    api_key = args.api_key or _key_file(args.api_key_file) or os.environ.get(API_KEY_ENV) or None
    if args.api_key:
        print(f"jaxrast serve: warning: --api-key shows in `ps` to every user of this machine; prefer ${API_KEY_ENV} "
              "or --api-key-file", file=sys.stderr)
    if api_key:
        flags["api_key"] = api_key
    return replace(load_config(ServeConfig, args.config, args.set), **flags)


def _key_file(path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--api-key-file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        key = f.readline().strip()
    if not key:
        raise ValueError(f"--api-key-file {path} is empty; write the key on its first line.")
    return key


def run(args: argparse.Namespace) -> int:
    from jaxrast.runtime.distributed import maybe_initialize
    from jaxrast.serve.server import serve

    cfg = config_from_args(args)
    maybe_initialize(args)  # before anything touches devices
    return serve(cfg)
