"""The continuous-batching RAST engine: device programs over a fixed set of slots.

JetStream's engine API, for several models at once. Every model keeps one KV cache of
`max_slots` rows of `max_len` positions; a slot holds one sequence in all of them, at its
own length. Two jitted programs, both donating the state and of fixed shapes whatever the
prompts (nothing compiles after the first call of each):

- `admit`: prefill prompts in every model, `prefill_chunk` tokens per forward, and insert
  them into free slots, with each request's settings (λ per pair, τ, top-p, top-k, budget,
  stop ids, min_tokens and a continue text, its PRNG stream);
- `decode`: up to `steps` steps of z = z_base + Σ_i λ_i (z_rl_i − z_ref_i) → sample for
  every slot in one `lax.while_loop`, leaving early when a slot finishes (if requests are
  waiting for one); or speculative rounds (`speculative.speculative_round`).

A slot's *pending* token is the last one chosen and not yet in the caches: after `admit`
it is the prompt's last token (prefill covers the rest), and each decode step feeds it to
every model, samples the next one and makes that pending. Every per-request value is an
array over slots, and a row's draws come from its own stream fold_in(fold_in(key(seed),
row_id), sample) at its own token index, so its tokens never depend on its neighbours or
its slot. Attention goes through one backend chosen at construction
(`models.attention_backend`). Shapes: slots `[S, ...]`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrast.models.attention import cache_length
from jaxrast.models.attention_backend import AttentionBackend, choose
from jaxrast.models.kv_cache import KVCache, write_row
from jaxrast.models.partitioning import cache_sharding
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.engine_spec import EngineSpec
from jaxrast.rast.ensemble import Combination
from jaxrast.rast.prompt_scores import PromptScores, empty_scores, prompt_scorer
from jaxrast.rast.sampling import sample_rows
from jaxrast.rast.slots import DecodeState, Slots, StepOutput, stream_keys
from jaxrast.rast.speculative import speculative_round
from jaxrast.rast.token_rules import Record, advance, force_continue, mask_early_stops, recorded, row_ends, slot_logits

# calls that a smaller bucket would have held before it is compiled (a compile costs ~2 s on
# the toy family: about 4 calls of 32 steps at 16 slots)
COMPILE_AFTER = 4


def _split(mesh: Mesh, spec: P) -> int:
    """Devices a cache's slot axis is split over (its spec's first entry)."""
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


class Engine:
    """Device programs over `spec.max_slots` slots of `models` (distinct, base first).

    combination: the RAST rule over the models' indices (its λ values are replaced per slot);
    rl_index: the model a `rl_only` slot decodes alone (None: none can); attention: the
    backend every cached forward uses (default: `models.attention_backend.choose` for this
    platform, mesh and cache).
    """

    def __init__(self, models: Sequence[CausalLM], combination: Combination, *, vocab: int, spec: EngineSpec,
                 rl_index: int | None = None, mesh: Mesh | None = None,
                 attention: AttentionBackend | None = None):
        self.models, self.combination, self.vocab, self.spec = list(models), combination, vocab, spec
        self.rl_index, self.mesh = rl_index, mesh
        if spec.gamma and rl_index is None:
            raise ValueError("speculative decoding drafts with the first pair's rl model: load a pair.")
        cache_len = cache_length(spec.max_len)
        self.page_size = spec.page_size or cache_len
        self.cache_len = -(-cache_len // self.page_size) * self.page_size  # whole pages
        self.pages_per_slot = self.cache_len // self.page_size
        self.attention = attention or choose(
            platform=jax.local_devices()[0].platform, mesh=mesh, dtypes=[m.dtype for m in self.models],
            head_dims=[m.cfg.head_dim for m in self.models], cache_len=self.cache_len)
        self.num_pairs = len(combination.pairs)
        pages = spec.pages or spec.max_slots * self.pages_per_slot
        # on a mesh the pool splits like the slots (a multiple of max_slots splits over any of their splits)
        self.num_pages = max(pages // spec.max_slots, 1) * spec.max_slots if mesh is not None else pages
        self._graphdefs = tuple(nnx.graphdef(m) for m in self.models)
        self._variables = tuple(nnx.state(m) for m in self.models)  # see refresh()
        self.refresh()
        shardings = self._shardings()
        # a step over the low b slots reads cache row r for query row r; where the slots are
        # split over devices, the devices' blocks of b rows and of max_slots rows differ
        self.split = 1 if shardings is None else _split(self.mesh, shardings[0].caches[0].k[0].spec)
        self.buckets = spec.buckets if self.split == 1 else (spec.max_slots,)
        if self.num_pages // self.split < self.pages_per_slot:
            raise ValueError(f"the KV pool's {self.num_pages} pages of {self.page_size} positions (over {self.split} "
                             f"device block(s)) hold less than one row of {self.cache_len} positions in a block: give "
                             "more KV memory (kv_memory / pages) or lower max_len.")
        # explicit output shardings on a mesh: the donated state comes back laid out as it
        # went in, so the next call reuses its buffers and its compiled program
        self._admit = jax.jit(self._admit_impl, donate_argnums=(1,), static_argnames=("score",),
                              out_shardings=None if shardings is None else shardings)
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), out_shardings=shardings,
                               static_argnames=("gamma", "record", "rows"))
        self.compiled: set[tuple[int, int, Record]] = set()  # (rows, γ, record) of the decode calls made
        self._move = jax.jit(self._move_impl, donate_argnums=(0,),
                             out_shardings=None if shardings is None else shardings[0])

    def bucket(self, rows: int) -> int:
        """The slot count a decode call with live rows in slots [0, rows) runs at."""
        return next(b for b in self.buckets if b >= rows)

    # ---- state ----------------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        """Empty slots; the caches' masks start True (a slot attends to positions below its
        query, and every one of them holds a real token). On a mesh the caches are split
        over slots and kv heads and the slot settings replicated, made in place by one
        program (every process of a multi-process run makes its own shards)."""
        if self.mesh is None:  # committed to the device, as every later state is (one compiled program)
            return jax.device_put(self._empty_state(), jax.local_devices()[0])
        return jax.jit(self._empty_state, out_shardings=self._shardings()[0])()

    def _shardings(self) -> tuple[DecodeState, StepOutput] | None:
        """(state, step output) shardings on the mesh: caches split, the rest replicated."""
        if self.mesh is None:
            return None
        shapes = jax.eval_shape(self._empty_state)
        replicated = NamedSharding(self.mesh, P())
        state = DecodeState(tuple(cache_sharding(self.mesh, c) for c in shapes.caches),
                            jax.tree.map(lambda _: replicated, shapes.slots))
        return state, replicated  # (a prefix of every output leaf: any step output is replicated)

    def _empty_state(self) -> DecodeState:
        spec, s = self.spec, self.spec.max_slots
        # the page table lives in the slots (one for every model); a cache holds it only in a call
        caches = [KVCache.paged(m.cfg, s, self.cache_len, self.page_size, self.num_pages, m.dtype).replace(pages=None)
                  for m in self.models]
        zeros = lambda *shape, dtype=jnp.int32: jnp.zeros((s, *shape), dtype)  # noqa: E731
        slots = Slots(token=zeros(), length=zeros(), generated=zeros(), budget=zeros(), min_tokens=zeros(),
                      active=zeros(dtype=bool), lam=zeros(max(self.num_pairs, 1), dtype=jnp.float32),
                      rl_only=zeros(dtype=bool), temperature=zeros(dtype=jnp.float32),
                      top_p=jnp.ones((s,), jnp.float32), top_k=zeros(),
                      stop_ids=jnp.full((s, spec.max_stop_ids), self.vocab, jnp.int32),
                      keys=zeros(2, dtype=jnp.uint32), forced=zeros(spec.max_forced), forced_len=zeros(),
                      forced_pos=jnp.full((s,), -1, jnp.int32), gamma=zeros(),
                      pages=jnp.full((s, self.pages_per_slot), self.num_pages, jnp.int32))
        return DecodeState(tuple(caches), slots)

    def refresh(self) -> None:
        """Reads the models' parameters as they are now (a trainer updates them in place
        between runs, `nnx.update`), as one flat tuple of arrays. The NNX walk is done once:
        its State holds the models' Variables themselves, so flattening it again reads their
        current values, ~100x cheaper than walking again on every call."""
        self._params, self._treedef = jax.tree.flatten(self._variables)

    def _states(self):
        return tuple(self._params)

    def _models(self, params):
        return [nnx.merge(g, s) for g, s in zip(self._graphdefs, jax.tree.unflatten(self._treedef, list(params)))]

    # ---- admit: prefill + insert ------------------------------------------------------------

    def admit(self, state: DecodeState, tokens: np.ndarray, prefix: np.ndarray, slot_ids: np.ndarray,
              settings: dict[str, np.ndarray], rows: int, score: Record | None = None,
              shared: np.ndarray | None = None, copies: np.ndarray | None = None
              ) -> tuple[DecodeState, PromptScores | None]:
        """Prefill the first `rows` of `tokens` [B, max_len] (each row's prompt without its
        last token, right-padded; `prefix` [B] real tokens) in every model and insert row b
        into slot `slot_ids[b]` (`max_slots`: prefilled, not inserted: a prompt only scored).
        settings: Slots fields for the new rows, each [B, ...] (token = the prompt's last
        token; pages = the row's page table, `num_pages` where it has none). `score`: also
        teacher-force the prompts, recording `score.top_logprobs`
        alternatives (one more compiled program); None: no scores. Samples of one prompt
        share its pages: a `shared` [B] row is not prefilled (its page table holds the full
        pages of an earlier row of the call, with the same prompt), and that earlier row also
        writes its last, partly filled page into its `copies` [B, prefill_batch - 1] pages
        (each sharer's own copy, which it goes on writing; `num_pages`: none)."""
        b = len(prefix)
        shared = np.zeros(b, bool) if shared is None else shared
        copies = np.full((b, self.spec.prefill_batch - 1), self.num_pages, np.int32) if copies is None else copies
        return self._admit(self._states(), state, tokens, prefix, slot_ids, settings, np.int32(rows),
                           np.asarray(shared, bool), np.asarray(copies, np.int32), score=score)

    def _prefill_row(self, models, tokens, prefix, score=None, scores=()):
        """The caches ([1, ...] per model) of one prompt, `prefill_chunk` tokens per forward,
        through the engine's attention backend: a row's keys and values depend on its own
        tokens only, whoever is admitted with it. `score(start, logits, scores) -> scores`:
        what each chunk's logits add to the row's prompt scores, starting from `scores`
        (None: last position only)."""
        chunk = self.spec.prefill_chunk
        width = self._prefill_width()
        fresh = tuple(KVCache.init(m.cfg, 1, width, m.dtype, per_row=True, mask=True) for m in models)

        def forward(j, carry):
            caches, scores = carry
            start = j * chunk
            ids = jax.lax.dynamic_slice_in_dim(tokens, start, chunk)[None]
            positions = (start + jnp.arange(chunk, dtype=jnp.int32))[None]
            out, logits = [], []
            for m, cache in zip(models, caches):
                z, cache = m(ids, positions, attention_mask=positions < prefix, cache=cache.replace(index=start[None]),
                             last_only=score is None, attention=self.attention, kv_len=start[None] + chunk)
                out.append(cache)
                logits.append(z)
            return tuple(out), (scores if score is None else score(start, logits, scores))

        return jax.lax.fori_loop(0, (prefix + chunk - 1) // chunk, forward, (fresh, scores))

    def _prefill_width(self) -> int:
        chunk = self.spec.prefill_chunk
        return -(-self.cache_len // chunk) * chunk  # whole chunks: a write never runs past the end

    def _prompt_scorer(self, tokens, prefix, settings, record: Record):
        return prompt_scorer(tokens, prefix, settings, record, combination=self.combination, vocab=self.vocab,
                             num_pairs=self.num_pairs, rl_index=self.rl_index)

    def _admit_impl(self, params, state: DecodeState, tokens, prefix, slot_ids, settings, rows, shared, copies, *,
                    score: Record | None):
        models = self._models(params)
        batch, max_len = tokens.shape
        tokens = jnp.pad(tokens, ((0, 0), (0, max(0, self.cache_len + self.spec.prefill_chunk - tokens.shape[1]))))
        n = self.cache_len
        row_settings = {k: settings[k] for k in ("token", "lam", "rl_only")}

        def insert(i, carry):
            caches, scores = carry
            slot = slot_ids[i]  # a padding or scored-only row (slot id max_slots) is not inserted
            scorer = None if score is None else self._prompt_scorer(
                tokens[i], prefix[i], jax.tree.map(lambda x: x[i], row_settings), score)
            fresh, row_scores = self._prefill_row(models, tokens[i], jnp.where(shared[i], 0, prefix[i]), scorer,
                                                  () if score is None else empty_scores(self._prefill_width(), score))
            # a row not inserted has no page, a sharer writes none: nothing is written
            table = jnp.where(shared[i], self.num_pages, settings["pages"][i])
            last = prefix[i] // self.page_size  # the page the prompt ends in: copied to the sharers' own pages
            out = []
            for cache, new in zip(caches, fresh):
                k = tuple(write_row(pool, x[0, :, :, :n], 2, table, copies[i], last) for pool, x in zip(cache.k, new.k))
                v = tuple(write_row(pool, x[0, :, :n, :], 1, table, copies[i], last) for pool, x in zip(cache.v, new.v))
                out.append(cache.replace(k=k, v=v, mask=cache.mask.at[slot].set(new.mask[0, :n], mode="drop")))
            if score is not None:
                scores = tuple(buf.at[i].set(x[:max_len]) for buf, x in zip(scores, row_scores))
            return tuple(out), scores

        scores = None if score is None else tuple(
            jnp.zeros((batch, *x.shape), x.dtype) for x in empty_scores(max_len, score))
        caches, scores = jax.lax.fori_loop(0, rows, insert, (tuple(state.caches), scores))
        put = lambda old, new: old.at[slot_ids].set(jnp.asarray(new, old.dtype), mode="drop")  # noqa: E731
        fields = {f.name: getattr(state.slots, f.name) for f in dataclasses.fields(Slots)}
        settings = dict(settings)
        stream = settings.pop("stream")  # the keys are made here: no extra call per admission
        settings["keys"] = stream_keys(stream[:, 0], stream[:, 1], stream[:, 2])
        fields.update({name: put(fields[name], value) for name, value in settings.items()})
        # (generated and forced_pos come with the settings: a preempted row resumes where it was)
        fields.update(length=put(fields["length"], prefix), active=put(fields["active"], np.ones(batch, bool)))
        if scores is not None:
            k = score.top_logprobs
            scores = PromptScores(scores[0], *(scores[1:] if k else (jnp.zeros((batch, max_len, 0), jnp.int32),
                                                                     jnp.zeros((batch, max_len, 0), jnp.float32))))
        return DecodeState(caches, Slots(**fields)), scores

    # ---- decode ------------------------------------------------------------------------------

    def decode(self, state: DecodeState, release: np.ndarray, exit_after: int, speculative: bool = False,
               max_steps: int | None = None, record: Record = Record(), rows: int | None = None,
               pages: np.ndarray | None = None) -> tuple[DecodeState, StepOutput]:
        """Up to `spec.steps` steps (or `max_steps`, fewer: the same program) for every
        active slot below `rows` (a bucket, `bucket()`; None: every slot; speculative: rounds
        of up to γ + 1 tokens). `release` [S]: slots the host has ended (a stop string, a
        cancelled request), deactivated first. The call returns after the step in which
        `exit_after` rows have finished (requests wait). `record`: what is kept per token
        besides the token (one compiled program each, per bucket). `pages` [S, pages per slot]:
        the slots' page table from now on (None: as it is). The output has `rows` rows."""
        gamma = self.spec.gamma if speculative else 0
        limit = np.int32(self.spec.steps if max_steps is None else min(max_steps, self.spec.steps))
        rows = self.spec.max_slots if rows is None else rows
        if rows not in self.buckets:
            raise ValueError(f"decode rows={rows}: the engine is compiled for {self.buckets} slots.")
        # always a host array: one compiled program whichever way the table comes
        pages = np.asarray(state.slots.pages if pages is None else pages, np.int32)
        out = self._decode(self._states(), state, release, np.int32(exit_after), limit, pages, gamma=gamma,
                           record=record, rows=rows)
        self.compiled.add((rows, gamma, record))
        return out

    def run_at(self, rows: int, speculative: bool, record: Record, waited: int) -> int:
        """The bucket a decode call with live rows in slots [0, rows) runs at: the smallest
        that holds them if it is compiled, or if none that holds them is, or if `waited`
        calls (>= `COMPILE_AFTER`) could have used it; else the smallest compiled one that
        holds them. A run's last rows then finish in a bucket already compiled instead of
        compiling one per halving."""
        gamma = self.spec.gamma if speculative else 0
        exact = self.bucket(rows)
        ready = [b for b in self.buckets if b >= exact and (b, gamma, record) in self.compiled]
        if not ready or ready[0] == exact or waited >= COMPILE_AFTER:
            return exact
        return ready[0]

    def move(self, state: DecodeState, src: np.ndarray, dst: np.ndarray) -> DecodeState:
        """Moves the rows in slots `src` [S] to the free slots `dst` [S] (padded with
        `max_slots`: no move), caches and settings, and frees `src`: live rows are packed
        into the low slots so a step runs at a small bucket."""
        return self._move(state, np.asarray(src, np.int32), np.asarray(dst, np.int32))

    def _move_impl(self, state: DecodeState, src, dst):
        take = jnp.minimum(src, self.spec.max_slots - 1)  # padding reads any row, written nowhere
        put = lambda x: x.at[dst].set(x[take], mode="drop")  # noqa: E731
        # a row's keys stay in its pages: its page table moves with its other settings
        caches = tuple(c.replace(mask=put(c.mask)) for c in state.caches)
        slots = jax.tree.map(put, state.slots)
        slots = slots.replace(active=slots.active.at[src].set(False, mode="drop"))
        return DecodeState(caches, slots)

    def _step(self, models, caches, slots: Slots, record: Record):
        """One token for every slot: feed the pending tokens, sample the next ones."""
        logits, new_caches = [], []
        kv_len = jnp.where(slots.active, slots.length + 1, 0)  # a free slot reads nothing
        for m, cache in zip(models, caches):
            out, cache = m(slots.token[:, None], slots.length[:, None], cache=cache.replace(index=slots.length),
                           last_only=True, attention=self.attention, kv_len=kv_len)
            logits.append(out[:, -1])
            new_caches.append(cache)
        z = slot_logits(logits, slots, slots.generated, combination=self.combination, vocab=self.vocab,
                        num_pairs=self.num_pairs, rl_index=self.rl_index)
        z_sampled = mask_early_stops(z, slots.stop_ids, slots.generated < slots.min_tokens, slots.forced_len)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(slots.keys), slots.generated)
        tok = sample_rows(keys, z_sampled, slots.temperature, slots.top_k, slots.top_p)
        tok, forced_pos, forced = force_continue(tok, slots)
        stopped, ended = row_ends(tok[:, None], slots.generated[:, None], slots, forced[:, None])
        stopped, ended = stopped[:, 0], ended[:, 0]
        logp, top, ent = recorded(z, tok, slots.temperature, record)
        act = slots.active
        slots = advance(slots, tok, act.astype(jnp.int32), ended, forced_pos)
        return tuple(new_caches), slots, (tok, logp, ent, top, act, act & ended, act & stopped)

    def _empty_output(self, gamma: int, record: Record, s: int) -> StepOutput:
        k, width = record.top_logprobs, self.spec.steps * (gamma + 1)
        return StepOutput(tokens=jnp.zeros((s, width), jnp.int32), logprobs=jnp.zeros((s, width), jnp.float32),
                          top_ids=jnp.zeros((s, width, k), jnp.int32),
                          top_logprobs=jnp.zeros((s, width, k), jnp.float32),
                          entropies=jnp.zeros((s, width), jnp.float32), count=jnp.zeros((s,), jnp.int32),
                          finished=jnp.zeros((s,), bool), stopped=jnp.zeros((s,), bool),
                          steps=jnp.zeros((), jnp.int32), drafted=jnp.zeros((s,), jnp.int32),
                          accepted=jnp.zeros((s,), jnp.int32), rounds=jnp.zeros((s,), jnp.int32),
                          forced_pos=jnp.full((s,), -1, jnp.int32))

    def _decode_impl(self, params, state: DecodeState, release, exit_after, steps, pages, *, gamma: int,
                     record: Record, rows: int):
        """The loop runs on the first `rows` slots (the rest are free) over the whole caches:
        the models write and read cache row r for slot r, so no cache row is copied."""
        models = self._models(params)
        every = state.slots.replace(active=state.slots.active & ~release, pages=pages)
        slots = jax.tree.map(lambda x: x[:rows], every)
        out = self._empty_output(gamma, record, rows)
        # a cache's write index and page table are per query row: [rows] inside the loop
        caches = tuple(c.replace(index=c.index[:rows], pages=slots.pages) for c in state.caches)
        rows_ = jnp.arange(rows)[:, None]

        def cond(carry):
            _, slots, out = carry
            return (out.steps < steps) & jnp.any(slots.active) & (jnp.sum(out.finished) < exit_after)

        def body(carry):
            """One step or round: a slot's tokens land at its own count (a step: 1 while
            active; a round: 1 to γ + 1), positions past its count are dropped."""
            caches, slots, out = carry
            was_active = slots.active.astype(jnp.int32)
            if gamma:
                caches, slots, r = speculative_round(
                    models, caches, slots, gamma=gamma, rl_index=self.rl_index, combination=self.combination,
                    vocab=self.vocab, num_pairs=self.num_pairs, attention=self.attention, record=record)
                emitted = (r["tokens"], r["logprobs"], r["entropies"], r["top"], r["count"], r["finished"],
                           r["stopped"])
                out = out.replace(drafted=out.drafted + r["drafted"], accepted=out.accepted + r["accepted"],
                                  rounds=out.rounds + was_active)
            else:
                caches, slots, (tok, logp, ent, top, act, done, stopped) = self._step(models, caches, slots, record)
                top = None if top is None else (top[0][:, None], top[1][:, None])
                emitted = (tok[:, None], logp[:, None], ent[:, None], top, act.astype(jnp.int32), done, stopped)
            tokens, logp, ent, top, count, finished, stopped = emitted
            j = jnp.arange(tokens.shape[1])
            at = jnp.where(j < count[:, None], out.count[:, None] + j, out.tokens.shape[1])  # beyond: dropped
            put = lambda buf, v: buf.at[rows_, at].set(v, mode="drop")  # noqa: E731
            out = out.replace(tokens=put(out.tokens, tokens), count=out.count + count, finished=out.finished | finished,
                              stopped=out.stopped | stopped, steps=out.steps + 1)
            if record.logprobs:
                out = out.replace(logprobs=put(out.logprobs, logp))
            if record.entropies:
                out = out.replace(entropies=put(out.entropies, ent))
            if top is not None:
                out = out.replace(top_logprobs=put(out.top_logprobs, top[0]),
                                  top_ids=put(out.top_ids, top[1].astype(jnp.int32)))
            return caches, slots, out

        caches, slots, out = jax.lax.while_loop(cond, body, (caches, slots, out))
        caches = tuple(c.replace(index=old.index, pages=None) for c, old in zip(caches, state.caches))
        every = jax.tree.map(lambda full, part: full.at[:rows].set(part), every, slots)
        return DecodeState(caches, every), out.replace(forced_pos=slots.forced_pos)
