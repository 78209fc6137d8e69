"""RAST decoding: the base model and every small (rl, ref) pair decoded jointly.

Each model keeps its own KV cache. A batch is prefilled in all models, then one jitted
`lax.while_loop` samples a token from the combined logits and feeds it to every model,
until all rows stop or `max_new_tokens` is reached. With stop *strings* the loop returns to
the host every `stop_check_every` tokens so finished rows can be marked (the token-level
stop ids are checked on device every step).

The KV caches grow in segments (`cache_segments`): a decode step reads every slot of its
cache, so while generating token t only the slots up to the end of t's segment exist. With 8
segments a long generation reads ~40% less cache than with one full-length cache (1.5x
faster steps at 512 new tokens on CPU); each segment's loop is compiled once.
Shapes: `[batch, time]`, logits `[batch, vocab]`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxrast.decode_schedule import bucket_length, default_workers, grow_in_place, in_order, segment_ends
from jaxrast.distributed import host_array, put_global
from jaxrast.models.decoder import CausalLM, KVCache
from jaxrast.sampling import combine_logits, lam_schedule as make_lam_schedule, sample, sample_with_entropy
from jaxrast.sharding import BATCH, TOKENS_SPEC, cache_sharding, fit_spec

_ROWS_SPEC = P(BATCH)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1 disable those filters. stop_token_ids
    None means the tokenizer's eos token. `n` samples are drawn per prompt."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = True  # False: skip log p(token) (an on-policy GRPO rollout needs none)
    entropies: bool = False  # True: record the entropy of softmax(z / τ) at each step (GRPO statistics)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("top_k must be >= 0, max_new_tokens >= 1 and n >= 1.")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}.")


@dataclasses.dataclass
class Pair:
    """One small pair: `rl` (RL-tuned), `ref` (its base) and the weight `lam` of rl − ref."""

    rl: CausalLM
    ref: CausalLM
    lam: float = 1.0
    tokenizer: Any = None  # if given, checked against the base tokenizer


@dataclasses.dataclass
class Completion:
    index: int  # position of the prompt in the input list
    sample: int  # 0..n-1
    token_ids: list[int]  # generated tokens, up to and including the one that ended the row
    text: str  # decoded, without special tokens and without the stop string
    finish_reason: str  # "stop" | "length"
    # log p(token) under the combined logits z (τ = 1, unfiltered): the policy's own
    # log-probs when decoding one model, as GRPO needs for its importance ratios
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # entropy of the distribution each token was drawn from, softmax(z / τ) before top-p/top-k
    # (τ = 1 when greedy); only with SamplingParams(entropies=True)
    entropies: list[float] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


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


def check_tokenizers_compatible(base_tok, other_tok, name: str) -> None:
    """Refuses a pair whose tokenizer differs from the base's beyond padding."""
    if base_tok is None or other_tok is None:
        return
    if base_tok.get_vocab() != other_tok.get_vocab():
        diff = len(set(base_tok.get_vocab().items()) ^ set(other_tok.get_vocab().items()))
        raise ValueError(f"{name}'s tokenizer differs from the base model's ({diff} token/id mappings "
                         "differ); RAST combines logits id by id, so every model must share one vocabulary.")


@jax.jit
def _row_keys(seed: jax.Array, row_ids: jax.Array, samples: jax.Array) -> jax.Array:
    """Key data [batch, 2] of each row's stream: fold_in(fold_in(key(seed), row_id), sample).
    One vectorised call (the seed is traced, so new seeds do not recompile)."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base, r), s))(row_ids, samples)
    return jax.random.key_data(keys)


class RAST:
    """Decodes `base` with the shift Σ λ_i (rl_i − ref_i) of small pairs.

    With no pairs this is plain decoding of `base` (the small models are not run at all).
    `lam_schedule`: 'constant', 'warmup:N' or 'first:N', or a callable step -> multiplier.
    `cache_segments`: the KV caches grow in about this many steps of >= 32 tokens (1 = one
    full-length cache); more segments read less cache per step but compile more loops.
    `workers`: the `batch_size` rows decoded at a time are split into this many programs
    run concurrently from threads. Default: 2 on one multi-core CPU device (XLA:CPU
    leaves cores idle in a decode step's small ops; two programs decode ~1.7x faster than
    one twice their size), else 1 (an accelerator, or a mesh of devices, is kept busy).
    """

    def __init__(self, base: CausalLM, pairs: Sequence[Pair | tuple] = (), *, tokenizer=None,
                 mesh: Mesh | None = None, lam_schedule: str | Callable | None = None,
                 batch_size: int = 16, vocab_size: int | None = None, stop_check_every: int = 64,
                 cache_segments: int = 8, workers: int | None = None):
        pairs = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
        for i, p in enumerate(pairs):
            check_tokenizers_compatible(tokenizer, p.tokenizer, f"pair {i}")
        # Distinct models, each run once per step even if shared by several pairs.
        models: list[CausalLM] = [base]
        def index_of(m):
            for j, seen in enumerate(models):
                if seen is m:
                    return j
            models.append(m)
            return len(models) - 1
        self.pair_index = tuple((index_of(p.rl), index_of(p.ref)) for p in pairs)
        self.models = models
        self.lams = np.array([p.lam for p in pairs], np.float32)
        self.tokenizer = tokenizer
        self.vocab = vocab_size or (len(tokenizer) if tokenizer is not None else
                                    min(m.cfg.vocab_size for m in models))
        for j, m in enumerate(models):
            if m.cfg.vocab_size < self.vocab:
                raise ValueError(f"model {j} has {m.cfg.vocab_size} vocab rows but the tokenizer has "
                                 f"{self.vocab} tokens; the models do not share the tokenizer.")
        self.mesh = mesh
        self.schedule = lam_schedule if callable(lam_schedule) else make_lam_schedule(lam_schedule)
        self.batch_size = batch_size
        self.stop_check_every = stop_check_every
        if cache_segments < 1 or stop_check_every < 1:
            raise ValueError(f"cache_segments ({cache_segments}) and stop_check_every ({stop_check_every}) "
                             "must both be >= 1.")
        self.cache_segments = cache_segments
        self.workers = default_workers(batch_size, mesh) if workers is None else workers
        if self.workers < 1 or batch_size % self.workers:
            raise ValueError(f"workers={self.workers} must be >= 1 and divide batch_size={batch_size}.")
        if self.workers > 1 and jax.process_count() > 1:
            raise ValueError("workers > 1 needs a single process: every process must issue the same "
                             "programs in the same order.")
        self.program_batch = batch_size // self.workers
        self._graphdefs = tuple(nnx.graphdef(m) for m in models)
        # `limit` (the step to stop at) is traced: the loops compile once per cache length
        self._start = jax.jit(self._start_impl, static_argnames=("params", "cache_len"), donate_argnames=())
        self._resume = jax.jit(self._resume_impl, static_argnames=("params",), donate_argnums=(1,))

    # ---- jitted device program ------------------------------------------------------------

    def _combine(self, logits: list[jax.Array], step: jax.Array, lams: jax.Array) -> jax.Array:
        lam = lams * self.schedule(step)
        rl = [logits[i] for i, _ in self.pair_index]
        ref = [logits[j] for _, j in self.pair_index]
        return combine_logits(logits[0], rl, ref, lam, self.vocab)

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

    def _put(self, x: np.ndarray, spec=TOKENS_SPEC):
        """A host batch array on the mesh, split over its batch axes (each process feeds its own slices)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return put_global(x, NamedSharding(self.mesh, fit_spec(spec, x.shape, self.mesh, "batch")))

    def generate_iter(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams = SamplingParams(),
                      *, row_ids: Sequence[int] | None = None, progress: bool | None = None
                      ) -> Iterator[list[Completion]]:
        """Yields the completions of each batch as it finishes (rows sorted by prompt length).

        row_ids: a stable integer per prompt used to derive its random stream (default: its
        index), so a row's samples do not depend on batch composition or resumption.
        """
        # Read the parameters afresh on every call: a trainer updates the models in place.
        states = tuple(nnx.state(m) for m in self.models)
        encoded = self._encode(prompts)
        longest = max((len(e) for e in encoded), default=0) + params.max_new_tokens
        limit = min(m.cfg.max_position_embeddings for m in self.models)
        if longest > limit:  # RoPE still runs past it, but the models were never trained there
            warnings.warn(f"the longest prompt plus max_new_tokens is {longest} tokens, beyond a model's "
                          f"max_position_embeddings ({limit}); expect degraded text past that position.",
                          stacklevel=2)
        row_ids = list(range(len(encoded))) if row_ids is None else [int(r) for r in row_ids]
        rows = sorted(((i, s) for i in range(len(encoded)) for s in range(params.n)),
                      key=lambda r: len(encoded[r[0]]))
        tok = self.tokenizer
        eos = () if tok is None or tok.eos_token_id is None else (tok.eos_token_id,)
        stop_ids = np.array(params.stop_token_ids if params.stop_token_ids is not None else eos or (-1,), np.int32)
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

    def generate(self, prompts, params: SamplingParams = SamplingParams(), **kw) -> list[list[Completion]]:
        """All completions, as `result[prompt_index][sample]`."""
        result: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        for batch in self.generate_iter(prompts, params, **kw):
            for c in batch:
                result[c.index][c.sample] = c
        return result  # type: ignore[return-value]

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
        keys = np.asarray(_row_keys(params.seed, np.array([row_ids[i] for i, _ in chunk], np.uint32),
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
                        hit = self._find_stop_string(out[r, :length[r]], params.stop_strings)
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
                text = self.tokenizer.decode(out[r, :n].tolist(), skip_special_tokens=True) \
                    if self.tokenizer is not None else ""
                reason = "stop" if stopped[r] else "length"
            results.append(Completion(i, s, out[r, :n].tolist(), text, reason,
                                      logp[r, :n].tolist() if params.logprobs else [],
                                      ent[r, :n].tolist() if params.entropies else []))
        return results

    def _find_stop_string(self, ids: np.ndarray, stops: Sequence[str]) -> tuple[int, str] | None:
        """(tokens up to and including the one completing a stop string, text before it)."""
        if self.tokenizer is None or len(ids) == 0:
            return None
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        text = decode(ids.tolist())
        found = [text.find(s) for s in stops if s in text]
        if not found:
            return None
        first = min(found)
        lo, hi = 1, len(ids)  # smallest prefix whose text already contains a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in decode(ids[:mid].tolist()) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return lo, text[:first]
