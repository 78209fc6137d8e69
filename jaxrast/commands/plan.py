"""`jaxrast plan`: memory per device of RAST decoding vs GRPO-training the base directly."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

NAME = "plan"
HELP = ("Memory per device of RAST decoding (base + small pairs) vs GRPO-training the base itself, "
        "from config.json alone, and whether it fits on a mesh.")

EPILOG = """examples:
  # the paper's setting: Qwen2.5-32B + (SimpleRL-Zoo-14B − Qwen2.5-14B) on 8 H100s
  jaxrast plan --base Qwen/Qwen2.5-32B --pair hkust-nlp/Qwen-2.5-14B-SimpleRL-Zoo Qwen/Qwen2.5-14B \\
               --mesh 1,8,1 --device h100
  jaxrast plan --config configs/tpu_vm/v5e-16_qwen2.5-32b_rast.yaml --device v5e --json
  jaxrast plan --base ckpts/my-model/config.json --mesh 1,4,2 --device-memory 24

Models are checkpoint directories, config.json files, embedded configs (Qwen2.5-0.5B ... 72B, Qwen3-0.6B ... 32B,
Llama-3.1-8B/70B and their Instruct / SimpleRL-Zoo variants) or hub ids in the local HF cache.
Memory is in GB (1e9 bytes); --device-memory takes the vendor's GiB figure (16 for v5e).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--base", help="base model: checkpoint dir, config.json, embedded name or cached hub id")
    add("--pair", nargs="+", action="append", metavar="RL REF", help="a small pair: RL REF [LAM] (repeatable)")
    add("--config", help="a `jaxrast decode` YAML: takes base, pairs, batch_size, max_new_tokens, dtype, mesh")
    add("--mesh", help="mesh sizes DATA,FSDP,TENSOR (e.g. 1,8,1; default 1,1,1)")
    add("--batch", type=int, help="rows decoded together (default: the config's batch_size, else 16)")
    add("--prompt-len", type=int, default=512, help="prompt tokens per row (default 512)")
    add("--new-tokens", type=int, help="generated tokens per row (default: max_new_tokens, else 1024)")
    add("--median-new-tokens", type=int, help="concurrency: the median generated length of a long-tailed "
        "workload (log-normal, σ = 1, capped at --new-tokens; default an eighth of it)")
    add("--samples", type=int, default=1, help="concurrency: samples per prompt (n), sharing its pages when paged "
        "(default 1)")
    add("--page-size", type=int, default=16, help="concurrency: tokens per KV page (default 16)")
    add("--dtype", choices=("bfloat16", "float32", "float16"), help="weights/KV/activations (default bfloat16)")
    add("--micro-batch", type=int, default=1, help="GRPO: sequences per forward/backward per data-parallel "
        "shard, i.e. per data×fsdp slice of the mesh (default 1)")
    add("--seq-len", type=int, help="GRPO: tokens per sequence (default prompt-len + new-tokens)")
    add("--rollout-batch", type=int, help="GRPO: rows per rollout decode (default --batch)")
    add("--no-remat", action="store_true", help="GRPO: keep every block's activations (no rematerialisation)")
    add("--master-dtype", default="float32", choices=("float32", "bfloat16"), help="GRPO: policy weights and gradients")
    add("--optimizer-dtype", default="float32", choices=("float32", "bfloat16"), help="GRPO: Adam m and v")
    add("--device", default="h100", help="device preset for the capacity: v3 v4 v5e v5p v6e l4 a100-40 a100 h100 "
        "h200 b200 (default h100)")
    add("--device-memory", type=float, metavar="GIB", help="memory per device in GiB (overrides --device)")
    add("--usable", type=float, default=0.9, help="share of device memory usable for these buffers (default 0.9)")
    add("--json", action="store_true", help="print the plan as JSON")


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Merges --config (a DecodeConfig YAML) with the flags; flags win."""
    base, pairs, batch, new, dtype, mesh = args.base, [], None, None, None, None
    if args.config:
        from jaxrast.commands.decode_job import DecodeConfig
        from jaxrast.runtime.config import load_config

        cfg = load_config(DecodeConfig, args.config)
        base = base or cfg.base
        pairs = [(p[0], p[1]) for p in cfg.pairs]
        batch, new, mesh = cfg.batch_size, cfg.max_new_tokens, cfg.mesh
        dtype = None if cfg.dtype == "auto" else cfg.dtype
    if args.pair:
        from jaxrast.commands.flags import finite_lam

        for p in args.pair:
            if len(p) not in (2, 3):
                raise ValueError(f"--pair takes RL REF [LAM], got {len(p)} values: {p}.")
            if len(p) == 3:
                finite_lam(p[2], f"--pair {p[0]} {p[1]} LAM")
        pairs = [(p[0], p[1]) for p in args.pair]
    if not base:
        raise ValueError("name the base model: --base PATH_OR_NAME (or --config with a `base:` field).")
    return {"base": base, "pairs": pairs, "batch": args.batch or batch or 16,
            "new_tokens": args.new_tokens or new or 1024, "dtype": args.dtype or dtype or "bfloat16",
            "mesh": args.mesh or mesh or "1,1,1"}


def _section(plan, sizes, capacity: float) -> dict[str, Any]:
    """One plan (a function of the mesh sizes) on `sizes`, with the smallest mesh that fits."""
    from jaxrast.plan.memory import smallest_mesh, totals

    components = plan(sizes)
    total, per_device = totals(components, sizes)
    return {"components": [{"name": c.name, "params": c.params, "total_bytes": c.total(),
                            "per_device_bytes": c.per_device(sizes)} for c in components],
            "total_bytes": total, "per_device_bytes": per_device, "fits": per_device <= capacity,
            "smallest_mesh": smallest_mesh(plan, capacity)}


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    from jaxrast.commands.flags import PlanFlags
    from jaxrast.plan.memory import DEVICES, DecodeShape, TrainShape, grpo_plan, rast_plan, resolve_config
    from jaxrast.runtime.config import check_flags
    from jaxrast.runtime.mesh import mesh_sizes

    check_flags(args, PlanFlags)  # sizes and counts >= 1, memory and shares finite and > 0
    inp = _inputs(args)
    sizes = mesh_sizes(inp["mesh"])
    if any(v == -1 for v in sizes.values()):
        raise ValueError(f"mesh {inp['mesh']!r}: plan has no devices to count, so give every size "
                         "explicitly (e.g. --mesh 1,8,1 instead of 1,-1,1).")
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"mesh {inp['mesh']!r}: every size must be >= 1 (e.g. --mesh 1,8,1).")
    if args.device_memory is not None:
        device, gib = f"{args.device_memory:g} GiB device", args.device_memory
    elif args.device.lower() in DEVICES:
        device, gib = args.device.lower(), DEVICES[args.device.lower()]
    else:
        raise ValueError(f"unknown --device {args.device!r}; use one of {', '.join(DEVICES)} "
                         "or give --device-memory GIB.")
    if not 0 < args.usable <= 1:
        raise ValueError(f"--usable must be in (0, 1], got {args.usable}.")
    capacity = gib * 2**30 * args.usable
    models = [("base", inp["base"], resolve_config(inp["base"]))]
    for rl, ref in inp["pairs"]:
        models += [("rl", rl, resolve_config(rl)), ("ref", ref, resolve_config(ref))]
    decode = DecodeShape(batch=inp["batch"], prompt_len=args.prompt_len, new_tokens=inp["new_tokens"],
                         dtype=inp["dtype"])
    train = TrainShape(micro_batch=args.micro_batch, seq_len=args.seq_len or decode.length,
                       rollout_batch=args.rollout_batch or decode.batch, remat=not args.no_remat,
                       dtype=inp["dtype"], master_dtype=args.master_dtype, optimizer_dtype=args.optimizer_dtype)

    def grpo(mesh: dict[str, int]):
        # --micro-batch is per data-parallel shard, so the global micro-batch grows with the mesh.
        shards = mesh["data"] * mesh["fsdp"]
        return grpo_plan(inp["base"], models[0][2], dataclasses.replace(train, micro_batch=train.micro_batch * shards))

    devices = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    rast = _section(lambda _: rast_plan(models, decode), sizes, capacity)
    return {"mesh": sizes, "devices": devices,
            "device": {"name": device, "memory_gib": gib, "usable": args.usable, "capacity_bytes": capacity},
            "base": inp["base"], "pairs": inp["pairs"],
            "decode": {**dataclasses.asdict(decode), "length": decode.length},
            "train": {**dataclasses.asdict(train),
                      "micro_batch_global": train.micro_batch * sizes["data"] * sizes["fsdp"]},
            "rast": rast, "concurrency": _concurrency(args, models, decode, rast, capacity, devices),
            "grpo": _section(grpo, sizes, capacity)}


def _concurrency(args, models, decode, rast: dict[str, Any], capacity: float, devices: int) -> dict[str, Any]:
    """Rows in flight, dense vs paged, in the KV memory the plan leaves: every device's
    capacity less its weights and activations."""
    from jaxrast.plan.concurrency import Workload, concurrency
    from jaxrast.plan.memory import itemsize

    fixed = sum(c["per_device_bytes"] for c in rast["components"] if not c["name"].startswith("KV cache"))
    work = Workload(prompt_len=decode.prompt_len, new_tokens=decode.new_tokens,
                    median_new=args.median_new_tokens or max(1, decode.new_tokens // 8), samples=args.samples,
                    page_size=args.page_size)
    roles: dict[str, tuple[list[str], Any]] = {}  # a model listed twice (a shared ref) holds one cache
    for role, name, cfg in models:
        roles.setdefault(name, ([], cfg))[0].append(role)
    named = [("/".join(r), cfg) for r, cfg in roles.values()]
    return concurrency(named, work, max(0.0, capacity - fixed) * devices, itemsize(decode.dtype))


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def _table(title: str, section: dict[str, Any], report: dict[str, Any]) -> list[str]:
    width = max(44, *(len(c["name"]) + 2 for c in section["components"]))
    lines = [title, f"  {'component':{width}s}{'params':>10s}{'total GB':>12s}{'per device GB':>16s}"]
    for c in section["components"]:
        params = f"{c['params'] / 1e9:.2f} B" if c["params"] else ""
        lines.append(f"  {c['name']:{width}s}{params:>10s}{_gb(c['total_bytes']):>12s}"
                     f"{_gb(c['per_device_bytes']):>16s}")
    lines.append(f"  {'total':{width}s}{'':>10s}{_gb(section['total_bytes']):>12s}"
                 f"{_gb(section['per_device_bytes']):>16s}")
    dev, mesh = report["device"], report["mesh"]
    verdict = "yes" if section["fits"] else "NO"
    lines.append(f"  fits on {report['devices']} × {dev['name']} ({dev['memory_gib']:g} GiB, "
                 f"{100 * dev['usable']:.0f}% usable = {_gb(dev['capacity_bytes'])} GB each), mesh "
                 f"data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}: {verdict}")
    best = section["smallest_mesh"]
    if best:
        n = best["data"] * best["fsdp"] * best["tensor"]
        lines.append(f"  smallest power-of-two mesh that fits: {n} × {dev['name']} "
                     f"(--mesh {best['data']},{best['fsdp']},{best['tensor']})")
    else:
        lines.append("  no mesh of up to 4096 devices fits (batch-sharded buffers stop shrinking once "
                     "data×fsdp exceeds the batch)")
    return lines


def _concurrency_lines(c: dict[str, Any], d: dict[str, Any]) -> list[str]:
    per_token = ", ".join(f"{name} {b / 1024:,.1f} KiB" for name, b in c["kv_bytes_per_token"].items())
    dense, paged, shared = c["dense_rows"], c["paged_rows"], c["paged_rows_shared_prompt"]
    gain = f" ({paged / dense:.1f}×)" if dense else ""
    lines = [f"  rows in flight, in the {_gb(c['kv_budget_bytes'])} GB the weights and activations leave "
             f"(KV per token: {per_token}):",
             f"    dense slots of {d['prompt_len']} + {d['new_tokens']} positions: {dense:,}",
             f"    paged, new tokens log-normal (median {c['median_new_tokens']}, σ 1, cap {d['new_tokens']}: "
             f"{c['expected_new_tokens']:,.0f} expected), pages of {c['page_size']}: {paged:,}{gain}"]
    if c["samples"] > 1:
        lines.append(f"    paged, n = {c['samples']} samples sharing each prompt's pages: {shared:,}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    d, t = report["decode"], report["train"]
    pairs = len(report["pairs"])
    rast_title = (f"RAST decoding: {report['base']} + {pairs} pair{'s' * (pairs != 1)}, {d['dtype']}, "
                  f"batch {d['batch']} × ({d['prompt_len']} prompt + {d['new_tokens']} new) tokens")
    grpo_title = (f"GRPO-training {report['base']} directly: Adam, micro-batch {t['micro_batch_global']} × "
                  f"{t['seq_len']} tokens ({t['micro_batch']} per data-parallel shard), rollouts "
                  f"{t['rollout_batch']} × {t['seq_len']}")
    lines = (_table(rast_title, report["rast"], report) + _concurrency_lines(report["concurrency"], d) + [""]
             + _table(grpo_title, report["grpo"], report))
    ratio = report["grpo"]["total_bytes"] / report["rast"]["total_bytes"]
    lines += ["", f"GRPO on the base needs {ratio:.1f}× the memory of RAST decoding "
              f"({_gb(report['grpo']['total_bytes'])} GB vs {_gb(report['rast']['total_bytes'])} GB in all)."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = build_report(args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
