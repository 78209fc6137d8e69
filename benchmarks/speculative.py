"""Speculative RAST vs plain RAST, side by side in one run.

1. Toy family (trained models, so the acceptance rate is real): M_base + 1.0·(S_RL − S_base)
   with S_RL drafting γ tokens per round, at batch 1, 4 and 16, τ = 1, top-p 0.95, 64-token
   answers to held-out chain problems: tokens/s of plain and speculative decoding (γ fixed and
   adaptive), the acceptance rate and the tokens a slot gains per round.
2. The cost of one verification, γ + 1 positions through a model, relative to one position,
   on a random checkpoint of Qwen2.5-0.5B's shapes (hidden 896, 24 layers, vocabulary 151,936)
   at batch 1: where a real base model's step is bound by reading its weights, verifying
   γ + 1 positions costs about as much as one.

    python benchmarks/speculative.py                # both parts
    python benchmarks/speculative.py --skip-verify  # the toy part only

Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def toy(args) -> None:
    from jaxrast.rast.decoding import RAST, SamplingParams
    from jaxrast.rast.ensemble import Pair
    from jaxrast.toy.demo import load_family
    from jaxrast.toy.task import ChainTask

    fam = load_family(args.family)
    (s_base, tok), (s_rl, _), (m_base, _) = fam["s_base"], fam["s_rl"], fam["m_base"]
    pairs = [Pair(s_rl, s_base, 1.0)]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=64, seed=1)
    print(f"\n== toy family: M_base + 1.0·(S_RL − S_base), τ = 1, top-p 0.95, 64 new tokens, γ = {args.gamma} ==")
    for batch in args.batches:
        prompts = [r["question"] for r in ChainTask().rows(max(batch, args.rows), seed=5)]
        systems = {"plain": RAST(m_base, pairs, tokenizer=tok, batch_size=batch),
                   "speculative": RAST(m_base, pairs, tokenizer=tok, batch_size=batch, speculative=args.gamma),
                   "adaptive": RAST(m_base, pairs, tokenizer=tok, batch_size=batch, speculative=args.gamma,
                                    speculative_mode="adaptive")}
        rates: dict[str, list[float]] = {name: [] for name in systems}
        for eng in systems.values():  # warm-up: every program compiled
            eng.generate(prompts, params, progress=False)
        for _ in range(args.repeats):  # interleaved, so a noisy machine slows each alike
            for name, eng in systems.items():
                t0 = time.perf_counter()
                out = eng.generate(prompts, params, progress=False)
                rates[name].append(sum(c.num_tokens for r in out for c in r) / (time.perf_counter() - t0))
        median = {name: float(np.median(r)) for name, r in rates.items()}
        print(f"batch {batch}:")
        for name, eng in systems.items():
            st = eng.scheduler.stats
            extra = "" if st.acceptance is None else \
                f"   acceptance {st.acceptance:.0%}, {st.accepted_length:.2f} tokens per round"
            print(f"  {name:12s} {median[name]:9.1f} tok/s (range {min(rates[name]):.0f}-{max(rates[name]):.0f})"
                  f"   x{median[name] / median['plain']:.2f} of plain{extra}")


def verify_cost(args) -> None:
    from flax import nnx

    from jaxrast.models import CausalLM, KVCache, ModelConfig

    cfg = ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, attention_bias=True, tie_word_embeddings=True)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    context = 512

    @jax.jit
    def forward(state, tokens, cache):
        m = nnx.merge(graphdef, state)
        logits, cache = m(tokens, cache.index[:, None] + jnp.arange(tokens.shape[1]), cache=cache)
        return logits, cache

    print(f"\n== verification cost, Qwen2.5-0.5B shapes (random weights, "
          f"{sum(x.size for x in jax.tree.leaves(state)) / 1e6:.0f}M params, float32), batch 1, {context} cached ==")
    base = None
    for positions in (1, *[g + 1 for g in args.verify_gammas]):
        cache = KVCache.init(cfg, 1, context + 16, jnp.float32, per_row=True, mask=True)
        cache = cache.replace(index=jnp.full((1,), context, jnp.int32))
        tokens = jnp.ones((1, positions), jnp.int32)
        jax.block_until_ready(forward(state, tokens, cache))
        times = []
        for _ in range(args.repeats * 2):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(state, tokens, cache))
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        base = base or t
        label = "one position" if positions == 1 else f"γ = {positions - 1} ({positions} positions)"
        print(f"  {label:22s} {1e3 * t:8.1f} ms   x{t / base:.2f} of one position")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", help="toy family directory (default: the shipped one)")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rows", type=int, default=16, help="prompts per timed run (at least the batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--verify-gammas", type=int, nargs="+", default=[1, 3, 5, 7])
    ap.add_argument("--skip-verify", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cpus")
    toy(args)
    if not args.skip_verify:
        verify_cost(args)


if __name__ == "__main__":
    main()
