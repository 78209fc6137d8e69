"""`jaxrast train`: GRPO-train a small model from a YAML config (resumable)."""

from __future__ import annotations

import argparse
import contextlib

from jaxrast.runtime.distributed import add_arguments as add_distributed_arguments

NAME = "train"
HELP = "GRPO-train a small model (the rl side of a RAST pair) from a YAML config."

EPILOG = """examples:
  jaxrast train --config configs/grpo_qwen2.5_0.5b_gsm8k.yaml
  jaxrast train --config configs/grpo_qwen2.5_0.5b_gsm8k.yaml --set steps=200 optim.lr=2e-6 --resume
  jaxrast plot-train runs/grpo_qwen2.5_0.5b_gsm8k --out curves.png

Writes OUTPUT_DIR/metrics.jsonl (one line per step), OUTPUT_DIR/checkpoints/<step>/ (Orbax),
OUTPUT_DIR/config.yaml and, at the end, OUTPUT_DIR/hf (a HuggingFace checkpoint: use it as
`rl` in `jaxrast decode`, in transformers or in vLLM).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, metavar="YAML", help="GRPOConfig file (see configs/)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set steps=50 optim.lr=1e-6 loss.beta=0.001")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in output_dir (fresh start if none)")
    add_distributed_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from jaxrast.data.rows import load_rows
    from jaxrast.grpo.config import GRPOConfig
    from jaxrast.grpo.trainer import train
    from jaxrast.models.hf import load_model
    from jaxrast.runtime.config import load_config
    from jaxrast.runtime.distributed import is_main, maybe_initialize, on_every_process
    from jaxrast.runtime.mesh import mesh_of

    cfg = load_config(GRPOConfig, args.config, args.set).validate()
    maybe_initialize(args)  # before anything touches devices
    if not cfg.model.path:
        raise ValueError("model.path is empty; set it in the config or with --set model.path=CHECKPOINT_DIR.")
    if not cfg.data.source:
        raise ValueError("data.source is empty; set a benchmark name, JSONL file or datasets name "
                         "(--set data.source=PATH).")
    rows = on_every_process(lambda: load_rows(cfg.data.source, cfg.data.fields or None, split=cfg.data.split),
                            "reading the data")
    mesh = mesh_of(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    load = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh, remat=cfg.model.remat)

    def load_models():
        policy, _, tokenizer = load_model(cfg.model.path, **load)
        # Without ref_path the trainer copies the initial policy: no second load.
        ref = load_model(cfg.model.ref_path, **load)[0] if cfg.loss.beta > 0 and cfg.model.ref_path else None
        return policy, tokenizer, ref

    # output_dir: usable, not being trained into by another process, and resumed only when asked
    # -- all found before the models load
    with contextlib.ExitStack() as held:
        on_every_process(lambda: _claim(cfg.output_dir, args.resume, held), "checking output_dir")
        policy, tokenizer, ref = on_every_process(load_models, "loading the models")
        history = train(cfg, policy=policy, tokenizer=tokenizer, rows=rows, ref=ref, mesh=mesh, resume=args.resume)
    if history and is_main():
        last = history[-1]
        print(f"step {last['step']}: reward {last['reward_mean']:.4f}, kl {last['kl']:.5f}; "
              f"metrics in {cfg.output_dir}/metrics.jsonl")
    return 0


def _claim(output_dir: str, resume: bool, held: contextlib.ExitStack) -> None:
    """Refuses an output_dir that cannot be used, or that holds checkpoints without
    --resume; then (process 0) takes its lock into `held`, refusing a second writer."""
    import os

    from jaxrast.runtime.distributed import is_main
    from jaxrast.runtime.files import DirectoryLock, check_directory

    check_directory(output_dir, "output_dir")
    checkpoints = os.path.join(output_dir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) if os.path.isdir(checkpoints) else []
    if steps and not resume:
        raise ValueError(f"{output_dir} already holds checkpoints (steps {steps}); pass --resume to continue, "
                         "or choose another output_dir.")
    if is_main():
        held.enter_context(DirectoryLock(output_dir, "output_dir"))
