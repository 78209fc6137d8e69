"""Serving under load, as `vllm bench serve` measures it: Poisson arrivals at several request
rates, long-tailed `max_tokens`, streamed completions through the official openai client.

Side by side, on the same prompts, budgets and arrival times: `jaxrast serve` decoding RAST
on the toy family (M_base + 1.0·(S_RL − S_base): three models per token) and `transformers
serve` (the PyTorch peer that runs here) serving M_base alone, with its continuous batching.
Per server and rate: request and token throughput, time to first token (TTFT) and time per
output token after the first (TPOT), mean / p50 / p99.

    python benchmarks/serve.py                       # rates 2 8 32 req/s, 64 requests each
    python benchmarks/serve.py --rates 4 --requests 32 --no-peer

The peer needs `pip install accelerate` besides the test extras.

Both servers bind 127.0.0.1 on free ports and are stopped at the end. Not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np

FAMILY = os.path.join(os.path.dirname(__file__), "..", "jaxrast", "toy", "family")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_up(url: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s")


def start(command: list[str], model: str):
    """A server subprocess (so the load generator's Python never shares its interpreter):
    returns (base URL, model name, stop)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url)
    except RuntimeError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"{command[0]} did not start:\n" + proc.stderr.read()[-2000:]) from None

    def stop():
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return url, model, stop


def start_jaxrast(args):
    return start([sys.executable, "-m", "jaxrast", "serve", "--base", f"{FAMILY}/m_base", "--pair", f"{FAMILY}/s_rl",
                  f"{FAMILY}/s_base", "1.0", "--max-slots", str(args.slots), "--max-len", "256"], "jaxrast")


def start_transformers(args):
    """transformers serve M_base, offline, on the CPU, with its continuous batching."""
    path = os.path.abspath(f"{FAMILY}/m_base")
    beside = os.path.join(os.path.dirname(sys.executable), "transformers")  # the venv's, when not on PATH
    cli = beside if os.path.exists(beside) else "transformers"
    return start([cli, "serve", path, "--device", "cpu", "--continuous-batching"], path)


async def one(client, model, prompt, max_tokens, extra) -> dict:
    t0 = time.perf_counter()
    first = last = None
    text = ""
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                             top_p=0.95, stream=True, extra_body=extra(max_tokens))
    async for chunk in stream:
        for c in chunk.choices:
            if c.text:
                now = time.perf_counter()
                first = first or now
                last = now
                text += c.text
    return {"start": t0, "ttft": (first or time.perf_counter()) - t0, "end": last or time.perf_counter(),
            "first": first, "tokens": len(text)}  # the toy tokenizer is one character per token


async def load(url, model, prompts, budgets, gaps, extra) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    tasks = []
    for prompt, budget, gap in zip(prompts, budgets, gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(client, model, prompt, budget, extra)))
    results = await asyncio.gather(*tasks)
    await client.close()
    return results


def report(name: str, rate: float, results: list[dict]) -> dict:
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    tpot = np.array([(r["end"] - r["first"]) / (r["tokens"] - 1) for r in results
                     if r["first"] and r["tokens"] > 1]) * 1e3
    row = {"requests_per_s": len(results) / span, "tokens_per_s": tokens / span, "ttft_p50": np.median(ttft)}
    print(f"  {name:24s} rate {rate:5.1f}/s: {row['requests_per_s']:6.2f} req/s {row['tokens_per_s']:8.1f} tok/s | "
          f"TTFT ms mean {ttft.mean():7.1f} p50 {np.median(ttft):7.1f} p99 {np.percentile(ttft, 99):7.1f} | "
          f"TPOT ms mean {tpot.mean():6.2f} p50 {np.median(tpot):6.2f} p99 {np.percentile(tpot, 99):6.2f}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 8.0, 32.0], help="requests per second")
    ap.add_argument("--requests", type=int, default=64, help="requests per rate")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--median", type=int, default=32, help="median max_tokens (log-normal, σ = 1)")
    ap.add_argument("--cap", type=int, default=200)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from jaxrast.toy.task import ChainTask

    rng = np.random.default_rng(0)
    prompts = [r["question"] for r in ChainTask().rows(args.requests, seed=2024)]
    budgets = np.clip(np.round(rng.lognormal(np.log(args.median), 1.0, args.requests)), 1, args.cap).astype(int)
    # every request runs to its budget on both servers (a stop would make the token counts differ):
    # jaxrast masks the stop id until max_tokens, transformers serve gets a generation config without one
    servers = [("jaxrast serve (RAST, 3 models)", start_jaxrast, lambda n: {"lam": 1.0, "min_tokens": n})]
    if not args.no_peer:
        if importlib.util.find_spec("accelerate") is None:  # transformers 5.24's serve loads with a device map
            raise SystemExit("the transformers serve peer needs accelerate: pip install accelerate "
                             "(or run with --no-peer to measure jaxrast alone)")
        peer_config = json.dumps({"eos_token_id": -1, "do_sample": True})
        servers.append(("transformers serve (base)", start_transformers, lambda n: {"generation_config": peer_config}))
    gaps = {rate: rng.exponential(1.0 / rate, args.requests).tolist() for rate in args.rates}  # both servers alike
    rows: dict = {}
    print(f"{args.requests} requests per rate, max_tokens log-normal median {args.median} cap {args.cap} "
          f"(mean {budgets.mean():.0f}), τ = 1, top-p 0.95, streamed")
    for name, start, extra in servers:
        url, model, stop = start(args)
        try:
            asyncio.run(load(url, model, prompts[:8], [4] * 8, [0.0] * 8, extra))  # warm-up
            for rate in args.rates:
                rows[(name, rate)] = report(name, rate, asyncio.run(load(url, model, prompts, budgets.tolist(),
                                                                         gaps[rate], extra)))
        finally:
            stop()
    if len(servers) > 1:
        print("\nratios jaxrast / transformers at the same rate:")
        for rate in args.rates:
            a, b = rows[(servers[0][0], rate)], rows[(servers[1][0], rate)]
            print(f"  rate {rate:5.1f}/s: token throughput x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
                  f"p50 TTFT x{a['ttft_p50'] / b['ttft_p50']:.2f} (lower is better)")


if __name__ == "__main__":
    main()
