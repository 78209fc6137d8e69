"""A decoding job: dataset rows -> prompts -> RAST completions appended to a JSONL file.

The output is resumable: rows are appended (and fsync'ed) as each batch finishes, and a
rerun of the same command skips every (id, sample) already written. A row's random stream
depends only on (seed, id, sample), so resumed rows are the rows an uninterrupted run
would have produced.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from typing import Annotated, Any, Callable, Literal

from pydantic import Field

from jaxrast.data.jsonl import OutputFile, prompt_hash, shared_from_main
from jaxrast.data.prompts import CHAT, adds_special_tokens, encode_prompts, get_template, longest_token_bytes, render
from jaxrast.models.table import ModelTable, checkpoint_key
from jaxrast.runtime.config import Finite, Fraction, NonNegative, Positive, Texts, config_dataclass
from jaxrast.runtime.distributed import is_main, on_every_process, process_count
from jaxrast.runtime.files import check_writable

DEFAULT_STOP = ("\nQuestion:",)  # the paper's prompt: base models go on to invent a next question


@config_dataclass
class DecodeConfig:
    base: str | None = None
    pairs: tuple[tuple[str, str, Finite], ...] = ()  # ((rl_path, ref_path, lam), ...)
    mode: Literal["auto", "base", "rl", "rast"] = "auto"
    dataset: str = "math500"  # benchmark name or JSONL file with id + question
    fields: dict[str, str] | None = None  # field map for a custom dataset (see jaxrast.data.rows.FieldMap)
    limit: Positive | None = None  # first N rows only
    prompt_template: str = "paper"  # "paper", "qwen_boxed", "chat" (the tokenizer's) or a format string over the row
    system: str | None = None  # with prompt_template "chat": the system turn
    max_prompt_bytes: Positive | None = None  # longer prompts are refused (default: more than the context can hold)
    temperature: Annotated[Finite, Field(ge=0)] = 1.0  # 0: greedy
    top_p: Fraction = 0.95
    top_k: NonNegative = 0  # 0: off
    n: Positive = 1
    max_new_tokens: Positive = 1024
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    stop: Texts = DEFAULT_STOP
    min_tokens: NonNegative = 0  # stops cannot end a row before this many tokens (a thinking budget)
    continue_text: str = ""  # emitted instead of a stop id sampled before min_tokens (s1 budget forcing)
    lam_schedule: str = "constant"
    out: str = "results.jsonl"
    batch_size: Positive | None = None  # rows decoded at once (None: as many as kv_memory holds, within a ceiling)
    kv_memory: float | str | None = None  # KV cache GiB per device, or a share of free memory ('50%')
    page_size: Positive | None = None  # KV positions per page (None: dense slots of the whole length)
    workers: Positive | None = None  # concurrent slot groups (None: 2 on one CPU device, else 1)
    steps_per_call: Positive = 32  # engine decode steps per device call
    speculative: NonNegative = 0  # γ: the first pair's rl model drafts γ tokens per round (0: off)
    speculative_mode: Literal["on", "adaptive"] = "on"  # adaptive: speculate only while it is faster
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    mesh: str | None = None  # "data,fsdp,tensor", e.g. "1,-1,1"; None: one device
    allow_pickle: bool = False
    save_token_ids: bool = False  # also write prompt_ids and token_ids: exact input for `jaxrast analyze`
    # per-step top tokens of base / delta / combined for rows "ID" or "ID:SAMPLE" decoded in this
    # run, teacher-forced afterwards (see jaxrast.analysis.teacher_forcing); written to trace_out
    trace_rows: Texts = ()
    trace_top_k: Positive = 5
    trace_out: str | None = None  # default: <out without .jsonl>.trace.jsonl

    def resolved_mode(self) -> str:
        if self.mode == "auto":
            return "rast" if self.pairs else "base"
        return self.mode


def row_uid(row_id: str) -> int:
    """A stable 31-bit integer per row id: the row's random stream does not depend on order."""
    return zlib.crc32(str(row_id).encode()) & 0x7FFFFFFF


def load_decode_models(cfg: DecodeConfig, mode: str, load: ModelTable) -> tuple[Any, list, Any]:
    """(model decoded, its pairs, tokenizer) for `mode`: the rl model alone, the base alone
    (the small models are never loaded) or the base with every pair."""
    from jaxrast.rast.ensemble import Pair

    check_models(cfg, mode)
    if mode == "rl":  # the small RL model alone: neither the base nor any ref is loaded
        return load(cfg.pairs[0][0]), [], load.tokenizer
    base = load(cfg.base)
    pairs = [Pair(load(rl), load(ref), float(lam)) for rl, ref, lam in cfg.pairs] if mode == "rast" else []
    return base, pairs, load.tokenizer


def check_models(cfg: DecodeConfig, mode: str) -> None:
    if mode in ("rast", "rl") and not cfg.pairs:
        raise ValueError(f"mode {mode!r} needs a pair: --pair RL REF LAM (or --rl/--ref/--lam).")
    if mode in ("rast", "base") and not cfg.base:
        raise ValueError(f"mode {mode!r} needs --base.")


@dataclasses.dataclass
class DecodeRun:
    """What a finished job hands back: its summary and, for rows `keep` selected, the
    decoded trajectories with the models that made them (the CLI traces them)."""

    summary: dict[str, Any]
    engine: Any = None
    kept: list[tuple[list[int], list[int], str, int]] = dataclasses.field(default_factory=list)


def encode_checked(cfg: DecodeConfig, mode: str, rows: list[dict], prompts: list[str]) -> list[list[int]] | None:
    """The prompts' token ids, before any model loads (None: the checkpoint has no
    tokenizer). Every prompt must encode, and fit with max_new_tokens into every model's
    max_position_embeddings (past it the models decode positions they were never trained
    on: degraded text, and memory sized for positions that do not exist). Reads only the
    config.json files and the first model's tokenizer (the one decoding uses)."""
    from jaxrast.models.config import ModelConfig
    from jaxrast.models.hf import resolve_checkpoint

    paths = [str(p) for p in decode_model_paths(cfg, mode)]
    limits = [ModelConfig.from_file(resolve_checkpoint(p)).max_position_embeddings for p in paths]
    tok = decode_tokenizer(cfg, mode)
    if tok is None:
        return None  # decoding refuses it with its own message
    limit = min(limits)
    # once: decoding and --save-token-ids share them; a prompt that cannot fit is refused untokenized
    prompt_ids = encode_prompts(tok, prompts, special_tokens=adds_special_tokens(get_template(cfg.prompt_template)),
                                max_bytes=cfg.max_prompt_bytes or limit * longest_token_bytes(tok))
    lengths = [len(ids) for ids in prompt_ids]
    model = paths[limits.index(limit)]
    over = [(r["id"], n) for r, n in zip(rows, lengths) if n + cfg.max_new_tokens > limit]
    if over:
        row_id, n = max(over, key=lambda t: t[1])
        fit = limit - max(lengths)
        fix = (f"lower --max-new-tokens to {fit} or less" if fit >= 1 else "shorten the prompts") + \
            " or drop (--limit) the longest rows"
        raise ValueError(f"{len(over)} of {len(rows)} prompts are too long: row {row_id!r} has {n} prompt tokens, "
                         f"plus --max-new-tokens {cfg.max_new_tokens} = {n + cfg.max_new_tokens} positions, beyond "
                         f"max_position_embeddings = {limit} of {model}; {fix}.")
    return prompt_ids


def decode_tokenizer(cfg: DecodeConfig, mode: str):
    """The tokenizer decoding uses (the first model's; None without tokenizer files), read
    before any model loads."""
    from jaxrast.models.hf import load_tokenizer, resolve_checkpoint

    return load_tokenizer(resolve_checkpoint(str(decode_model_paths(cfg, mode)[0])))


def render_prompts(cfg: DecodeConfig, mode: str, template: str, rows: list[dict]) -> list[str]:
    """Each row's prompt text; the chat template is the first model's tokenizer's."""
    tok = decode_tokenizer(cfg, mode) if template == CHAT else None
    return [render(template, r, tok, cfg.system) for r in rows]


def decode_model_paths(cfg: DecodeConfig, mode: str) -> list[str]:
    """The checkpoints `mode` decodes with, base (or the rl model alone) first."""
    if mode == "rl":
        return [cfg.pairs[0][0]] if cfg.pairs else []
    if mode == "base":
        return [cfg.base] if cfg.base else []
    return [p for p in (cfg.base, *(path for pair in cfg.pairs for path in pair[:2])) if p]


def _resolved_models(models: Any) -> Any:
    """Model paths as recorded and compared: resolved (`./ckpt`, `ckpt/`: one model); a value
    that is not a list of paths (another program's row) is left as it is, to differ."""
    if not isinstance(models, list):
        return models
    return [checkpoint_key(m) if isinstance(m, str) else m for m in models]


def run_decode(cfg: DecodeConfig, progress: bool | None = None,
               keep: Callable[[str, int], bool] | None = None) -> DecodeRun:
    """Runs the job; returns its summary (rows written, skipped, tokens) and the rows `keep`
    selects as (prompt_ids, token_ids, id, sample).

    Everything a user can get wrong is found before a model loads: the data, the settings,
    the output (writable, not locked by another process, ours and matching on resume) and
    the prompt lengths. In a multi-process run every process decodes (each feeding its
    devices' slices of the batch) and only process 0 reads and writes `cfg.out`, on its own
    file system.
    """
    from jaxrast.data.rows import canonical_name, is_benchmark, load_rows
    from jaxrast.rast.combine import lam_schedule
    from jaxrast.rast.params import SamplingParams

    mode = cfg.resolved_mode()
    template = get_template(cfg.prompt_template)
    check_models(cfg, mode)
    lam_schedule(cfg.lam_schedule)  # a bad schedule is named now, not after the models load
    rows = on_every_process(lambda: load_rows(cfg.dataset, cfg.fields, require_answer=False), "reading the dataset")
    rows = rows[: cfg.limit]
    prompts = render_prompts(cfg, mode, template, rows)
    benchmark = canonical_name(cfg.dataset) if cfg.fields is None and is_benchmark(cfg.dataset) else None
    lams = [float(p[2]) for p in cfg.pairs] if mode == "rast" else []
    # checked before any model is loaded
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens, n=cfg.n, stop_strings=tuple(cfg.stop),
                            seed=cfg.seed, min_tokens=cfg.min_tokens, continue_text=cfg.continue_text)
    # Everything that shapes a row's text: rows written under other settings must not be mixed in.
    # Model paths are recorded resolved (`./ckpt`, `ckpt/` and its absolute path are one model).
    models = {"rl": [cfg.pairs[0][0]] if cfg.pairs else [], "base": [cfg.base],
              "rast": [cfg.base, *(str(path) for p in cfg.pairs for path in p[:2])]}[mode]
    run = {"seed": cfg.seed, "mode": mode, "lam": lams, "temperature": cfg.temperature, "top_p": cfg.top_p,
           "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop),
           "lam_schedule": cfg.lam_schedule if mode == "rast" else None, "prompt_template": template,
           "models": _resolved_models(models), "min_tokens": cfg.min_tokens, "continue_text": cfg.continue_text}
    if template == CHAT:  # recorded only where it shapes the prompt: older files resume as they are
        run["system"] = cfg.system
    output = OutputFile(cfg.out) if is_main() else None
    by_id = {r["id"]: p for r, p in zip(rows, prompts)}

    def open_output():  # process 0; its refusal reaches every process
        if cfg.trace_rows:
            check_writable(cfg.trace_out or cfg.out.removesuffix(".jsonl") + ".trace.jsonl", "--trace-out")
        return output.open(run, by_id, normalise={"models": _resolved_models})

    finished = shared_from_main(open_output)
    try:
        return _decode(cfg, mode, rows, prompts, benchmark, params, run, finished, output, progress, keep)
    finally:
        if output is not None:
            output.close()


def _decode(cfg, mode, rows, prompts, benchmark, params, run, finished, output, progress, keep) -> DecodeRun:
    """The decoding half of `run_decode`, once the output is open: the rows not yet written."""
    from jaxrast.rast.decoding import RAST
    from jaxrast.runtime.mesh import parse_mesh

    todo_idx = [i for i, r in enumerate(rows) if any((r["id"], s) not in finished for s in range(cfg.n))]
    todo, prompts = [rows[i] for i in todo_idx], [prompts[i] for i in todo_idx]
    result = DecodeRun({"rows": len(rows), "skipped": len(rows) - len(todo), "written": 0, "tokens": 0,
                        "out": cfg.out})
    if not todo:
        return result
    prompt_ids = on_every_process(lambda: encode_checked(cfg, mode, todo, prompts), "checking the prompts")
    # Several processes without a mesh would each decode everything on one device: use them all.
    mesh = parse_mesh(cfg.mesh or ("1,-1,1" if process_count() > 1 else None))
    load = ModelTable(dtype=cfg.dtype, mesh=mesh, allow_pickle=cfg.allow_pickle)
    model, pairs, tok = on_every_process(lambda: load_decode_models(cfg, mode, load), "loading the models")
    if tok is None or prompt_ids is None:
        raise ValueError("the checkpoint has no tokenizer files; decoding text needs one.")
    gamma = cfg.speculative if mode == "rast" else 0
    # the slots fit this job's longest row (a round may write γ positions past a budget), in 64s
    max_len = -(-(max(map(len, prompt_ids)) + cfg.max_new_tokens + gamma) // 64) * 64
    engine = result.engine = RAST(model, pairs, tokenizer=tok, mesh=mesh, lam_schedule=cfg.lam_schedule,
                                  batch_size=cfg.batch_size, kv_memory=cfg.kv_memory, page_size=cfg.page_size,
                                  max_len=max_len,
                                  rows_needed=len(todo) * cfg.n, workers=cfg.workers,
                                  steps_per_call=cfg.steps_per_call, speculative=gamma,
                                  speculative_mode=cfg.speculative_mode)
    print(f"decoding: {engine.capacity.describe()}, slots of {max_len} positions, attention backend "
          f"{engine.attention}", file=sys.stderr, flush=True)
    for batch in engine.generate_iter(prompt_ids, params, row_ids=[row_uid(r["id"]) for r in todo],
                                      progress=progress if output is not None else False):
        records = []
        for c in batch:
            row = todo[c.index]
            if (row["id"], c.sample) in finished:
                continue  # written before a crash; the new sample is identical
            record = {"id": row["id"], "benchmark": benchmark, "prompt": prompts[c.index],
                      "prompt_hash": prompt_hash(prompts[c.index]), "sample": c.sample, "completion": c.text,
                      "num_tokens": c.num_tokens, "finish_reason": c.finish_reason, **run}
            if cfg.save_token_ids:
                record.update(prompt_ids=prompt_ids[c.index], token_ids=c.token_ids)
            if keep is not None and keep(row["id"], c.sample):
                result.kept.append((prompt_ids[c.index], c.token_ids, row["id"], c.sample))
            records.append(record)
            result.summary["tokens"] += c.num_tokens
        if output is not None:
            output.append(records)
        result.summary["written"] += len(records)
    stats = engine.scheduler.stats
    if stats.acceptance is not None:
        result.summary.update(acceptance=stats.acceptance, accepted_length=stats.accepted_length)
    return result
