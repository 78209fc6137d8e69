"""`RAST`: decode `base` with the shift Σ λ_i (rl_i − ref_i) of small pairs, from Python.

`RAST.generate` runs on the continuous-batching engine (`jaxrast.rast.engine`, scheduled by
`jaxrast.rast.scheduler`): `batch_size` slots, each refilled the moment its row ends, so a
long-tailed set of completions does not wait for its longest row. `scheduler="static"`
keeps the earlier static batches (`jaxrast.rast.static`) for side-by-side benchmarks.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxrast.models.hf import check_tokenizers_compatible
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.combine import lam_schedule as make_lam_schedule
from jaxrast.rast.engine import Engine, EngineSpec
from jaxrast.rast.ensemble import Ensemble, Pair
from jaxrast.rast.params import Completion, SamplingParams
from jaxrast.rast.requests import Request, RequestParams
from jaxrast.rast.schedule import default_workers
from jaxrast.rast.scheduler import Scheduler
from jaxrast.rast.static import StaticBatches


class RAST(StaticBatches):
    """Decodes `base` with the shift Σ λ_i (rl_i − ref_i) of small pairs.

    With no pairs this is plain decoding of `base` (the small models are not run at all).
    `lam_schedule`: 'constant', 'warmup:N' or 'first:N', or a callable step -> multiplier.
    `batch_size`: rows decoded at once (the engine's slots). `workers`: the slots are
    split into this many groups decoded concurrently from threads. Default: 2 on one
    multi-core CPU device (XLA:CPU leaves cores idle in a decode step's small ops; two
    programs decode ~1.7x faster than one twice their size), else 1 (an accelerator, or a
    mesh of devices, is kept busy).
    `scheduler`: "continuous" (the engine) or "static" (batches run to their longest row;
    `cache_segments` and `stop_check_every` apply to it). `steps_per_call`: engine decode
    steps per device call; `prefill_batch`: prompts per engine prefill call.
    """

    def __init__(self, base: CausalLM, pairs: Sequence[Pair | tuple] = (), *, tokenizer=None,
                 mesh: Mesh | None = None, lam_schedule: str | Callable | None = None,
                 batch_size: int = 16, vocab_size: int | None = None, stop_check_every: int = 64,
                 cache_segments: int = 8, workers: int | None = None, scheduler: str = "continuous",
                 steps_per_call: int = 32, prefill_batch: int | None = None, speculative: int = 0,
                 speculative_mode: str = "on"):
        self.pairs = pairs = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
        for i, p in enumerate(pairs):
            check_tokenizers_compatible(tokenizer, p.tokenizer, f"pair {i}")
        # Distinct models, each run once per step even if shared by several pairs.
        self.ensemble = Ensemble.of_pairs(base, pairs, vocab=vocab_size, tokenizer=tokenizer)
        self.models, self.vocab = self.ensemble.models, self.ensemble.vocab
        self.lams = np.array([p.lam for p in pairs], np.float32)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.schedule = lam_schedule if callable(lam_schedule) else make_lam_schedule(lam_schedule)
        self.combination = self.ensemble.combination(base, pairs, self.schedule)
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be 'continuous' or 'static', got {scheduler!r}.")
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.stop_check_every = stop_check_every
        if cache_segments < 1 or stop_check_every < 1 or steps_per_call < 1 or batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}), cache_segments ({cache_segments}), stop_check_every "
                             f"({stop_check_every}) and steps_per_call ({steps_per_call}) must all be >= 1.")
        self.cache_segments, self.steps_per_call = cache_segments, steps_per_call
        self.workers = default_workers(batch_size, mesh) if workers is None else workers
        if self.workers < 1 or batch_size % self.workers:
            raise ValueError(f"workers={self.workers} must be >= 1 and divide batch_size={batch_size}.")
        if self.workers > 1 and jax.process_count() > 1:
            raise ValueError("workers > 1 needs a single process: every process must issue the same "
                             "programs in the same order.")
        self.program_batch = batch_size // self.workers
        # up to 32 prompts per admit call, each prefilled alone: on CPU 8 toy prompts cost 4.7 ms
        # together and 5.3 ms one by one, while one prompt padded to 8 rows costs all 4.7 ms
        self.prefill_batch = prefill_batch or min(32, self.program_batch)
        if speculative < 0 or (speculative and not pairs):
            raise ValueError(f"speculative={speculative}: γ >= 1 drafts with the first pair's rl model (needs a pair), "
                             "0 decodes plainly.")
        if speculative and scheduler == "static":
            raise ValueError("speculative decoding runs on the continuous engine (scheduler='continuous').")
        self.speculative, self.speculative_mode = speculative, speculative_mode
        self._scheduler: tuple[tuple, Scheduler] | None = None
        self._init_static()

    # ---- host side --------------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass tokenizer= or token id lists.")
                ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("an empty prompt cannot be decoded; give every prompt at least one token.")
            out.append(ids)
        return out

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """The token ids that end a row: the given ones, else the tokenizer's eos."""
        if params.stop_token_ids is not None:
            return tuple(params.stop_token_ids)
        tok = self.tokenizer
        return () if tok is None or tok.eos_token_id is None else (tok.eos_token_id,)

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    _completion = staticmethod(lambda *args: Completion(*args))

    def scheduler_stats(self):
        """The engine's counters (tokens, occupancy, speculative acceptance), None before any run."""
        return None if self._scheduler is None else self._scheduler[1].stats

    def engine_for(self, max_len: int, *, logprobs: bool = False, entropies: bool = False,
                   max_stop_ids: int = 4, max_forced: int = 16, top_logprobs: int = 0) -> Scheduler:
        """The scheduler over this RAST's slot groups for slots of `max_len` positions (built
        on first use; one is kept, so its KV caches are reused by later calls)."""
        spec = EngineSpec(max_slots=self.program_batch, max_len=max_len, steps=self.steps_per_call,
                          prefill_batch=self.prefill_batch, max_stop_ids=max_stop_ids, max_forced=max_forced,
                          logprobs=logprobs, entropies=entropies, top_logprobs=top_logprobs, gamma=self.speculative)
        if self._scheduler is None or self._scheduler[0] != spec:
            self._scheduler = None  # drop the old caches before the new ones are allocated
            rl = self.ensemble.index(self.pairs[0].rl) if self.pairs else None
            # one engine (its compiled programs) for every slot group; each group has its own state
            engine = Engine(self.models, self.combination, vocab=self.vocab, spec=spec, rl_index=rl, mesh=self.mesh)
            self._scheduler = (spec, Scheduler([engine] * self.workers, tokenizer=self.tokenizer,
                                               default_lam=self.combination.lams, speculation=self.speculative_mode))
        return self._scheduler[1]

    def generate_iter(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams = SamplingParams(),
                      *, row_ids: Sequence[int] | None = None, progress: bool | None = None
                      ) -> Iterator[list[Completion]]:
        """Yields completions as rows finish (the engine) or batch by batch (static).

        row_ids: a stable integer per prompt used to derive its random stream (default: its
        index), so a row's samples do not depend on batch composition or resumption.
        """
        encoded = self._encode(prompts)
        longest = max((len(e) for e in encoded), default=0) + params.max_new_tokens
        limit = min(m.cfg.max_position_embeddings for m in self.models)
        if longest > limit:  # RoPE still runs past it, but the models were never trained there
            warnings.warn(f"the longest prompt plus max_new_tokens is {longest} tokens, beyond a model's "
                          f"max_position_embeddings ({limit}); expect degraded text past that position.",
                          stacklevel=2)
        row_ids = list(range(len(encoded))) if row_ids is None else [int(r) for r in row_ids]
        if self.scheduler == "static":
            if params.min_tokens or params.continue_text:
                raise ValueError("min_tokens and continue_text need the continuous engine (scheduler='continuous').")
            yield from self._static_iter(encoded, params, row_ids, progress)
            return
        need = longest + self.speculative  # a speculative round may write γ positions past a budget
        yield from self._engine_iter(encoded, params, row_ids, progress, max_len=-(-need // 64) * 64)

    def _engine_iter(self, encoded, params: SamplingParams, row_ids, progress, *, max_len: int):
        cont = tuple(self._encode([params.continue_text])[0]) if params.continue_text else ()
        stop_ids = self._stop_ids(params)
        sched = self.engine_for(max_len, logprobs=params.logprobs, entropies=params.entropies,
                                max_stop_ids=max(4, len(stop_ids)), max_forced=max(16, len(cont)))
        base = RequestParams(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                             top_k=params.top_k, min_tokens=params.min_tokens, stop_ids=stop_ids,
                             stop_strings=tuple(params.stop_strings), lam=tuple(float(x) for x in self.lams),
                             continue_ids=cont, seed=params.seed)
        requests = [Request(ids, dataclasses.replace(base, row_id=row_ids[i], sample=s), tag=(i, s))
                    for i, ids in enumerate(encoded) for s in range(params.n)]
        bar = tqdm(total=len(requests), desc="decoding", unit="row", disable=progress is False or
                   (progress is None and len(requests) < 2 * self.batch_size))
        t0, tokens, busy0, steps0 = time.perf_counter(), 0, sched.stats.busy_slot_steps, sched.stats.slot_steps
        for done in sched.run(requests):
            batch = [Completion(r.tag[0], r.tag[1], r.token_ids, r.text, r.finish_reason,
                                r.logprobs if params.logprobs else [], r.entropies if params.entropies else [])
                     for r in done]
            tokens += sum(c.num_tokens for c in batch)
            bar.update(len(batch))
            slot_steps = sched.stats.slot_steps - steps0
            postfix = dict(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}",
                           slots=f"{(sched.stats.busy_slot_steps - busy0) / max(slot_steps, 1):.0%}")
            if sched.stats.acceptance is not None:
                postfix.update(accept=f"{sched.stats.acceptance:.0%}", per_round=f"{sched.stats.accepted_length:.2f}")
            bar.set_postfix(**postfix)
            yield batch
        bar.close()

    def generate(self, prompts, params: SamplingParams = SamplingParams(), **kw) -> list[list[Completion]]:
        """All completions, as `result[prompt_index][sample]`."""
        result: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        for batch in self.generate_iter(prompts, params, **kw):
            for c in batch:
                result[c.index][c.sample] = c
        return result  # type: ignore[return-value]
