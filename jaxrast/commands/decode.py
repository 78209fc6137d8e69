"""`jaxrast decode`: RAST / base / rl decoding of a benchmark or JSONL file into JSONL."""

from __future__ import annotations

import argparse

from jaxrast.commands.model_flags import add_config_and_models, add_loading_and_processes, add_speculative

NAME = "decode"
HELP = "Decode a dataset with a base model plus the RL shift of small pairs (resumable JSONL output)."

EPILOG = """examples:
  jaxrast decode --base Qwen/Qwen2.5-7B --pair Qwen/SimpleRL-1.5B Qwen/Qwen2.5-1.5B 1.0 \\
                 --dataset math500 --n 8 --out runs/rast.jsonl
  jaxrast decode --config configs/decode_qwen2.5_7b_rast.yaml --set n=32 --set out=runs/x.jsonl
  jaxrast decode --base base/ --mode base --dataset my.jsonl --prompt-template '{question}' --temperature 0
  jaxrast decode --base HuggingFaceTB/SmolLM2-135M-Instruct --mode base --dataset gsm8k --limit 4 \
                 --prompt-template chat --system 'Reason step by step.' --temperature 0
"""

# CLI flag -> DecodeConfig field (flags left unset keep the YAML/default value)
_FLAGS = ("base", "mode", "dataset", "limit", "prompt_template", "temperature", "top_p", "top_k", "n",
          "max_new_tokens", "seed", "lam_schedule", "out", "batch_size", "kv_memory", "page_size",
          "dtype", "mesh", "trace_top_k", "trace_out",
          "min_tokens", "continue_text", "speculative", "speculative_mode", "system", "max_prompt_bytes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add_config_and_models(parser, "jaxrast.commands.decode_job.DecodeConfig",
                          pair_help="a small pair and its weight (repeatable)")
    add("--rl", help="one pair's RL model (with --ref and --lam)")
    add("--ref", help="one pair's reference (base) model")
    add("--lam", type=float, help="one pair's weight λ (default 1.0)")
    add("--mode", choices=("auto", "base", "rl", "rast"), help="base: base alone; rl: the first pair's RL model alone")
    add("--dataset", help="benchmark name (math500, gsm8k, ...) or a JSONL file with id and question")
    add("--limit", type=int, help="decode only the first N rows")
    add("--prompt-template", help="'paper' (default), 'qwen_boxed', 'chat' (the tokenizer's chat template, the "
                                  "question as the user turn) or a format string, e.g. '{question}'")
    add("--system", metavar="TEXT", help="with --prompt-template chat: the system turn")
    add("--max-prompt-bytes", type=int, metavar="N",
        help="refuse longer prompts before tokenizing (default: more than the context's tokens can spell)")
    add("--temperature", type=float, help="0 = greedy (default 1.0)")
    add("--top-p", type=float, help="nucleus mass (default 0.95)")
    add("--top-k", type=int, help="0 = off")
    add("--n", type=int, help="samples per prompt")
    add("--max-new-tokens", type=int)
    add("--seed", type=int)
    add("--stop", action="append", metavar="TEXT", help="stop string (repeatable; default '\\nQuestion:')")
    add("--min-tokens", type=int, metavar="N", help="a thinking budget: stops cannot end a row before N tokens")
    add("--continue-text", metavar="TEXT", help="with --min-tokens: emitted instead of an early stop (e.g. ' Wait')")
    add_speculative(parser, "adaptive: time speculative and plain calls and run the faster (default on)")
    add("--lam-schedule", help="constant | warmup:N | first:N")
    add("--out", help="output JSONL (appended; finished rows are skipped on rerun)")
    add("--batch-size", type=int, help="rows decoded at once (default: as many as the KV memory holds, at most 64 "
        "on CPU and 256 on an accelerator)")
    add("--kv-memory", help="KV cache memory: GiB per device (2.5) or a share of free memory ('50%%'; default: "
        "50%% of a CPU's available RAM, 90%% of an accelerator's free memory)")
    add("--page-size", type=int, help="KV positions per page: a row holds the pages its tokens fill, --kv-memory "
        "sizes the pool, and the rows in flight grow to what it holds (default: dense slots of the whole length)")
    add("--no-progress", action="store_true")
    add("--save-token-ids", action="store_true",
        help="also write each row's prompt_ids and generated token_ids (exact input for jaxrast analyze)")
    add("--trace-rows", nargs="+", metavar="ID[:SAMPLE]",
        help="log per-step top tokens of base, delta and combined for these rows (teacher-forced after decoding)")
    add("--trace-top-k", type=int, help="tokens per distribution in the trace (default 5)")
    add("--trace-out", metavar="JSONL", help="trace file (default: OUT with .trace.jsonl)")
    add_loading_and_processes(parser)


def config_from_args(args: argparse.Namespace):
    from jaxrast.commands.decode_job import DecodeConfig
    from jaxrast.commands.flags import finite_lam
    from jaxrast.runtime.config import load_config, replace

    base: dict = {}
    for name in _FLAGS:
        if getattr(args, name, None) is not None:
            base[name] = getattr(args, name)
    pairs = [tuple(p) for p in (args.pair or [])]
    if args.rl or args.ref:
        if not (args.rl and args.ref):
            raise ValueError("--rl and --ref go together (and optionally --lam).")
        pairs.append((args.rl, args.ref, args.lam if args.lam is not None else 1.0))
    elif args.lam is not None:
        raise ValueError("--lam weights the pair given by --rl/--ref; with --pair or pairs from the config, "
                         "give each weight as LAM in --pair RL REF LAM (or in the YAML's pairs).")
    for rl, ref, lam in args.pair or []:
        finite_lam(lam, f"--pair {rl} {ref} LAM")
    if args.lam is not None:
        finite_lam(str(args.lam), "--lam")
    if pairs:
        base["pairs"] = tuple(pairs)
    if args.stop:
        # "\\n" typed in a shell becomes a newline; other text (问题：, Übung) stays as it is
        base["stop"] = tuple(s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in args.stop)
    if args.allow_pickle:
        base["allow_pickle"] = True
    if args.save_token_ids:
        base["save_token_ids"] = True
    if args.trace_rows:
        base["trace_rows"] = tuple(args.trace_rows)
    # explicit flags win over the YAML file and --set
    return replace(load_config(DecodeConfig, args.config, args.set), **base)


def run(args: argparse.Namespace) -> int:
    from jaxrast.commands.decode_job import run_decode
    from jaxrast.runtime.distributed import is_main, maybe_initialize

    cfg = config_from_args(args)
    maybe_initialize(args)  # before anything touches devices
    keep = None
    if cfg.trace_rows:  # decoding never imports analysis: the selector and the trace live here
        from jaxrast.analysis.trajectories import parse_row_selector
        keep = parse_row_selector(cfg.trace_rows)
    result = run_decode(cfg, progress=False if args.no_progress else True, keep=keep)
    summary = result.summary
    if result.kept:
        summary["trace"] = _write_trace(cfg, result, progress=not args.no_progress)
    if is_main():
        speculative = (f"; speculative: {summary['acceptance']:.0%} of drafts accepted, "
                       f"{summary['accepted_length']:.2f} tokens per round") if "acceptance" in summary else ""
        print(f"{summary['written']} rows written to {summary['out']} ({summary['skipped']} prompts already done, "
              f"{summary['tokens']} tokens)" + (f"; trace in {summary['trace']}" if "trace" in summary else "")
              + speculative)
    return 0


def _write_trace(cfg, result, progress) -> str:
    """Teacher-forces the kept rows through the job's models: per-step top tokens of base,
    delta and combined (`jaxrast analyze trace` on the same rows gives the same file)."""
    from jaxrast.analysis.reports import write_trace
    from jaxrast.analysis.trajectories import Trajectory

    engine = result.engine
    base, pairs = engine.models[0], engine.pairs
    trajs = [Trajectory(prompt, tokens, row_id, sample) for prompt, tokens, row_id, sample in result.kept]
    return write_trace(cfg.trace_out or cfg.out.removesuffix(".jsonl") + ".trace.jsonl", trajs, base, pairs,
                       engine.tokenizer, vocab=engine.vocab, top_k=cfg.trace_top_k, lam_schedule=engine.lam_schedule,
                       batch_size=cfg.batch_size, progress=progress)
