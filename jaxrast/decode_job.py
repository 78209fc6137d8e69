"""A decoding job: dataset rows -> prompts -> RAST completions appended to a JSONL file.

The output is resumable: rows are appended (and fsync'ed) as each batch finishes, and a
rerun of the same command skips every (id, sample) already written. A row's random stream
depends only on (seed, id, sample), so resumed rows are the rows an uninterrupted run
would have produced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any

PAIR_HELP = "RL REF LAM"
DEFAULT_STOP = ("\nQuestion:",)  # the paper's prompt: base models go on to invent a next question


@dataclasses.dataclass
class DecodeConfig:
    base: str | None = None
    pairs: tuple[tuple[Any, ...], ...] = ()  # ((rl_path, ref_path, lam), ...)
    mode: str = "auto"  # auto | base | rl | rast
    dataset: str = "math500"  # benchmark name or JSONL file with id + question
    fields: dict | None = None  # field map for a custom dataset (see jaxrast.data.FieldMap)
    limit: int | None = None  # first N rows only
    prompt_template: str = "paper"  # "paper", "qwen_boxed" or a format string over the row
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    n: int = 1
    max_new_tokens: int = 1024
    seed: int = 0
    stop: tuple[str, ...] = DEFAULT_STOP
    lam_schedule: str = "constant"
    out: str = "results.jsonl"
    batch_size: int = 16
    cache_segments: int = 8  # KV caches grow in ~this many steps (1: one full-length cache, fewer compiles)
    workers: int | None = None  # concurrent decode programs per batch (None: 2 on one CPU device, else 1)
    dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    mesh: str | None = None  # "data,fsdp,tensor", e.g. "1,-1,1"; None: one device
    allow_pickle: bool = False
    save_token_ids: bool = False  # also write prompt_ids and token_ids: exact input for `jaxrast analyze`
    # per-step top tokens of base / delta / combined for rows "ID" or "ID:SAMPLE" decoded in this
    # run, teacher-forced afterwards (see jaxrast.analysis); written to trace_out
    trace_rows: tuple[str, ...] = ()
    trace_top_k: int = 5
    trace_out: str | None = None  # default: <out without .jsonl>.trace.jsonl

    def resolved_mode(self) -> str:
        if self.mode not in ("auto", "base", "rl", "rast"):
            raise ValueError(f"mode {self.mode!r} is not one of auto, base, rl, rast.")
        if self.mode == "auto":
            return "rast" if self.pairs else "base"
        return self.mode


def row_uid(row_id: str) -> int:
    """A stable 31-bit integer per row id: the row's random stream does not depend on order."""
    return zlib.crc32(str(row_id).encode()) & 0x7FFFFFFF


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, as RAST would encode its text. Refuses prompts with
    characters the tokenizer drops (a closed character vocabulary such as the toy family's):
    the models would silently see other text than the prompt."""
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        lost = {c for c in set(prompt) - set(tokenizer.decode(ids)) if not c.isspace()}
        if lost:
            raise ValueError(f"the tokenizer cannot encode {''.join(sorted(lost))!r} of the prompt {prompt[:60]!r}; "
                             "use a prompt template and data within its vocabulary (the toy family's "
                             "template is '{question}').")
    return encoded


def read_finished(path: str, run: dict[str, Any]) -> set[tuple[str, int]]:
    """(id, sample) pairs already in `path`. A torn last line (a crash mid-write) is cut off
    so the file stays valid JSONL; rows from a different run configuration are an error."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno} is not valid JSON; repair or remove the line, or use a new --out.") from None
        # keys a row lacks were not recorded by the jaxrast that wrote it: not a difference
        diff = {k: (row[k], run[k]) for k in run if k in row and row[k] != run[k]}
        if diff:
            raise ValueError(f"{path} already holds rows of another run ({', '.join(f'{k}: file {a!r}, now {b!r}' for k, (a, b) in diff.items())}). "
                             "Use a new --out file, or the same settings to resume.")
        done.add((str(row["id"]), int(row["sample"])))
    return done


def _finished_everywhere(path: str, run: dict[str, Any]) -> set[tuple[str, int]]:
    """`read_finished` on process 0 (it may cut a torn line off the file), shared with every
    process so all of them decode the same rows; its error, if any, is raised everywhere."""
    from jaxrast.distributed import broadcast_json, is_main, process_count

    if process_count() == 1:
        return read_finished(path, run)
    shared: dict[str, Any] = {}
    if is_main():
        try:
            shared = {"done": sorted(read_finished(path, run))}
        except (ValueError, OSError) as err:
            shared = {"error": str(err)}
    shared = broadcast_json(shared)
    if "error" in shared:
        raise ValueError(shared["error"])
    return {(str(i), int(s)) for i, s in shared["done"]}


def _load_models(cfg: DecodeConfig, mode: str, mesh, dtype):
    from jaxrast.checkpoints import load_model
    from jaxrast.decoding import Pair

    cache: dict[str, tuple] = {}

    def load(path):  # a checkpoint used twice (a shared ref) is loaded once
        if path not in cache:
            cache[path] = load_model(path, dtype=dtype, mesh=mesh, allow_pickle=cfg.allow_pickle)
        return cache[path]

    for p in cfg.pairs:
        if len(p) != 3:
            raise ValueError(f"each pair needs {PAIR_HELP}; got {list(p)}.")
    if mode in ("rast", "rl") and not cfg.pairs:
        raise ValueError(f"mode {mode!r} needs a pair: --pair RL REF LAM (or --rl/--ref/--lam).")
    if mode in ("rast", "base") and not cfg.base:
        raise ValueError(f"mode {mode!r} needs --base.")
    if mode == "rl":  # the small RL model alone: neither the base nor any ref is loaded
        model, _, tok = load(cfg.pairs[0][0])
        return model, [], tok
    base, _, tok = load(cfg.base)
    if mode == "base":  # the small models are not loaded at all
        return base, [], tok
    pairs = []
    for rl_path, ref_path, lam in cfg.pairs:
        rl, _, rl_tok = load(rl_path)
        ref, _, ref_tok = load(ref_path)
        from jaxrast.decoding import check_tokenizers_compatible
        check_tokenizers_compatible(rl_tok, ref_tok, f"ref {ref_path}")
        pairs.append(Pair(rl, ref, float(lam), tokenizer=rl_tok))
    return base, pairs, tok


def run_decode(cfg: DecodeConfig, progress: bool | None = None) -> dict[str, Any]:
    """Runs the job; returns a summary (rows written, skipped, tokens).

    In a multi-process run every process decodes (each feeding its devices' slices of the
    batch) and only process 0 reads and writes `cfg.out`, on its own file system.
    """
    import contextlib

    import jax

    from jaxrast.checkpoints import as_dtype
    from jaxrast.data import canonical_name, list_benchmarks, load_rows
    from jaxrast.decoding import RAST, SamplingParams
    from jaxrast.distributed import is_main, on_every_process, process_count
    from jaxrast.prompts import get_template, render
    from jaxrast.sharding import parse_mesh

    mode = cfg.resolved_mode()
    template = get_template(cfg.prompt_template)
    is_benchmark = cfg.fields is None and cfg.dataset.lower() in {*list_benchmarks(), "minerva_math", "olympiad", "math"}
    rows = on_every_process(lambda: load_rows(cfg.dataset, cfg.fields, require_answer=False), "reading the dataset")
    rows = rows[: cfg.limit]
    benchmark = canonical_name(cfg.dataset) if is_benchmark else None
    lams = [float(p[2]) for p in cfg.pairs] if mode == "rast" else []
    # checked before any model is loaded
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens, n=cfg.n, stop_strings=tuple(cfg.stop),
                            seed=cfg.seed)
    # Everything that shapes a row's text: rows written under other settings must not be mixed in.
    models = {"rl": [cfg.pairs[0][0]] if cfg.pairs else [], "base": [cfg.base],
              "rast": [cfg.base, *(str(path) for p in cfg.pairs for path in p[:2])]}[mode]
    run = {"seed": cfg.seed, "mode": mode, "lam": lams, "temperature": cfg.temperature, "top_p": cfg.top_p,
           "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop),
           "lam_schedule": cfg.lam_schedule if mode == "rast" else None, "prompt_template": template,
           "models": models}
    finished = _finished_everywhere(cfg.out, run)
    todo = [r for r in rows if any((r["id"], s) not in finished for s in range(cfg.n))]
    summary = {"rows": len(rows), "skipped": len(rows) - len(todo), "written": 0, "tokens": 0, "out": cfg.out}
    if not todo:
        return summary
    dtype = ("float32" if jax.default_backend() == "cpu" else "bfloat16") if cfg.dtype == "auto" else cfg.dtype
    # Several processes without a mesh would each decode everything on one device: use them all.
    mesh = parse_mesh(cfg.mesh or ("1,-1,1" if process_count() > 1 else None))
    model, pairs, tok = on_every_process(lambda: _load_models(cfg, mode, mesh, as_dtype(dtype)), "loading the models")
    if tok is None:
        raise ValueError("the checkpoint has no tokenizer files; decoding text needs one.")
    engine = RAST(model, pairs, tokenizer=tok, mesh=mesh, lam_schedule=cfg.lam_schedule,
                  batch_size=cfg.batch_size, cache_segments=cfg.cache_segments, workers=cfg.workers)
    prompts = [render(template, r) for r in todo]
    prompt_ids = encode_prompts(tok, prompts)  # once: decoding and --save-token-ids share them
    traced = None
    if cfg.trace_rows:
        from jaxrast.analysis import Trajectory, parse_row_selector
        traced, to_trace = parse_row_selector(cfg.trace_rows), []
    main = is_main()
    if main:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "a", encoding="utf-8") if main else contextlib.nullcontext() as out:
        for batch in engine.generate_iter(prompt_ids, params, row_ids=[row_uid(r["id"]) for r in todo],
                                          progress=progress if main else False):
            lines = []
            for c in batch:
                row = todo[c.index]
                if (row["id"], c.sample) in finished:
                    continue  # written before a crash; the new sample is identical
                record = {"id": row["id"], "benchmark": benchmark, "prompt": prompts[c.index], "sample": c.sample,
                          "completion": c.text, "num_tokens": c.num_tokens, "finish_reason": c.finish_reason, **run}
                if cfg.save_token_ids:
                    record.update(prompt_ids=prompt_ids[c.index], token_ids=c.token_ids)
                if traced is not None and traced(row["id"], c.sample):
                    to_trace.append(Trajectory(prompt_ids[c.index], c.token_ids, row["id"], c.sample))
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                summary["tokens"] += c.num_tokens
            if out is not None:
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())
            summary["written"] += len(lines)
    if traced is not None and to_trace:
        from jaxrast.analysis_reports import write_trace
        summary["trace"] = write_trace(cfg.trace_out or cfg.out.removesuffix(".jsonl") + ".trace.jsonl", to_trace,
                                       model, pairs, tok, vocab=engine.vocab, top_k=cfg.trace_top_k,
                                       lam_schedule=engine.schedule, batch_size=cfg.batch_size, progress=progress)
    return summary
