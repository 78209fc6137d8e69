"""`RAST`: decode `base` with the shift Σ λ_i (rl_i − ref_i) of small pairs, from Python.

`RAST.generate` runs on the continuous-batching engine (`jaxrast.rast.engine`, scheduled by
`jaxrast.rast.scheduler`): `batch_size` slots, each refilled the moment its row ends, so a
long-tailed set of completions does not wait for its longest row. The engine's shape
(`max_len`, slots, steps per call, the prefill chunk) is fixed when a `RAST` is made, so
later calls compile nothing new; a request that does not fit is refused, naming `max_len`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxrast.data.prompts import encode_prompts
from jaxrast.models.attention_backend import AttentionBackend
from jaxrast.models.hf import check_tokenizers_compatible
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.capacity import plan_slots
from jaxrast.rast.combine import lam_schedule as make_lam_schedule
from jaxrast.rast.engine import Engine
from jaxrast.rast.engine_spec import EngineSpec, default_prefill_chunk
from jaxrast.rast.ensemble import Ensemble, Pair
from jaxrast.rast.params import Completion, SamplingParams, by_prompt
from jaxrast.rast.requests import Request, RequestParams, default_stop_ids
from jaxrast.rast.scheduler import Scheduler, default_workers, row_split
from jaxrast.rast.token_rules import Record

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 2048  # positions per slot when neither the caller nor the models ask for fewer


def make_scheduler(base: CausalLM, pairs: Sequence[Pair], *, tokenizer=None, mesh: Mesh | None = None,
                   lam_schedule: Callable | None = None, vocab_size: int | None = None, spec: EngineSpec,
                   workers: int = 1, speculative_mode: str = "on", record: Record = Record(),
                   attention: AttentionBackend | None = None) -> tuple[Ensemble, Scheduler]:
    """The models' ensemble and a scheduler over `workers` slot groups of one engine of shape
    `spec` (one engine's compiled programs serve every group; each group has its own state)."""
    for i, p in enumerate(pairs):
        check_tokenizers_compatible(tokenizer, p.tokenizer, f"pair {i}")
    ensemble = Ensemble.of_pairs(base, pairs, vocab=vocab_size, tokenizer=tokenizer)
    combination = ensemble.combination(base, pairs, lam_schedule)
    rl = ensemble.index(pairs[0].rl) if pairs else None
    engine = Engine(ensemble.models, combination, vocab=ensemble.vocab, spec=spec, rl_index=rl, mesh=mesh,
                    attention=attention)
    scheduler = Scheduler([engine] * workers, tokenizer=tokenizer, default_lam=combination.lams,
                          speculation=speculative_mode, record=record)
    return ensemble, scheduler


class RAST:
    """Decodes `base` with the shift Σ λ_i (rl_i − ref_i) of small pairs.

    With no pairs this is plain decoding of `base` (the small models are not run at all).
    `lam_schedule`: 'constant', 'warmup:N' or 'first:N', or a callable step -> multiplier.
    `batch_size`: rows decoded at once (the engine's slots; default: as many as `kv_memory`
    holds, at most the platform's ceiling: `capacity` says how many and why); a call runs
    at the smallest compiled slot count that holds its live rows. `kv_memory`: KV cache
    memory in GiB per device, or a share of free memory ('50%'; default: half of a CPU's
    available RAM, 90% of an accelerator's free memory). `rows_needed`: the rows of a known
    workload (a decode job's prompts × n): no more slots than that. `max_len`: positions per slot,
    prompt + max_new_tokens (+ γ when speculative) must fit (default: the models' context,
    at most 2048). `workers`: the slots are split into this many groups decoded concurrently
    from threads (default: 2 on one multi-core CPU device, whose decode steps leave cores
    idle, else 1). `steps_per_call`: decode steps per device call; `prefill_batch`: prompts
    per admit call; `prefill_chunk`: prompt tokens per prefill forward (default 32 on CPU,
    256 on accelerators). `speculative`: γ
    drafts per round from the first pair's rl model (0: off). `attention`: the attention
    backend (default: chosen for the platform and cache; `RAST.attention` names it).
    `buckets`: a call runs at the smallest compiled slot count holding its live rows (True),
    or always at all of them (False: a row's bits then never depend on how many rows run
    beside it; across slot counts XLA may round a matrix product in the last bit).
    `page_size`: KV positions per page (default: one page per slot, of its whole length):
    paged, `kv_memory` sizes the pool of pages and `batch_size` (default: the platform's
    ceiling, or the work's rows) only bounds the rows in flight; `pages`: the pool's pages
    (per worker) instead. A row takes pages as it grows and returns them when it finishes;
    a request waits while pages are short, and the youngest rows give theirs back (they
    resume later, their tokens the same up to float ties); a prompt's n samples share its
    pages and its prefill.
    """

    def __init__(self, base: CausalLM, pairs: Sequence[Pair | tuple] = (), *, tokenizer=None,
                 mesh: Mesh | None = None, lam_schedule: str | Callable | None = None,
                 batch_size: int | None = None, kv_memory: float | str | None = None, rows_needed: int | None = None,
                 max_len: int | None = None, vocab_size: int | None = None,
                 workers: int | None = None, steps_per_call: int = 32, prefill_batch: int | None = None,
                 prefill_chunk: int | None = None, speculative: int = 0, speculative_mode: str = "on",
                 attention: AttentionBackend | None = None, buckets: bool = True, page_size: int | None = None,
                 pages: int | None = None):
        self.pairs = pairs = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
        self.tokenizer = tokenizer
        self.lams = np.array([p.lam for p in pairs], np.float32)
        self.lam_schedule = lam_schedule if callable(lam_schedule) else make_lam_schedule(lam_schedule)
        if steps_per_call < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"batch_size ({batch_size}) and steps_per_call ({steps_per_call}) must be >= 1.")
        models = [base] + [m for p in pairs for m in (p.rl, p.ref)]
        limit = min(m.cfg.max_position_embeddings for m in models)
        if max_len is None:
            max_len = min(limit, DEFAULT_MAX_LEN)
        elif max_len > limit:  # RoPE still runs past it, but the models were never trained there
            warnings.warn(f"max_len={max_len} is beyond a model's max_position_embeddings ({limit}); expect "
                          "degraded text past that position.", stacklevel=2)
        self.capacity = plan_slots(models, max_len, slots=batch_size, kv_memory=kv_memory, needed=rows_needed,
                                   devices=1 if mesh is None else mesh.devices.size, multiple=row_split(mesh),
                                   page_size=page_size)
        log.info("RAST: %s", self.capacity.describe())
        self.batch_size = batch_size = self.capacity.slots
        self.workers = default_workers(batch_size, mesh) if workers is None else workers
        if self.workers < 1 or batch_size % self.workers:
            raise ValueError(f"workers={self.workers} must be >= 1 and divide batch_size={batch_size}.")
        if self.workers > 1 and jax.process_count() > 1:
            raise ValueError("workers > 1 needs a single process: every process must issue the same "
                             "programs in the same order.")
        if speculative < 0 or (speculative and not pairs):
            raise ValueError(f"speculative={speculative}: γ >= 1 drafts with the first pair's rl model (needs a pair), "
                             "0 decodes plainly.")
        program_batch = batch_size // self.workers
        spec = EngineSpec(max_slots=program_batch, max_len=max_len, steps=steps_per_call,
                          prefill_batch=prefill_batch or min(32, program_batch),
                          prefill_chunk=prefill_chunk or default_prefill_chunk(),
                          gamma=speculative, buckets=None if buckets else (program_batch,), page_size=page_size,
                          pages=pages or (None if self.capacity.pages is None else self.capacity.pages // self.workers))
        self.ensemble, self.scheduler = make_scheduler(
            base, pairs, tokenizer=tokenizer, mesh=mesh, lam_schedule=self.lam_schedule, vocab_size=vocab_size,
            spec=spec, workers=self.workers, speculative_mode=speculative_mode, attention=attention,
            record=Record(logprobs=SamplingParams.logprobs))  # the default call's record
        self.models, self.vocab = self.ensemble.models, self.ensemble.vocab
        self.spec, self.speculative = spec, speculative

    @property
    def max_len(self) -> int:
        return self.spec.max_len

    @property
    def attention(self) -> str:
        """The attention backend in use."""
        return self.scheduler.attention

    def warm_up(self, params: SamplingParams = SamplingParams()) -> None:
        """Compiles the decode programs of every slot-count bucket for calls with `params`'
        records (log-probs, entropies) now, instead of when the live rows first reach each
        bucket: later calls then compile nothing whatever their row counts."""
        record = Record(logprobs=params.logprobs, entropies=params.entropies)
        for group in self.scheduler.groups:
            group.warm_up(record)

    def _encode(self, prompts: Sequence[str | Sequence[int]], special_tokens: bool = True) -> list[list[int]]:
        """Token ids of text prompts (`encode_prompts`: the tokenizer's default special tokens
        unless `special_tokens=False`) and of id lists."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass tokenizer= or token id lists.")
                ids = encode_prompts(self.tokenizer, [p], special_tokens=special_tokens)[0]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("an empty prompt cannot be decoded; give every prompt at least one token.")
            out.append(ids)
        return out

    def generate_iter(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams = SamplingParams(),
                      *, row_ids: Sequence[int] | None = None, progress: bool | None = None
                      ) -> Iterator[list[Completion]]:
        """Yields completions as rows finish.

        row_ids: a stable integer per prompt used to derive its random stream (default: its
        index), so a row's samples do not depend on batch composition or resumption.
        """
        encoded = self._encode(prompts)
        row_ids = list(range(len(encoded))) if row_ids is None else [int(r) for r in row_ids]
        # a continuation is mid-sequence: no BOS
        cont = tuple(self._encode([params.continue_text], special_tokens=False)[0]) if params.continue_text else ()
        stop_ids = default_stop_ids(self.tokenizer, params.stop_token_ids)
        sched = self.scheduler
        base = RequestParams(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                             top_k=params.top_k, min_tokens=params.min_tokens, stop_ids=stop_ids,
                             stop_strings=tuple(params.stop_strings), lam=tuple(float(x) for x in self.lams),
                             continue_ids=cont, seed=params.seed, prompt_logprobs=params.prompt_logprobs)
        requests = [Request(ids, dataclasses.replace(base, row_id=row_ids[i], sample=s), tag=(i, s))
                    for i, ids in enumerate(encoded) for s in range(params.n)]
        rows = min(len(requests), self.batch_size)
        why = "the requests" if rows < self.batch_size else self.capacity.describe()
        log.info("decoding %d request(s) (%d prompt(s) x %d), %d rows at once: %s", len(requests), len(encoded),
                 params.n, rows, why)
        bar = tqdm(total=len(requests), desc=f"decoding ({rows} at once)", unit="row", disable=progress is False or
                   (progress is None and len(requests) < 2 * self.batch_size))
        t0, tokens, busy0, steps0 = time.perf_counter(), 0, sched.stats.busy_slot_steps, sched.stats.slot_steps
        for done in sched.run(requests, Record(logprobs=params.logprobs, entropies=params.entropies)):
            batch = [Completion(r.tag[0], r.tag[1], r.token_ids, r.text, r.finish_reason,
                                r.logprobs if params.logprobs else [], r.entropies if params.entropies else [],
                                r.prompt_logprobs)
                     for r in done]
            tokens += sum(c.num_tokens for c in batch)
            bar.update(len(batch))
            slot_steps = sched.stats.slot_steps - steps0
            postfix = dict(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}",
                           slots=f"{(sched.stats.busy_slot_steps - busy0) / max(slot_steps, 1):.0%}")
            if sched.paged:
                postfix.update(pages=f"{sched.stats.pages_used}/{sched.stats.pages_total}",
                               preempted=sched.stats.preemptions)
            if sched.stats.acceptance is not None:
                postfix.update(accept=f"{sched.stats.acceptance:.0%}", per_round=f"{sched.stats.accepted_length:.2f}")
            bar.set_postfix(**postfix)
            yield batch
        bar.close()

    def generate(self, prompts, params: SamplingParams = SamplingParams(), **kw) -> list[list[Completion]]:
        """All completions, as `result[prompt_index][sample]`."""
        return by_prompt(self.generate_iter(prompts, params, **kw), len(prompts), params.n)
