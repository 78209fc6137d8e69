"""Static-batch RAST decoding: the path before the continuous-batching engine, kept as
`RAST(scheduler="static")` while `benchmarks/decode.py` compares the two.

Each model keeps its own KV cache. A batch is prefilled in all models, then one jitted
`lax.while_loop` samples a token from the combined logits and feeds it to every model,
until all rows stop or `max_new_tokens` is reached. With stop *strings* the loop returns to
the host every `stop_check_every` tokens so finished rows can be marked (the token-level
stop ids are checked on device every step). A batch runs until its longest row ends.

The KV caches grow in segments (`cache_segments`): a decode step reads every position of
its cache, so while generating token t only the positions up to the end of t's segment
exist. With 8 segments a long generation reads ~40% less cache than with one full-length
cache (1.5x faster steps at 512 new tokens on CPU); each segment's loop is compiled once.
Shapes: `[batch, time]`, logits `[batch, vocab]`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxrast.models.kv_cache import KVCache
from jaxrast.models.partitioning import TOKENS_SPEC, cache_sharding, fit_spec
from jaxrast.rast.engine import row_keys
from jaxrast.rast.params import Completion, SamplingParams
from jaxrast.rast.requests import find_stop_string
from jaxrast.rast.sampling import sample, sample_with_entropy
from jaxrast.rast.schedule import bucket_length, grow_in_place, in_order, segment_ends
from jaxrast.runtime.distributed import host_array, put_global
from jaxrast.runtime.mesh import BATCH

_ROWS_SPEC = P(BATCH)


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # [] next position in `out`
    out: jax.Array  # [batch, max_new] generated tokens
    logp: jax.Array  # [batch, max_new] float32 log-prob of each generated token under z
    entropy: jax.Array  # [batch, max_new] float32 entropy of softmax(z / τ) at each step
    length: jax.Array  # [batch] tokens generated so far (incl. stop token)
    done: jax.Array  # [batch] bool
    stopped: jax.Array  # [batch] bool: finished on a stop token
    pos: jax.Array  # [batch] RoPE position of the next token
    z: jax.Array  # [batch, vocab] combined logits for the next token
    keys: jax.Array  # [batch] per-row PRNG keys
    caches: tuple  # one KVCache per model


class StaticBatches:
    """The static-batch decode loop, mixed into `RAST`, which provides `models`, `vocab`,
    `combination`, `lams`, `mesh`, `tokenizer`, `batch_size`, `workers`, `program_batch`,
    `stop_check_every`, `cache_segments`, `_stop_ids`, `_decode_text` and `_completion`."""

    def _init_static(self) -> None:
        self._graphdefs = tuple(nnx.graphdef(m) for m in self.models)
        self._variables = tuple(nnx.state(m) for m in self.models)  # holds the Variables: reads their current values
        # `limit` (the step to stop at) is traced: the loops compile once per cache length
        self._start = jax.jit(self._start_impl, static_argnames=("params", "cache_len"), donate_argnames=())
        self._resume = jax.jit(self._resume_impl, static_argnames=("params",), donate_argnums=(1,))

    # ---- jitted device program ------------------------------------------------------------

    def _combine(self, logits: list[jax.Array], step: jax.Array, lams: jax.Array) -> jax.Array:
        return self.combination(logits, step, self.vocab, lams)

    def _forward(self, models, tokens, positions, mask, caches):
        logits, new_caches = [], []
        for m, c in zip(models, caches):
            out, c = m(tokens, positions, attention_mask=mask, cache=c, last_only=True)
            logits.append(out[:, -1])
            new_caches.append(c)
        return logits, tuple(new_caches)

    def _loop(self, models, state: _LoopState, lams, params: SamplingParams, stop_ids, pad_id, limit):
        def cond(s: _LoopState):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s: _LoopState):
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
            if params.entropies:
                tok, step_ent = sample_with_entropy(step_keys, s.z, params.temperature, params.top_k, params.top_p)
            else:
                tok = sample(step_keys, s.z, params.temperature, params.top_k, params.top_p)
            tok = jnp.where(s.done, pad_id, tok)
            out = jax.lax.dynamic_update_slice_in_dim(s.out, tok[:, None], s.step, axis=1)
            logp, ent = s.logp, s.entropy
            if params.logprobs:
                tok_logp = jnp.take_along_axis(jax.nn.log_softmax(s.z, axis=-1), tok[:, None], axis=-1)
                logp = jax.lax.dynamic_update_slice_in_dim(s.logp, tok_logp, s.step, axis=1)
            if params.entropies:
                ent = jax.lax.dynamic_update_slice_in_dim(s.entropy, step_ent[:, None], s.step, axis=1)
            hit = jnp.isin(tok, stop_ids) & ~s.done
            length = jnp.where(s.done, s.length, s.step + 1)
            done = s.done | hit | (s.step + 1 >= params.max_new_tokens)
            logits, caches = self._forward(models, tok[:, None], s.pos[:, None], None, s.caches)
            z = self._combine(logits, s.step + 1, lams)
            return _LoopState(step=s.step + 1, out=out, logp=logp, entropy=ent, length=length, done=done,
                              stopped=s.stopped | hit, pos=s.pos + 1, z=z, keys=s.keys, caches=caches)

        return jax.lax.while_loop(cond, body, state)

    def _start_impl(self, states, tokens, mask, key_data, done, lams, stop_ids, pad_id, limit, *, params, cache_len):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        keys = jax.random.wrap_key_data(key_data)
        batch, width = tokens.shape
        caches = []
        for m in models:
            cache = KVCache.init(m.cfg, batch, cache_len, m.dtype)
            if self.mesh is not None:
                cache = jax.lax.with_sharding_constraint(cache, cache_sharding(self.mesh, cache))
            caches.append(cache)
        logits, caches = self._forward(models, tokens, None, mask, caches)
        state = _LoopState(
            step=jnp.zeros((), jnp.int32),
            out=jnp.full((batch, params.max_new_tokens), pad_id, jnp.int32),
            logp=jnp.zeros((batch, params.max_new_tokens), jnp.float32),
            entropy=jnp.zeros((batch, params.max_new_tokens), jnp.float32),
            length=jnp.zeros((batch,), jnp.int32), done=done, stopped=jnp.zeros((batch,), bool),
            pos=mask.sum(-1).astype(jnp.int32), z=self._combine(logits, jnp.zeros((), jnp.int32), lams),
            keys=keys, caches=caches)
        return self._loop(models, state, lams, params, stop_ids, pad_id, limit)

    def _resume_impl(self, states, state, lams, stop_ids, pad_id, limit, *, params):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        return self._loop(models, state, lams, params, stop_ids, pad_id, limit)

    def _put(self, x: np.ndarray, spec=TOKENS_SPEC):
        """A host batch array on the mesh, split over its batch axes (each process feeds its own slices)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return put_global(x, NamedSharding(self.mesh, fit_spec(spec, x.shape, self.mesh, "batch")))

    def _static_iter(self, encoded: list[list[int]], params, row_ids: list[int], progress: bool | None
                     ) -> Iterator[list]:
        """Yields the completions of each static batch as it finishes (rows sorted by prompt length)."""
        # The parameters as they are now (a trainer updates them in place): see Engine.refresh
        states = self._variables
        rows = sorted(((i, s) for i in range(len(encoded)) for s in range(params.n)),
                      key=lambda r: len(encoded[r[0]]))
        tok = self.tokenizer
        stop_ids = np.array(self._stop_ids(params) or (-1,), np.int32)
        pad_id = int(tok.pad_token_id if tok is not None and tok.pad_token_id is not None else
                     (stop_ids[0] if len(stop_ids) and stop_ids[0] >= 0 else 0))
        bar = tqdm(total=len(rows), desc="decoding", unit="row", disable=progress is False or
                   (progress is None and len(rows) < 2 * self.batch_size))
        t0, total_tokens = time.perf_counter(), 0
        run = functools.partial(self._run_batch, states, encoded=encoded, row_ids=row_ids, params=params,
                                stop_ids=stop_ids, pad_id=pad_id)
        chunks = [rows[i:i + self.program_batch] for i in range(0, len(rows), self.program_batch)]
        results = map(run, chunks) if self.workers == 1 else in_order(run, chunks, self.workers)
        for chunk, completions in zip(chunks, results):
            total_tokens += sum(c.num_tokens for c in completions)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{total_tokens / (time.perf_counter() - t0):.1f}")
            yield completions
        bar.close()

    def _run_batch(self, states, chunk, *, encoded, row_ids, params, stop_ids, pad_id) -> list[Completion]:
        real = len(chunk)
        chunk = list(chunk) + [chunk[-1]] * (self.program_batch - real)  # fixed batch: one compile
        width = bucket_length(max(len(encoded[i]) for i, _ in chunk))
        tokens = np.full((len(chunk), width), pad_id, np.int32)
        mask = np.zeros((len(chunk), width), bool)
        for r, (i, _) in enumerate(chunk):
            ids = encoded[i]
            tokens[r, width - len(ids):] = ids
            mask[r, width - len(ids):] = True
        # Keys travel as raw uint32 data: a host array every process can feed its slices of.
        keys = np.asarray(row_keys(np.full(len(chunk), params.seed, np.uint32),
                                   np.array([row_ids[i] for i, _ in chunk], np.uint32),
                                    np.array([s for _, s in chunk], np.uint32)))
        done = np.arange(len(chunk)) >= real  # padding rows start finished
        lams = self.lams  # lams and stop_ids stay host arrays: jit replicates them on every device
        every = params.max_new_tokens if not params.stop_strings else self.stop_check_every
        ends = segment_ends(params.max_new_tokens, self.cache_segments)

        def run_to(step: int) -> tuple[np.ndarray, int]:
            """The loop's next stop (a stop-string check or a segment end) and its cache length."""
            end = next(e for e in ends if e > step)
            return np.int32(min(step + every, end)), width + end

        # The seed only makes the host-side keys above; keeping it out of the static
        # arguments stops every new seed (a GRPO step) from recompiling the loop.
        static = dataclasses.replace(params, seed=0)
        limit, cache_len = run_to(0)
        state = self._start(states, self._put(tokens), self._put(mask), self._put(keys, _ROWS_SPEC),
                            self._put(done, _ROWS_SPEC), lams, stop_ids, pad_id, limit, params=static,
                            cache_len=cache_len)
        cut: dict[int, tuple[int, str]] = {}  # row -> (num_tokens, text) for stop-string hits
        # Every host-side decision below is taken from gathered arrays, so all processes of a
        # multi-process run take the same branches and keep issuing the same jitted calls.
        while True:
            watched = (state.step, state.done) + ((state.out, state.length) if params.stop_strings else ())
            step, done, *seen = host_array(watched)
            step, all_done = int(step), bool(done.all())
            if params.stop_strings:
                out, length = seen
                done = np.array(done)
                for r in range(real):
                    if r not in cut:
                        hit = find_stop_string(self._decode_text, out[r, :length[r]].tolist(), params.stop_strings)
                        if hit is not None:
                            cut[r] = hit
                            done[r] = True
                state = state.replace(done=self._put(done, _ROWS_SPEC))
                all_done = bool(done.all())
            if all_done or step >= params.max_new_tokens:
                break
            limit, cache_len = run_to(step)
            if state.caches[0].max_len < cache_len:  # a new segment: its slots join the caches
                leaves, treedef = jax.tree.flatten(state.caches)
                axes = jax.tree.leaves(tuple(c.time_axes() for c in state.caches))
                state = state.replace(caches=())  # `leaves` now holds the only references
                grow_in_place(leaves, axes, cache_len)
                state = state.replace(caches=jax.tree.unflatten(treedef, leaves))
            state = self._resume(states, state, lams, stop_ids, pad_id, limit, params=static)
        out, logp, ent, length, stopped = host_array((state.out, state.logp, state.entropy, state.length,
                                                      state.stopped))
        results = []
        for r in range(real):
            i, s = chunk[r]
            if r in cut:
                n, text = cut[r]
                reason = "stop"
            else:
                n = int(length[r])
                text = self._decode_text(out[r, :n].tolist())
                reason = "stop" if stopped[r] else "length"
            results.append(self._completion(i, s, out[r, :n].tolist(), text, reason,
                                            logp[r, :n].tolist() if params.logprobs else [],
                                            ent[r, :n].tolist() if params.entropies else []))
        return results
