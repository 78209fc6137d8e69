"""Decoding throughput, two workloads, every peer run in the same script.

long-tail (default): 256 requests whose budgets are drawn from a log-normal (σ = 1; median
64 and cap 1024 on random ~10M / ~1M checkpoints built here, median 48 and cap 224 on the
shipped toy family with `--family`), stop ids disabled so every row runs to its budget, 16
slots: the continuous-batching engine vs the static path at the same batch size (batches in
arrival order, each run to its longest budget), for RAST and the base alone, and
transformers' continuous batching (`generate_batch`'s manager, base model only, 16 requests
per batch) on the same checkpoint, prompts and budgets. Prints useful tokens/s (the sum of
the budgets over the wall time), ratios and slot occupancy.

uniform: every row runs to the same length (batch 1 and 16): the engine and the static path
against a HuggingFace transformers PyTorch loop doing the same three-model logit arithmetic,
in the seed repo's (ozyyshr/RAST) two HF styles: a KV-cached loop (its decoder,
modeling/dexperts.py, the peer that matters) and an uncached one (analysis/greedy_delta.py
re-runs the whole prefix through all three models every step). Also base-only and the
per-step cost of fusion.

    python benchmarks/decode.py                               # long-tail, random checkpoints
    python benchmarks/decode.py --family jaxrast/toy/family   # long-tail on the toy family
    python benchmarks/decode.py --workload uniform --base B --rl R --ref F
    python benchmarks/decode.py --workload paged              # dense vs paged KV at equal memory

The static path is `static_batches.py` (the seed repo's batching: each batch decoded until its
longest row ends). Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np


def build_random(directory: str, hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
                 vocab: int, seed: int) -> str:
    """A random Qwen2 checkpoint (our own init, saved with save_hf) plus a char tokenizer."""
    from flax import nnx

    from jaxrast.models import CausalLM, ModelConfig
    from jaxrast.models.hf import save_hf
    from jaxrast.toy.tokenizer import char_tokenizer

    cfg = ModelConfig("qwen2", vocab, hidden, inter, layers, heads, kv_heads, hidden // heads,
                      attention_bias=True, eos_token_id=(1,))
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    save_hf(model, char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyz +-*=#:?.\n"), directory)
    n = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    print(f"built {directory}: {n / 1e6:.2f}M params")
    return directory


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    """Random prompts over the real (non-special) token ids."""
    rng = np.random.RandomState(0)
    return [rng.randint(3, vocab - 1, size=length).tolist() for _ in range(batch)]


def time_jax(engine, prompts, new_tokens: int, repeats: int = 5) -> float:
    """Seconds per generate call (after a compile/warm-up call), all rows `new_tokens` long."""
    from jaxrast.rast.decoding import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=new_tokens, stop_token_ids=())
    engine.generate(prompts, params, progress=False)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, params, progress=False)
        best = min(best, time.perf_counter() - t0)
    return best


def time_torch(paths, lams, prompts, new_tokens: int, vocab: int, repeats: int = 2, cached: bool = True) -> float:
    """The PyTorch reference loop: each step runs every HF model, combines
    z_base + Σλ(z_rl − z_ref), samples top-p, appends. cached=True gives every model its own
    KV cache, as the seed repo's HF decoder (modeling/dexperts.py) does; cached=False re-runs
    the full prefix through all three models every step, as its analysis/greedy_delta.py does."""
    import torch
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run():
        torch.manual_seed(0)
        caches = [None] * len(models)
        tokens, attn = ids, mask
        positions = torch.arange(ids.shape[1])[None].expand_as(ids)
        seq = ids
        for _ in range(new_tokens):
            logits = []
            for i, m in enumerate(models):
                if cached:
                    out = m(input_ids=tokens, attention_mask=attn, position_ids=positions,
                            past_key_values=caches[i], use_cache=True)
                    caches[i] = out.past_key_values
                else:
                    out = m(input_ids=seq, use_cache=False)
                logits.append(out.logits[:, -1, :vocab])
            z = logits[0]
            for k, lam in enumerate(lams):
                z = z + lam * (logits[1 + 2 * k] - logits[2 + 2 * k])
            probs = torch.softmax(z, -1)
            sorted_p, order = probs.sort(-1, descending=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < 0.95
            sorted_p = sorted_p * keep
            nxt = order.gather(-1, torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1))
            tokens = nxt
            seq = torch.cat([seq, nxt], 1)
            attn = torch.cat([attn, torch.ones_like(nxt)], 1)
            positions = positions[:, -1:] + 1

    with torch.no_grad():
        run()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return best


def uniform(args, paths, models, tok) -> None:
    """Every row to the same length: engine vs static path vs the seed repo's HF loops."""
    from static_batches import StaticBatches

    from jaxrast.rast.decoding import RAST, Pair

    base, rl, ref = models
    vocab = len(tok)
    print(f"\n== uniform: prompt {args.prompt_len}, {args.new_tokens} new tokens, top-p 0.95 ==")
    for batch in args.batches:
        prompts = prompts_for(batch, args.prompt_len, vocab)
        tokens = batch * args.new_tokens
        fit = dict(tokenizer=tok, batch_size=batch, max_len=-(-(args.prompt_len + args.new_tokens) // 64) * 64)
        engines = {
            "rast": RAST(base, [Pair(rl, ref, args.lam)], **fit),
            "rast static": StaticBatches(base, [Pair(rl, ref, args.lam)], tokenizer=tok, batch_size=batch),
            "base": RAST(base, **fit),
            "rl": RAST(rl, **fit),
            "ref": RAST(ref, **fit),
        }
        secs = {name: time_jax(e, prompts, args.new_tokens) for name, e in engines.items()}
        print(f"\nbatch {batch}:")
        for name, s in secs.items():
            print(f"  jaxrast {name:11s} {tokens / s:10.1f} tok/s  ({1e3 * s / args.new_tokens:.2f} ms/step)")
        print(f"  engine / static path (RAST): {secs['rast static'] / secs['rast']:.2f}x")
        fused = secs["rast"] / (secs["base"] + secs["rl"] + secs["ref"])
        print(f"  fusion: RAST step / (base + rl + ref steps) = {fused:.3f}   (RAST vs base alone: "
              f"{secs['rast'] / secs['base']:.2f}x the time)")
        if not args.no_torch:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            for cached, label in ((False, "uncached loop (greedy_delta.py style)"),
                                  (True, "KV-cached loop (dexperts.py style)")):
                t = time_torch(paths, [args.lam], prompts, args.new_tokens, vocab, cached=cached)
                print(f"  torch  rast  {tokens / t:10.1f} tok/s  ({1e3 * t / args.new_tokens:.2f} ms/step)  {label}")
                print(f"    speed-up jaxrast/torch {label}: {t / secs['rast']:.1f}x")



def warn_map_count(needed: int = 200_000) -> None:
    """XLA:CPU maps ~500 memory regions per compiled program, and this script compiles a few
    hundred (the static path one per batch length, the engine one per slot-count bucket): past
    Linux's vm.max_map_count LLVM fails with "Cannot allocate memory" and the process dies."""
    try:
        limit = int(open("/proc/sys/vm/max_map_count").read())
    except (OSError, ValueError):
        return
    if limit < needed:
        print(f"warning: vm.max_map_count is {limit}; this benchmark's programs may need more memory mappings "
              f"(raise it: sudo sysctl -w vm.max_map_count=262144)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("long-tail", "uniform", "both", "paged"), default="long-tail",
                    help="paged: dense slots vs paged KV at equal memory (benchmarks/paged.py)")
    ap.add_argument("--dense-slots", type=int, nargs="+", default=[4, 16],
                    help="paged: the dense slot counts whose memory both engines get (default 4 16)")
    ap.add_argument("--problems", type=int, default=4, help="paged: prompts of the n = 8 workload (default 4)")
    ap.add_argument("--family", help="the toy family directory (s_base, s_rl, m_base): long-tail median 48, cap 224")
    ap.add_argument("--base")
    ap.add_argument("--rl")
    ap.add_argument("--ref")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=256, help="long-tail requests (default 256)")
    ap.add_argument("--slots", type=int, default=16, help="long-tail batch size / engine slots (default 16)")
    ap.add_argument("--median", type=int, help="long-tail median budget (default 64; 48 on the toy family)")
    ap.add_argument("--cap", type=int, help="long-tail budget cap (default 1024; 224 on the toy family)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs after a warm-up (best is kept); long-tail systems take turns round by round")
    ap.add_argument("--prompt-len", type=int, default=64, help="uniform: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="uniform: new tokens per row")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="uniform: batch sizes")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    args = ap.parse_args()
    warn_map_count()

    from jaxrast.models.hf import load_model

    if args.family:
        paths = [os.path.join(args.family, n) for n in ("m_base", "s_rl", "s_base")]
    else:
        tmp = tempfile.mkdtemp(prefix="jaxrast_bench_")
        paths = [args.base or build_random(os.path.join(tmp, "base"), 320, 8, 8, 2, 960, 512, 0),
                 args.rl or build_random(os.path.join(tmp, "rl"), 128, 4, 4, 2, 384, 512, 1),
                 args.ref or build_random(os.path.join(tmp, "ref"), 128, 4, 4, 2, 384, 512, 2)]
    loaded = [load_model(p) for p in paths]
    models, tok = [m for m, _, _ in loaded], loaded[0][2]
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cpus")
    if args.workload in ("long-tail", "both"):
        from long_tail import long_tail
        long_tail(args, paths, models, tok, toy=bool(args.family))
    if args.workload in ("uniform", "both"):
        uniform(args, paths, models, tok)
    if args.workload == "paged":
        from paged import paged
        paged(args, paths, models, tok, toy=bool(args.family))


if __name__ == "__main__":
    main()
