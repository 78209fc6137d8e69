"""GRPO throughput: jaxrast's trainer vs TRL's `GRPOTrainer` on the same tiny HF model.

Both train the same randomly initialised Qwen2 checkpoint (character tokenizer) on the
same prompts with the same reward, G, completion length, batch and optimiser settings
(on-policy: μ = 1, one optimiser update per rollout batch of prompts × G completions,
token-mean loss, β = 0, AdamW with global-norm clipping). The two trainers' steps
alternate (TRL, jaxrast, TRL, ...), so on a shared machine both meet the same load; each
step is timed alone. Reported: steps/s and generated completion tokens/s after warm-up
steps (jit compilation, TRL's first-step set-up), and the ratio. TRL is an optional
dependency (`pip install trl`); without it only jaxrast runs.

    python benchmarks/grpo.py [--prompts 8 --group 8 --max-new 128 --hidden 128 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHARS = "abcdefghijklmnopqrstuvwxyz "


def a_reward(prompts, completions, **_):
    """Fraction of 'a' characters: a cheap verifiable reward both trainers call the same way."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_model(directory: str, args) -> str:
    """A random tiny Qwen2 HF checkpoint with a character tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from jaxrast.toy.tokenizer import char_tokenizer

    torch.manual_seed(0)
    # Extra symbols make the vocabulary LLM-like in that the stop token is rare, so
    # completions run to about --max-new tokens in both trainers.
    tok = char_tokenizer(CHARS)
    tok.add_tokens([f"<x{i}>" for i in range(args.vocab)])
    cfg = Qwen2Config(vocab_size=64, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    tok.save_pretrained(directory)
    cfg.save_pretrained(directory)
    # Loaded next to a qwen2 config the tokenizer gains <|endoftext|>. The vocabulary is
    # sized to what both trainers load: TRL samples every embedding row, jaxrast only
    # rows of real tokens, so there must be no padding rows.
    cfg.vocab_size = len(AutoTokenizer.from_pretrained(directory))
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)
    return directory


def prompts(n: int = 64) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(CHARS[1:-1]) for _ in range(rng.randint(8, 16))) for _ in range(n)]


def jaxrast_trainer(model_dir: str, args, out: str):
    from jaxrast.grpo.config import DataSpec, GRPOConfig, LossSpec, MeshSpec, OptimSpec, RolloutSpec
    from jaxrast.grpo.rewards import as_rewards
    from jaxrast.grpo.trainer import GRPOTrainer
    from jaxrast.models.hf import load_model

    rows = [{"id": str(i), "question": q, "answer": ""} for i, q in enumerate(prompts())]
    batch = args.prompts * args.group
    cfg = GRPOConfig(data=DataSpec(template="{question}"),
                     rollout=RolloutSpec(prompts_per_step=args.prompts, group_size=args.group,
                                         max_new_tokens=args.max_new, batch_size=batch),
                     loss=LossSpec(micro_batch_size=args.micro or batch, aggregation="token_mean",
                                   skip_zero_advantage=not args.no_skip),
                     optim=OptimSpec(lr=1e-6, max_grad_norm=1.0), mesh=MeshSpec(1, 1, 1),
                     steps=args.warmup + args.steps, output_dir=out, progress=False, export_hf=False)
    policy, _, tok = load_model(model_dir)
    return GRPOTrainer(cfg, policy=policy, tokenizer=tok, rows=rows, rewards=as_rewards([a_reward]))


def run_trl(model_dir: str, args, out: str, after_step) -> list[tuple[float, float]]:
    """Trains with TRL; returns (seconds, completion tokens) per step and calls
    `after_step()` after each one (to interleave the other trainer's steps)."""
    import datasets
    import transformers
    import trl

    batch = args.prompts * args.group
    samples: list[tuple[float, float]] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:  # the step's own log line
                samples.append((self.seconds, batch * float(logs["completions/mean_length"])))
                after_step()

    config = trl.GRPOConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new, temperature=1.0, top_p=1.0,
        learning_rate=1e-6, max_grad_norm=1.0, beta=0.0, num_iterations=1, loss_type="dapo",
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    data = datasets.Dataset.from_list([{"prompt": p} for p in prompts()])
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    trl.GRPOTrainer(model=model_dir, reward_funcs=[a_reward], args=config, train_dataset=data,
                    processing_class=tok, callbacks=[Clock()]).train()
    return samples


def summarise(samples: list[tuple[float, float]], args) -> dict:
    timed = samples[args.warmup:]
    seconds, tokens = sum(s for s, _ in timed), sum(t for _, t in timed)
    return {"steps_per_s": len(timed) / seconds, "tokens_per_s": tokens / seconds,
            "mean_completion_len": tokens / (len(timed) * args.prompts * args.group),
            "step_seconds": [round(s, 4) for s, _ in timed]}


def bench(model_dir: str, args) -> dict:
    """Steps of the two trainers alternate (TRL step, jaxrast step, ...), so both meet the
    same machine load; each step is timed on its own."""
    with tempfile.TemporaryDirectory() as out:
        ours = jaxrast_trainer(model_dir, args, os.path.join(out, "jaxrast")) if args.only != "trl" else None
        samples: dict[str, list] = {"jaxrast": [], "trl": []}

        def jaxrast_step():
            if ours is not None:
                start = time.perf_counter()
                tokens = ours.train_step()["tokens"]
                samples["jaxrast"].append((time.perf_counter() - start, tokens))

        try:
            import trl  # noqa: F401
        except ImportError:
            trl = None
            print("TRL is not installed (pip install trl); timing jaxrast alone.")
        if trl is not None and args.only != "jaxrast":
            samples["trl"] = run_trl(model_dir, args, os.path.join(out, "trl"), jaxrast_step)
        while ours is not None and len(samples["jaxrast"]) < args.warmup + args.steps:
            jaxrast_step()
        if ours is not None:
            ours.close()
    return {name: summarise(s, args) for name, s in samples.items() if s}


def limit_threads(n: int) -> None:
    """Same CPU budget for both trainers (call before jax is imported)."""
    if "jax" in sys.modules:
        raise RuntimeError("limit_threads must run before jax is imported.")
    os.environ["OMP_NUM_THREADS"] = str(n)
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import torch
    torch.set_num_threads(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--max-new", type=int, default=128, help="max completion tokens")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000, help="extra tokenizer symbols besides a-z")
    parser.add_argument("--micro", type=int, default=8,
                        help="jaxrast micro-batch (rows per forward/backward; 8 = the library default, one group "
                             "per micro-batch); 0 = the whole batch")
    parser.add_argument("--no-skip", action="store_true",
                        help="jaxrast: back-propagate zero-advantage micro-batches too (for attribution)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both (torch.set_num_threads; XLA single-threaded if 1); "
                             "0 = each library's default. 1 avoids OpenMP spin-waiting on a busy machine")
    parser.add_argument("--only", choices=("jaxrast", "trl"), help="run one side only")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")

    if args.threads:
        limit_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(make_model(os.path.join(tmp, "tiny"), args), args)
    setup = (f"tiny qwen2 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab + 31}), "
             f"{args.prompts} prompts x G={args.group}, "
             f"max {args.max_new} new tokens, {args.steps} timed steps after {args.warmup} warm-up, "
             f"threads: {args.threads or 'default'}")
    print(setup)
    for name, r in results.items():
        print(f"  {name:8s} {r['steps_per_s']:8.3f} steps/s  {r['tokens_per_s']:10.1f} tokens/s  "
              f"(mean completion {r['mean_completion_len']:.1f} tokens)")
    if len(results) == 2:
        ratio = results["jaxrast"]["steps_per_s"] / results["trl"]["steps_per_s"]
        results["speedup_steps_per_s"] = ratio
        print(f"  jaxrast / TRL: {ratio:.1f}x steps/s, "
              f"{results['jaxrast']['tokens_per_s'] / results['trl']['tokens_per_s']:.1f}x tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, **results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
