"""Paged KV against dense slots at equal KV memory (`benchmarks/decode.py --workload paged`).

The dense engine at D slots (D × max_len positions of every model) against the paged engine
given the same positions as a pool of 16-position pages, with up to 64 rows in flight, on
the long-tailed workload (budgets log-normal, every row to its budget) and on n = 8 samples
of 512-token prompts. Runs take turns round by round (the machine's speed drifts); prints
tokens/s (medians and ranges), the ratio, rows in flight, page use, preemptions and the
prompts prefilled. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import time

import numpy as np

PAGE = 16
ROWS = 64  # the paged engine's slots: an upper bound on rows in flight


def _engines(base, pairs, tok, max_len: int, dense_slots: int):
    from jaxrast.models.attention import cache_length
    from jaxrast.rast.decoding import RAST

    pages = dense_slots * -(-cache_length(max_len) // PAGE)  # the dense slots' positions, in pages
    return {f"dense {dense_slots} slots": RAST(base, pairs, tokenizer=tok, batch_size=dense_slots, max_len=max_len,
                                               workers=1),
            f"paged, same memory ({pages} pages)": RAST(base, pairs, tokenizer=tok, batch_size=ROWS, max_len=max_len,
                                                        page_size=PAGE, pages=pages, workers=1)}


def _run(rast, requests_of) -> dict:
    sched, stats = rast.scheduler, rast.scheduler.stats
    before = dict(pre=stats.preemptions, prefilled=stats.prefilled, shared=stats.shared)
    stats.peak_rows = stats.peak_pages = 0
    requests = requests_of()
    t0 = time.perf_counter()
    done = sum(len(batch) for batch in sched.run(requests))
    seconds = time.perf_counter() - t0
    assert done == len(requests) and all(len(r.token_ids) == r.params.max_tokens for r in requests)
    return dict(seconds=seconds, tokens=sum(len(r.token_ids) for r in requests), rows=stats.peak_rows,
                pages=stats.peak_pages, preempted=stats.preemptions - before["pre"],
                prefilled=stats.prefilled - before["prefilled"], shared=stats.shared - before["shared"])


def _compare(title: str, engines: dict, requests_of, repeats: int) -> None:
    print(f"\n== {title} ==")
    for rast in engines.values():
        _run(rast, requests_of)  # warm-up: every program compiled
    runs = {name: [] for name in engines}
    for _ in range(repeats):
        for name, rast in engines.items():
            runs[name].append(_run(rast, requests_of))
    rates = {}
    for name, rs in runs.items():
        r = [x["tokens"] / x["seconds"] for x in rs]
        rates[name] = float(np.median(r))
        last = rs[-1]
        pages = f", pages at most {last['pages']}" if "paged" in name else ""
        print(f"  {name:34s} {rates[name]:8.1f} tok/s (range {min(r):.1f}-{max(r):.1f})   rows in flight at most "
              f"{last['rows']}{pages}, preempted {last['preempted']}, prompts prefilled {last['prefilled']} "
              f"(+{last['shared']} shared)")
    dense, paged = rates.values()
    print(f"  paged / dense at equal KV memory: {paged / dense:.2f}x")


def paged(args, paths, models, tok, toy: bool) -> None:
    from long_tail import workload

    from jaxrast.rast.decoding import Pair
    from jaxrast.rast.requests import Request, RequestParams

    base, rl, ref = models
    pairs = [Pair(rl, ref, args.lam)]
    prompts, budgets = workload(args, tok, toy)
    max_len = -(-(max(map(len, prompts)) + max(budgets)) // 64) * 64

    def long_tail():
        return [Request(p, RequestParams(max_tokens=b, temperature=1.0, top_p=0.95, lam=(args.lam,), row_id=i,
                                         stop_ids=())) for i, (p, b) in enumerate(zip(prompts, budgets))]

    for slots in args.dense_slots:
        _compare(f"long-tail at the KV memory of {slots} dense slots: {len(budgets)} requests, budgets median "
                 f"{int(np.median(budgets))}, cap {max(budgets)}, RAST", _engines(base, pairs, tok, max_len, slots),
                 long_tail, args.repeats)

    rng = np.random.RandomState(1)
    shared = [rng.randint(3, len(tok) - 1, size=511).tolist() + [prompts[0][-1]] for _ in range(args.problems)]
    n_len = 512 + 64

    def samples():
        return [Request(p, RequestParams(max_tokens=32, temperature=1.0, top_p=0.95, lam=(args.lam,), row_id=i,
                                         sample=s, stop_ids=()))
                for i, p in enumerate(shared) for s in range(8)]

    _compare(f"n = 8 samples of {args.problems} 512-token prompts, 32 new tokens, at the KV memory of 16 dense slots",
             _engines(base, pairs, tok, n_len, 16), samples, args.repeats)
