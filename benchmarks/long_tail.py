"""The long-tailed decode workload of `benchmarks/decode.py`: per-request budgets from a
log-normal, every row running to its budget, through the engine, the static path and
transformers' continuous batching. See decode.py's docstring."""

from __future__ import annotations

import os
import time

import numpy as np


def budgets_for(n: int, median: int, cap: int, seed: int = 0) -> list[int]:
    """Log-normal (σ = 1) budgets with the given median, clipped to [1, cap]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), 1.0, n)), 1, cap).astype(int).tolist()


def workload(args, tok, toy: bool) -> tuple[list[list[int]], list[int]]:
    median = args.median or (48 if toy else 64)
    cap = args.cap or (224 if toy else 1024)
    if toy:
        from jaxrast.toy.task import ChainTask
        prompts = [tok(r["question"], add_special_tokens=False)["input_ids"]
                   for r in ChainTask().rows(args.requests, seed=31337)]
    else:
        rng = np.random.RandomState(0)
        prompts = [rng.randint(3, len(tok) - 1, size=32).tolist() for _ in range(args.requests)]
    return prompts, budgets_for(args.requests, median, cap)


def run_engine(rast, prompts, budgets) -> tuple[float, float]:
    """(seconds, slot occupancy) of the engine decoding every request to its budget."""
    from jaxrast.rast.requests import Request, RequestParams

    sched = rast.scheduler
    requests = [Request(p, RequestParams(max_tokens=b, temperature=1.0, top_p=0.95, lam=tuple(map(float, rast.lams)),
                                         row_id=i)) for i, (p, b) in enumerate(zip(prompts, budgets))]
    busy0, steps0 = sched.stats.busy_slot_steps, sched.stats.slot_steps
    t0 = time.perf_counter()
    done = sum(len(batch) for batch in sched.run(requests))
    seconds = time.perf_counter() - t0
    assert done == len(requests) and all(len(r.token_ids) == b for r, b in zip(requests, budgets))
    return seconds, (sched.stats.busy_slot_steps - busy0) / max(sched.stats.slot_steps - steps0, 1)


def run_static(rast, prompts, budgets) -> tuple[float, float]:
    """The static baseline (`StaticBatches`) at the same batch size: batches in arrival order,
    each decoded to its longest budget (a row's budget is its stop time, unknown in advance)."""
    from jaxrast.rast.decoding import SamplingParams

    size, t0, useful, computed = rast.batch_size, time.perf_counter(), 0, 0
    for start in range(0, len(prompts), size):
        chunk, need = prompts[start:start + size], budgets[start:start + size]
        params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=max(need), stop_token_ids=())
        rast.generate(chunk, params, row_ids=list(range(start, start + len(chunk))), progress=False)
        useful, computed = useful + sum(need), computed + max(need) * len(chunk)
    return time.perf_counter() - t0, useful / computed


def run_transformers(path: str, prompts, budgets, slots: int) -> float:
    """transformers' continuous batching (the manager behind `generate_batch`), base model
    only, `slots` requests per batch, each request with its own max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.95, eos_token_id=-1, max_new_tokens=max(budgets))
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(budgets),
                          num_requests=len(prompts))

    def run(ps, bs) -> float:
        with model.continuous_batching_context_manager(
                generation_config=config, block=True, timeout=30, workload_hints=hints,
                continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=slots)) as manager:
            t0 = time.perf_counter()
            for i, (p, b) in enumerate(zip(ps, bs)):
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=b, eos_token_id=-1)
            got = 0
            while got < len(ps):
                got += manager.get_result(timeout=60) is not None
            return time.perf_counter() - t0

    run(prompts[:slots], [8] * min(slots, len(prompts)))  # warm-up
    return run(prompts, budgets)


def long_tail(args, paths, models, tok, toy: bool) -> None:
    from static_batches import StaticBatches

    from jaxrast.rast.decoding import RAST, Pair

    base, rl, ref = models
    prompts, budgets = workload(args, tok, toy)
    useful = sum(budgets)
    print(f"\n== long-tail: {len(budgets)} requests, budgets median {int(np.median(budgets))}, mean "
          f"{np.mean(budgets):.0f}, max {max(budgets)} ({useful} tokens), {args.slots} slots, τ=1, top-p 0.95 ==")
    max_len = -(-(max(map(len, prompts)) + max(budgets)) // 64) * 64  # the workload's longest row
    systems = {
        "RAST engine": RAST(base, [Pair(rl, ref, args.lam)], tokenizer=tok, batch_size=args.slots, max_len=max_len),
        "RAST static": StaticBatches(base, [Pair(rl, ref, args.lam)], tokenizer=tok, batch_size=args.slots),
        "base engine": RAST(base, tokenizer=tok, batch_size=args.slots, max_len=max_len),
        "base static": StaticBatches(base, tokenizer=tok, batch_size=args.slots),
    }
    runs = {name: run_static if isinstance(rast, StaticBatches) else run_engine for name, rast in systems.items()}
    for name, rast in systems.items():
        runs[name](rast, prompts, budgets)  # warm-up: every program compiled
    # the timed runs take turns, round by round: this machine's speed drifts by up to 40% within
    # an hour, so runs of one system back to back would compare different machines
    timed: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    for round_ in range(args.repeats):
        for name, rast in systems.items():
            timed[name].append(runs[name](rast, prompts, budgets))
        engine, static = timed["RAST engine"][-1][0], timed["RAST static"][-1][0]
        print(f"  round {round_ + 1}: RAST engine / static path {static / engine:.2f}x")
    rates, occupancy = {}, {}
    for name in systems:
        best = min(timed[name], key=lambda r: r[0])
        rates[name], occupancy[name] = useful / best[0], best[1]
        print(f"  {name:18s} {rates[name]:9.1f} tok/s   slot occupancy {occupancy[name]:.0%}  (best of {args.repeats})")
    if not args.no_torch:
        seconds = run_transformers(paths[0], prompts, budgets, args.slots)
        rates["base transformers"] = useful / seconds
        print(f"  {'base transformers':18s} {rates['base transformers']:9.1f} tok/s   (continuous batching, "
              f"{args.slots} requests per batch)")
    print(f"  RAST engine / static path: {rates['RAST engine'] / rates['RAST static']:.2f}x   base engine / static "
          f"path: {rates['base engine'] / rates['base static']:.2f}x")
    if "base transformers" in rates:
        print(f"  base engine / transformers continuous batching: "
              f"{rates['base engine'] / rates['base transformers']:.2f}x")

