"""A static-batch RAST decoder: the benchmarks' stand-in for the seed repo's decoding, to
compare the continuous-batching engine (`jaxrast.rast.RAST`) against.

Rows (sorted by prompt length) are cut into batches of `batch_size`; a batch is prefilled in
every model, then one jitted `lax.while_loop` samples each token from the combined logits and
feeds it to every model until all rows stop or `max_new_tokens` is reached: a batch runs until
its longest row ends. Stop ids are checked on device every step; stop strings on the host
every `stop_check_every` tokens. Each model keeps its own KV cache, grown in `cache_segments`
steps because a decode step reads every position of its cache. Single device.
Shapes: tokens `[batch, time]`, logits `[batch, vocab]`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxrast.models.kv_cache import KVCache
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.combine import lam_schedule
from jaxrast.rast.detokenize import TextStream
from jaxrast.rast.ensemble import Ensemble, Pair
from jaxrast.rast.params import Completion, SamplingParams, by_prompt
from jaxrast.rast.sampling import draw_probs, row_entropies, sample_rows, softmax_entropy
from jaxrast.rast.slots import stream_keys

row_keys = jax.jit(stream_keys)


# ---- host-side scheduling ------------------------------------------------------------------

def segment_ends(max_new_tokens: int, segments: int, min_tokens: int = 32) -> list[int]:
    """Where the cache segments end: about `segments` equal steps of at least `min_tokens`
    tokens (rounded up to 16), the last ending at max_new_tokens."""
    size = max(min_tokens, -(-max_new_tokens // max(segments, 1)))
    size = -(-size // 16) * 16
    return list(range(size, max_new_tokens, size)) + [max_new_tokens]


@functools.partial(jax.jit, static_argnames=("axis", "size"))
def pad_to(x: jax.Array, *, axis: int, size: int) -> jax.Array:
    return jnp.pad(x, [(0, size - n if a == axis else 0) for a, n in enumerate(x.shape)])


def grow_in_place(arrays: list, axes: list[int], size: int) -> None:
    """Pads each array along its axis (-1: leave it) to `size`, replacing the list entries one
    by one so each old array is freed once its copy exists (no second set of caches)."""
    for i, axis in enumerate(axes):
        if axis >= 0 and arrays[i].shape[axis] < size:
            arrays[i] = pad_to(arrays[i], axis=axis, size=size)


def in_order(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """fn over items on `workers` threads, at most `workers` calls in flight (each holds its
    KV caches), results in the items' order."""
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) == workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_workers(batch_size: int) -> int:
    """2 concurrent programs on a multi-core CPU (XLA:CPU runs a small decode step on about
    one core), else 1."""
    multi_core = jax.default_backend() == "cpu" and (os.cpu_count() or 1) > 1
    return 2 if multi_core and batch_size % 2 == 0 else 1


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt widths padded to a power of two, so a benchmark compiles a handful of times."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


# ---- the device program ----------------------------------------------------------------------

def sample_step(keys: jax.Array, z: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array | None]:
    """One token per row [batch] and, with params.entropies, the entropy of softmax(z / τ)."""
    batch = z.shape[0]
    temperature = jnp.full((batch,), params.temperature, jnp.float32)
    if params.entropies and params.temperature > 0 and params.top_k == 0 and params.top_p >= 1.0:
        probs, entropy = softmax_entropy(z / params.temperature)  # no filters: the draw reuses this softmax
        return draw_probs(keys, probs), entropy
    if params.temperature == 0:
        tok = jnp.argmax(z, axis=-1).astype(jnp.int32)
    else:
        tok = sample_rows(keys, z, temperature, jnp.full((batch,), params.top_k, jnp.int32),
                          jnp.full((batch,), params.top_p, jnp.float32))
    return tok, row_entropies(z, temperature) if params.entropies else None


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # [] next position in `out`
    out: jax.Array  # [batch, max_new] generated tokens
    logp: jax.Array  # [batch, max_new] log-prob of each token under z
    entropy: jax.Array  # [batch, max_new] entropy of softmax(z / τ) at each step
    length: jax.Array  # [batch] tokens generated so far (incl. stop token)
    done: jax.Array  # [batch] bool
    stopped: jax.Array  # [batch] bool: finished on a stop id
    pos: jax.Array  # [batch] RoPE position of the next token
    z: jax.Array  # [batch, vocab] combined logits for the next token
    keys: jax.Array  # [batch] per-row PRNG keys
    caches: tuple  # one KVCache per model


class StaticBatches:
    """Decodes `base` with the shift Σ λ_i (rl_i − ref_i) of `pairs`, batch by batch.
    `workers`: batches decoded concurrently from threads (default: 2 on a multi-core CPU)."""

    def __init__(self, base: CausalLM, pairs: Sequence[Pair | tuple] = (), *, tokenizer, batch_size: int = 16,
                 workers: int | None = None, cache_segments: int = 8, stop_check_every: int = 64):
        pairs = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
        ensemble = Ensemble.of_pairs(base, pairs, vocab=None, tokenizer=tokenizer)
        self.models, self.vocab = ensemble.models, ensemble.vocab
        self.combination = ensemble.combination(base, pairs, lam_schedule(None))
        self.lams = np.array([p.lam for p in pairs], np.float32)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.cache_segments, self.stop_check_every = cache_segments, stop_check_every
        self.workers = default_workers(batch_size) if workers is None else workers
        if min(batch_size, cache_segments, stop_check_every, self.workers) < 1 or batch_size % self.workers:
            raise ValueError(f"batch_size ({batch_size}), cache_segments, stop_check_every and workers "
                             f"({self.workers}) must be >= 1, and workers must divide batch_size.")
        self.program_batch = batch_size // self.workers
        # the weights are arguments, not constants baked into the programs
        self._graphdefs = tuple(nnx.graphdef(m) for m in self.models)
        self._variables = tuple(nnx.state(m) for m in self.models)
        # `limit` (the step to stop at) is traced: the loops compile once per cache length
        self._start = jax.jit(self._start_impl, static_argnames=("params", "cache_len"))
        self._resume = jax.jit(self._resume_impl, static_argnames=("params",), donate_argnums=(1,))

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
            tok, step_ent = sample_step(step_keys, s.z, params)
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
            z = self.combination(logits, s.step + 1, self.vocab, lams)
            return _LoopState(step=s.step + 1, out=out, logp=logp, entropy=ent, length=length, done=done,
                              stopped=s.stopped | hit, pos=s.pos + 1, z=z, keys=s.keys, caches=caches)

        return jax.lax.while_loop(cond, body, state)

    def _start_impl(self, states, tokens, mask, key_data, done, lams, stop_ids, pad_id, limit, *, params, cache_len):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        batch = tokens.shape[0]
        caches = [KVCache.init(m.cfg, batch, cache_len, m.dtype) for m in models]
        logits, caches = self._forward(models, tokens, None, mask, caches)
        new = params.max_new_tokens
        state = _LoopState(
            step=jnp.zeros((), jnp.int32), out=jnp.full((batch, new), pad_id, jnp.int32),
            logp=jnp.zeros((batch, new), jnp.float32), entropy=jnp.zeros((batch, new), jnp.float32),
            length=jnp.zeros((batch,), jnp.int32), done=done, stopped=jnp.zeros((batch,), bool),
            pos=mask.sum(-1).astype(jnp.int32), z=self.combination(logits, jnp.zeros((), jnp.int32), self.vocab, lams),
            keys=jax.random.wrap_key_data(key_data), caches=caches)
        return self._loop(models, state, lams, params, stop_ids, pad_id, limit)

    def _resume_impl(self, states, state, lams, stop_ids, pad_id, limit, *, params):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        return self._loop(models, state, lams, params, stop_ids, pad_id, limit)

    # ---- host side ---------------------------------------------------------------------------

    def _encode(self, prompts) -> list[list[int]]:
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
                   else [int(t) for t in p] for p in prompts]
        if not all(encoded):
            raise ValueError("an empty prompt cannot be decoded; give every prompt at least one token.")
        return encoded

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_iter(self, prompts, params: SamplingParams = SamplingParams(), *,
                      row_ids: Sequence[int] | None = None, progress: bool | None = None
                      ) -> Iterator[list[Completion]]:
        """Yields the completions of each batch as it finishes. row_ids: a stable integer per
        prompt for its random stream (default: its index), as `RAST.generate_iter`."""
        if params.min_tokens or params.continue_text:
            raise ValueError("min_tokens and continue_text need the continuous engine (RAST).")
        encoded = self._encode(prompts)
        row_ids = list(range(len(encoded))) if row_ids is None else [int(r) for r in row_ids]
        states = self._variables  # the parameters as they are now
        rows = sorted(((i, s) for i in range(len(encoded)) for s in range(params.n)), key=lambda r: len(encoded[r[0]]))
        tok = self.tokenizer
        ids = params.stop_token_ids if params.stop_token_ids is not None else (
            () if tok.eos_token_id is None else (tok.eos_token_id,))
        stop_ids = np.array(ids or (-1,), np.int32)
        pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0] if stop_ids[0] >= 0 else 0)
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

    def generate(self, prompts, params: SamplingParams = SamplingParams(), **kw) -> list[list[Completion]]:
        """All completions, as `result[prompt_index][sample]`."""
        return by_prompt(self.generate_iter(prompts, params, **kw), len(prompts), params.n)

    def _run_batch(self, states, chunk, *, encoded, row_ids, params, stop_ids, pad_id) -> list[Completion]:
        real = len(chunk)
        chunk = list(chunk) + [chunk[-1]] * (self.program_batch - real)  # a fixed batch: one compile
        width = bucket_length(max(len(encoded[i]) for i, _ in chunk))
        tokens = np.full((len(chunk), width), pad_id, np.int32)
        mask = np.zeros((len(chunk), width), bool)
        for r, (i, _) in enumerate(chunk):  # left-padded
            tokens[r, width - len(encoded[i]):] = encoded[i]
            mask[r, width - len(encoded[i]):] = True
        keys = row_keys(np.full(len(chunk), params.seed, np.uint32),
                        np.array([row_ids[i] for i, _ in chunk], np.uint32), np.array([s for _, s in chunk], np.uint32))
        done = np.arange(len(chunk)) >= real  # padding rows start finished
        every = params.max_new_tokens if not params.stop_strings else self.stop_check_every
        ends = segment_ends(params.max_new_tokens, self.cache_segments)

        def run_to(step: int) -> tuple[np.ndarray, int]:
            """The loop's next stop (a stop-string check or a segment end) and its cache length."""
            end = next(e for e in ends if e > step)
            return np.int32(min(step + every, end)), width + end

        static = dataclasses.replace(params, seed=0)  # a new seed (the keys above) must not recompile
        limit, cache_len = run_to(0)
        state = self._start(states, tokens, mask, keys, done, self.lams, stop_ids, pad_id, limit, params=static,
                            cache_len=cache_len)
        cut: dict[int, tuple[int, str]] = {}  # row -> (num_tokens, text) for stop-string hits
        while True:
            step, done = jax.device_get((state.step, state.done))
            step, done = int(step), np.array(done)
            if params.stop_strings:
                out, length = jax.device_get((state.out, state.length))
                for r in range(real):
                    if r not in cut:
                        text = TextStream(self._decode_text, params.stop_strings)  # the whole row as one call
                        text.extend(out[r, :length[r]].tolist())
                        hit = text.stop_in_call()
                        if hit is not None:
                            cut[r], done[r] = hit, True
                state = state.replace(done=jnp.asarray(done))
            if done.all() or step >= params.max_new_tokens:
                break
            limit, cache_len = run_to(step)
            if state.caches[0].max_len < cache_len:  # a new segment: its positions join the caches
                leaves, treedef = jax.tree.flatten(state.caches)
                axes = jax.tree.leaves(tuple(c.time_axes() for c in state.caches))
                state = state.replace(caches=())  # `leaves` now holds the only references
                grow_in_place(leaves, axes, cache_len)
                state = state.replace(caches=jax.tree.unflatten(treedef, leaves))
            state = self._resume(states, state, self.lams, stop_ids, pad_id, limit, params=static)
        out, logp, ent, length, stopped = jax.device_get((state.out, state.logp, state.entropy, state.length,
                                                          state.stopped))
        results = []
        for r in range(real):
            i, s = chunk[r]
            if r in cut:
                n, text = cut[r]
            else:
                n = int(length[r])
                text = self._decode_text(out[r, :n].tolist())
            reason = "stop" if r in cut or stopped[r] else "length"
            results.append(Completion(i, s, out[r, :n].tolist(), text, reason,
                                      logp[r, :n].tolist() if params.logprobs else [],
                                      ent[r, :n].tolist() if params.entropies else []))
        return results
