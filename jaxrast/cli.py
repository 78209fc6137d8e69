"""`jaxrast` command line: one subcommand per module in `jaxrast/commands/`.

Each command module exposes `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
Modules are imported lazily so `jaxrast --help` stays fast and a command's heavy imports
(jax, transformers) load only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module path; add a line here when a command lands.
COMMANDS: dict[str, str] = {
    "analyze": "jaxrast.commands.analyze",
    "decode": "jaxrast.commands.decode",
    "demo": "jaxrast.commands.demo",
    "eval": "jaxrast.commands.eval",
    "plan": "jaxrast.commands.plan",
    "plot-train": "jaxrast.commands.plot_train",
    "serve": "jaxrast.commands.serve",
    "train": "jaxrast.commands.train",
}

# what an interrupted command leaves behind, and how to go on
_RESUME_HINTS = {"decode": "; the rows written so far are kept: rerun the same command to resume.",
                 "train": "; the checkpoints written so far are kept: rerun with --resume to continue."}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrast",
        description="RAST in JAX: decode a large base model with the RL shift of small model pairs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # User errors: one clear line, no traceback.
        print(f"jaxrast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as err:
        # A path the user gave that cannot be used as asked (the commands check theirs up
        # front; this is the net for any that slipped through).
        what = f"{err.strerror}: {err.filename}" if err.filename else str(err)
        print(f"jaxrast {args.command}: error: {what}; check the path and its permissions.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: one line, no traceback; 130 = 128 + SIGINT, as shells report it.
        print(f"\njaxrast {args.command}: interrupted (Ctrl-C){_RESUME_HINTS.get(args.command, '.')}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
