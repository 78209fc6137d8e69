"""The continuous-batching RAST engine: device programs over a fixed set of slots.

JetStream's engine API, for several models at once. Every model keeps one KV cache of
`max_slots` rows of `max_len` positions; a slot holds one sequence in all of them, at its
own length. Two jitted programs, both donating the state and of fixed shapes:

- `admit`: prefill a bucketed batch of prompts in every model and insert them into free
  slots, with each request's settings (λ per pair, τ, top-p, top-k, budget, stop ids,
  min_tokens and a continue text, its PRNG stream);
- `decode`: up to `steps` steps of z = z_base + Σ_i λ_i (z_rl_i − z_ref_i) → sample for
  every slot in one `lax.while_loop`, leaving early when a slot finishes (if requests are
  waiting for one).

A slot's *pending* token is the last one chosen and not yet in the caches: after `admit`
it is the prompt's last token (prefill covers the rest), and each decode step feeds it to
every model, samples the next one and makes that pending. So a request's first token
costs one decode step, and speculative verification can later feed a pending token plus
drafts the same way. Every per-request value is an array over slots, and a row's draws
come from its own stream fold_in(fold_in(key(seed), row_id), sample) at its own step, so
its tokens never depend on its neighbours or its slot. Shapes: slots `[S, ...]`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrast.models.attention import cache_length
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.models.kv_cache import KVCache
from jaxrast.models.partitioning import cache_sharding
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.ensemble import Combination
from jaxrast.rast.sampling import row_entropies, sample_rows
from jaxrast.rast.speculative import attention_bound, speculative_round


def stream_keys(seed: jax.Array, row_ids: jax.Array, samples: jax.Array) -> jax.Array:
    """Key data [batch, 2] of each row's stream: fold_in(fold_in(key(seed), row_id), sample)."""
    keys = jax.vmap(lambda s, r, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), n))(
        seed, row_ids, samples)
    return jax.random.key_data(keys)


row_keys = jax.jit(stream_keys)  # for host callers (the static path)


@flax.struct.dataclass
class Slots:
    """Per-slot decode state, every field an array over the `S` slots."""

    token: jax.Array  # [S] int32 pending token (chosen, not yet in the caches)
    length: jax.Array  # [S] int32 tokens in the caches = RoPE position of `token`
    generated: jax.Array  # [S] int32 tokens generated so far (the pending one included)
    budget: jax.Array  # [S] int32 max new tokens
    min_tokens: jax.Array  # [S] int32 stop ids cannot end the row before this many tokens
    active: jax.Array  # [S] bool
    lam: jax.Array  # [S, pairs] float32 λ of each pair (all 0: the base alone)
    rl_only: jax.Array  # [S] bool: the first pair's rl model alone
    temperature: jax.Array  # [S] float32 (0: greedy)
    top_p: jax.Array  # [S] float32 (1: off)
    top_k: jax.Array  # [S] int32 (0: off)
    stop_ids: jax.Array  # [S, max_stop_ids] int32, padded with `vocab` (never a token)
    keys: jax.Array  # [S, 2] uint32 key data of the row's stream
    forced: jax.Array  # [S, max_forced] int32 continue text: replaces a stop before min_tokens
    forced_len: jax.Array  # [S] int32 (0: no continue text)
    forced_pos: jax.Array  # [S] int32 next continue token to emit (-1: not forcing)
    gamma: jax.Array  # [S] int32 the most drafts a speculative round may accept for the slot


@flax.struct.dataclass
class DecodeState:
    caches: tuple  # one KVCache per distinct model, [S] rows, per-row write index
    slots: Slots


@flax.struct.dataclass
class StepOutput:
    """What one decode call produced, per slot: `tokens[s, :count[s]]` in order."""

    tokens: jax.Array  # [S, steps] int32
    logprobs: jax.Array  # [S, steps] float32 log p(token) under z (τ = 1, unfiltered); 0 when off
    top_ids: jax.Array  # [S, steps, top_logprobs] int32 the most likely tokens under z (with top_logprobs)
    top_logprobs: jax.Array  # [S, steps, top_logprobs] float32 their log-probs
    entropies: jax.Array  # [S, steps] float32 entropy of softmax(z / τ); 0 when off
    count: jax.Array  # [S] int32
    finished: jax.Array  # [S] bool: the slot's row ended in this call
    stopped: jax.Array  # [S] bool: ... on a stop id (else on its budget)
    steps: jax.Array  # [] int32 decode steps (speculative: rounds) run
    drafted: jax.Array  # [S] int32 tokens the draft proposed (speculative rounds)
    accepted: jax.Array  # [S] int32 ... and the target accepted
    rounds: jax.Array  # [S] int32 speculative rounds the slot took part in


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """The static shape of an engine: everything here is compiled in."""

    max_slots: int = 16
    max_len: int = 1024  # positions per slot: prompt + generated tokens
    steps: int = 32  # decode steps per call (fewer when a slot finishes and requests wait)
    prefill_batch: int = 8  # prompts per admit call (padding rows are dropped)
    # prompts per prefill forward (it divides prefill_batch): 1 wastes no compute on padding
    # rows, more batches small prompts (a toy prompt alone costs ~0.6 ms on CPU, 8 together 4.7 ms)
    prefill_chunk: int = 1
    max_stop_ids: int = 4
    max_forced: int = 16  # tokens of a continue text
    logprobs: bool = False  # record log p(token) per step
    entropies: bool = False  # record the entropy of softmax(z / τ) per step
    top_logprobs: int = 0  # record this many most likely tokens per step (the API's top_logprobs)
    gamma: int = 0  # speculative rounds: the first pair's rl model drafts γ tokens (0: plain steps only)

    def __post_init__(self):
        for name in ("max_slots", "max_len", "steps", "prefill_batch", "prefill_chunk", "max_stop_ids", "max_forced"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineSpec.{name} must be >= 1, got {getattr(self, name)}.")
        if self.gamma < 0:
            raise ValueError(f"EngineSpec.gamma must be >= 0, got {self.gamma}.")
        if self.prefill_batch % self.prefill_chunk:
            raise ValueError(f"EngineSpec.prefill_chunk ({self.prefill_chunk}) must divide prefill_batch "
                             f"({self.prefill_batch}).")


def prefill_width(prompt_tokens: int, max_len: int, minimum: int = 16) -> int:
    """The bucket an admit call pads a prompt's prefix (all tokens but the pending last one)
    to: a power of two >= 16, at most `max_len` (one compiled program per bucket)."""
    return min(max_len, max(minimum, 1 << max(0, int(prompt_tokens - 2).bit_length())))


class Engine:
    """Device programs over `spec.max_slots` slots of `models` (distinct, base first).

    combination: the RAST rule over the models' indices (its λ values are replaced per slot);
    rl_index: the model a `rl_only` slot decodes alone (None: none can).
    """

    def __init__(self, models: Sequence[CausalLM], combination: Combination, *, vocab: int, spec: EngineSpec,
                 rl_index: int | None = None, mesh: Mesh | None = None):
        self.models, self.combination, self.vocab, self.spec = list(models), combination, vocab, spec
        self.rl_index, self.mesh = rl_index, mesh
        # attention reads each slot's own blocks (`ragged_attention`) on one device; on a mesh,
        # where slots are split over devices, gathering other slots' blocks would move caches
        # between devices, so there every slot reads up to the longest (`blocked_attention`)
        self.ragged = mesh is None
        # on one CPU device, float32 models: the C++ decode kernel, each row its own keys
        # (`models.cpu_attention`; toy long-tail 19,237 against 14,241 tok/s, random 1,286
        # against 1,071, medians of interleaved rounds)
        self.cpu_kernel = (mesh is None and jax.local_devices()[0].platform == "cpu"
                           and all(m.dtype == jnp.float32 for m in self.models) and cpu_kernel_available())
        self.num_pairs = len(combination.pairs)
        self._graphdefs = tuple(nnx.graphdef(m) for m in self.models)
        self._variables = tuple(nnx.state(m) for m in self.models)  # see refresh()
        self.refresh()
        shardings = self._shardings()
        # explicit output shardings on a mesh: the donated state comes back laid out as it
        # went in, so the next call reuses its buffers and its compiled program
        self._admit = jax.jit(self._admit_impl, donate_argnums=(1,),
                              out_shardings=None if shardings is None else shardings[0])
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), out_shardings=shardings,
                               static_argnames=("gamma",))
        if spec.gamma and rl_index is None:
            raise ValueError("speculative decoding drafts with the first pair's rl model: load a pair.")

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
        length = cache_length(spec.max_len)  # requests are held to spec.max_len
        caches = [KVCache.init(m.cfg, s, length, m.dtype, per_row=True, mask=True) for m in self.models]
        zeros = lambda *shape, dtype=jnp.int32: jnp.zeros((s, *shape), dtype)  # noqa: E731
        slots = Slots(token=zeros(), length=zeros(), generated=zeros(), budget=zeros(), min_tokens=zeros(),
                      active=zeros(dtype=bool), lam=zeros(max(self.num_pairs, 1), dtype=jnp.float32),
                      rl_only=zeros(dtype=bool), temperature=zeros(dtype=jnp.float32),
                      top_p=jnp.ones((s,), jnp.float32), top_k=zeros(),
                      stop_ids=jnp.full((s, spec.max_stop_ids), self.vocab, jnp.int32),
                      keys=zeros(2, dtype=jnp.uint32), forced=zeros(spec.max_forced), forced_len=zeros(),
                      forced_pos=jnp.full((s,), -1, jnp.int32), gamma=zeros())
        return DecodeState(tuple(caches), slots)

    def refresh(self) -> None:
        """Reads the models' parameters as they are now (a trainer updates them in place
        between runs, `nnx.update`), as one flat tuple of arrays: walking NNX states on every
        call cost ~8 ms a decode call on CPU, more than a toy model's decode step. The walk
        is done once; its State holds the models' Variables themselves, so flattening it
        again reads their current values (0.1 ms against the walk's 5-18 ms per run, which
        every `RAST.generate` paid)."""
        self._params, self._treedef = jax.tree.flatten(self._variables)

    def _states(self):
        return tuple(self._params)

    def _unflatten(self, params):
        return jax.tree.unflatten(self._treedef, list(params))

    # ---- admit: prefill + insert ------------------------------------------------------------

    def admit(self, state: DecodeState, tokens: np.ndarray, prefix: np.ndarray, slot_ids: np.ndarray,
              settings: dict[str, np.ndarray]) -> DecodeState:
        """Prefill `tokens` [B, W] (each row's prompt without its last token, right-padded;
        `prefix` [B] real tokens) in every model and insert row b into slot `slot_ids[b]`
        (`max_slots` for a padding row: dropped). settings: Slots fields for the new rows,
        each [B, ...] (token = the prompt's last token)."""
        return self._admit(self._states(), state, tokens, prefix, slot_ids, settings)

    def _prefill_chunk(self, models, tokens, prefix):
        """The caches of `prefill_chunk` prompts ([chunk, ...] per model): a forward of one
        shape whoever is admitted, so a prompt's keys and values do not depend on how many
        arrive with it."""
        chunk, width = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (chunk, width))
        fresh = [KVCache.init(m.cfg, chunk, width, m.dtype) for m in models]
        return [m(tokens, positions, attention_mask=positions < prefix[:, None], cache=c, last_only=True)[1]
                for m, c in zip(models, fresh)]

    def _admit_impl(self, params, state: DecodeState, tokens, prefix, slot_ids, settings):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, self._unflatten(params))]
        batch, width = tokens.shape
        chunk = self.spec.prefill_chunk
        # the loop runs over the chunks up to the last real row only: an 8-row admit of one
        # prompt cost 2.45 ms as a map over every chunk (skipped ones included) against
        # 1.14 ms for a 1-row program (toy family, 32-token prompt, CPU); now it costs the latter
        end = jnp.max(jnp.where(slot_ids < self.spec.max_slots, jnp.arange(batch) + 1, 0))  # past the last real row

        def insert(i, caches):
            at = i * chunk
            rows = jax.lax.dynamic_slice_in_dim(slot_ids, at, chunk)
            fresh = self._prefill_chunk(models, jax.lax.dynamic_slice_in_dim(tokens, at, chunk),
                                        jax.lax.dynamic_slice_in_dim(prefix, at, chunk))
            out = []
            for cache, new in zip(caches, fresh):  # a padding row (slot id max_slots) is dropped
                k = tuple(big.at[rows, :, :, :width].set(x, mode="drop") for big, x in zip(cache.k, new.k))
                v = tuple(big.at[rows, :, :width, :].set(x, mode="drop") for big, x in zip(cache.v, new.v))
                out.append(cache.replace(k=k, v=v, mask=cache.mask.at[rows, :width].set(new.mask, mode="drop")))
            return tuple(out)

        caches = jax.lax.fori_loop(0, (end + chunk - 1) // chunk, insert, tuple(state.caches))
        put = lambda old, new: old.at[slot_ids].set(jnp.asarray(new, old.dtype), mode="drop")  # noqa: E731
        fields = {f.name: getattr(state.slots, f.name) for f in dataclasses.fields(Slots)}
        settings = dict(settings)
        stream = settings.pop("stream")  # the keys are made here: no extra call per admission
        settings["keys"] = stream_keys(stream[:, 0], stream[:, 1], stream[:, 2])
        fields.update({name: put(fields[name], value) for name, value in settings.items()})
        fields.update(length=put(fields["length"], prefix), generated=put(fields["generated"], np.zeros(batch)),
                      active=put(fields["active"], np.ones(batch, bool)),
                      forced_pos=put(fields["forced_pos"], np.full(batch, -1)))
        return DecodeState(caches, Slots(**fields))

    # ---- decode ------------------------------------------------------------------------------

    def decode(self, state: DecodeState, release: np.ndarray, exit_after: int, speculative: bool = False,
               max_steps: int | None = None) -> tuple[DecodeState, StepOutput]:
        """Up to `spec.steps` steps (or `max_steps`, fewer: the same program) for every
        active slot (speculative: rounds of up to γ + 1 tokens). `release` [S]: slots the
        host has ended (a stop string, a cancelled request), deactivated first. The call
        returns after the step in which `exit_after` rows have finished (requests wait)."""
        gamma = self.spec.gamma if speculative else 0
        limit = np.int32(self.spec.steps if max_steps is None else min(max_steps, self.spec.steps))
        return self._decode(self._states(), state, release, np.int32(exit_after), limit, gamma=gamma)

    def _step(self, models, caches, slots: Slots):
        """One token for every slot: feed the pending tokens, sample the next ones."""
        logits, new_caches = [], []
        kv_len = attention_bound(slots, 1, self.ragged)
        for m, cache in zip(models, caches):
            out, cache = m(slots.token[:, None], slots.length[:, None], cache=cache.replace(index=slots.length),
                           last_only=True, kv_len=kv_len, cpu_kernel=self.cpu_kernel)
            logits.append(out[:, -1])
            new_caches.append(cache)
        z = self.combination(logits, slots.generated, self.vocab, lams=slots.lam.T[:self.num_pairs])
        if self.rl_index is not None:
            z = jnp.where(slots.rl_only[:, None], logits[self.rl_index][:, :self.vocab], z)
        rows = jnp.arange(z.shape[0])
        early = slots.generated < slots.min_tokens
        # before min_tokens a stop id is masked, unless a continue text will replace it
        blocked = jnp.where((early & (slots.forced_len == 0))[:, None], -jnp.inf, jnp.inf)
        z_sampled = z.at[rows[:, None], slots.stop_ids].min(blocked, mode="drop")
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(slots.keys), slots.generated)
        tok = sample_rows(keys, z_sampled, slots.temperature, slots.top_k, slots.top_p)
        is_stop = jnp.any(tok[:, None] == slots.stop_ids, axis=-1)
        forcing = slots.forced_pos >= 0
        start = ~forcing & is_stop & early & (slots.forced_len > 0)
        at = jnp.where(forcing, slots.forced_pos, 0)
        tok = jnp.where(forcing | start, slots.forced[rows, at], tok)
        forced_pos = jnp.where(forcing | start, at + 1, -1)
        forced_pos = jnp.where(forced_pos >= slots.forced_len, -1, forced_pos)
        stopped = is_stop & ~(forcing | start)
        log_z = jax.nn.log_softmax(z, axis=-1) if self.spec.logprobs or self.spec.top_logprobs else None
        logp = (jnp.take_along_axis(log_z, tok[:, None], axis=-1)[:, 0]
                if self.spec.logprobs else jnp.zeros(tok.shape, jnp.float32))
        top = jax.lax.top_k(log_z, self.spec.top_logprobs) if self.spec.top_logprobs else None
        ent = row_entropies(z, slots.temperature) if self.spec.entropies else jnp.zeros(tok.shape, jnp.float32)
        act = slots.active
        done = stopped | (slots.generated + 1 >= slots.budget)
        slots = slots.replace(token=jnp.where(act, tok, slots.token), length=slots.length + act,
                              generated=slots.generated + act, active=act & ~done,
                              forced_pos=jnp.where(act, forced_pos, slots.forced_pos))
        return tuple(new_caches), slots, (tok, logp, ent, top, act, act & done, act & stopped)

    def _empty_output(self, gamma: int = 0) -> StepOutput:
        s, k, width = self.spec.max_slots, self.spec.top_logprobs, self.spec.steps * (gamma + 1)
        return StepOutput(tokens=jnp.zeros((s, width), jnp.int32), logprobs=jnp.zeros((s, width), jnp.float32),
                          top_ids=jnp.zeros((s, width, k), jnp.int32),
                          top_logprobs=jnp.zeros((s, width, k), jnp.float32),
                          entropies=jnp.zeros((s, width), jnp.float32), count=jnp.zeros((s,), jnp.int32),
                          finished=jnp.zeros((s,), bool), stopped=jnp.zeros((s,), bool),
                          steps=jnp.zeros((), jnp.int32), drafted=jnp.zeros((s,), jnp.int32),
                          accepted=jnp.zeros((s,), jnp.int32), rounds=jnp.zeros((s,), jnp.int32))

    def _decode_impl(self, params, state: DecodeState, release, exit_after, steps, *, gamma: int):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, self._unflatten(params))]
        slots = state.slots.replace(active=state.slots.active & ~release)
        out = self._empty_output(gamma)
        if gamma:
            return self._speculative_loop(models, state, slots, out, exit_after, steps, gamma)

        def cond(carry):
            _, slots, out = carry
            return (out.steps < steps) & jnp.any(slots.active) & (jnp.sum(out.finished) < exit_after)

        def column(buffer, values, i):  # a slot is active from the call's start until it ends, so
            return jax.lax.dynamic_update_slice_in_dim(buffer, values[:, None], i, axis=1)  # its tokens are a prefix

        def body(carry):
            caches, slots, out = carry
            caches, slots, (tok, logp, ent, top, act, done, stopped) = self._step(models, caches, slots)
            i = out.steps
            out = out.replace(tokens=column(out.tokens, tok, i), count=out.count + act, finished=out.finished | done,
                              stopped=out.stopped | stopped, steps=i + 1)
            if self.spec.logprobs:
                out = out.replace(logprobs=column(out.logprobs, logp, i))
            if self.spec.entropies:
                out = out.replace(entropies=column(out.entropies, ent, i))
            if top is not None:
                out = out.replace(top_logprobs=column(out.top_logprobs, top[0], i),
                                  top_ids=column(out.top_ids, top[1].astype(jnp.int32), i))
            return caches, slots, out

        caches, slots, out = jax.lax.while_loop(cond, body, (state.caches, slots, out))
        return DecodeState(caches, slots), out

    def _speculative_loop(self, models, state, slots, out, exit_after, steps, gamma: int):
        """Rounds of `speculative_round`; a slot's tokens land at its own count (1 to γ + 1
        per round), written where they go (positions beyond a slot's count are dropped)."""
        rows = jnp.arange(self.spec.max_slots)[:, None]

        def cond(carry):
            _, slots, out = carry
            return (out.steps < steps) & jnp.any(slots.active) & (jnp.sum(out.finished) < exit_after)

        def body(carry):
            caches, slots, out = carry
            slots_active = slots.active.astype(jnp.int32)
            caches, slots, r = speculative_round(self, models, caches, slots, gamma)
            j = jnp.arange(gamma + 1)
            at = jnp.where(j < r["count"][:, None], out.count[:, None] + j, out.tokens.shape[1])  # beyond: dropped
            put = lambda buf, v: buf.at[rows, at].set(v, mode="drop")  # noqa: E731
            out = out.replace(tokens=put(out.tokens, r["tokens"]), count=out.count + r["count"],
                              finished=out.finished | r["finished"], stopped=out.stopped | r["stopped"],
                              steps=out.steps + 1, drafted=out.drafted + r["drafted"],
                              accepted=out.accepted + r["accepted"], rounds=out.rounds + slots_active)
            if self.spec.logprobs:
                out = out.replace(logprobs=put(out.logprobs, r["logprobs"]))
            if self.spec.entropies:
                out = out.replace(entropies=put(out.entropies, r["entropies"]))
            if r["top"] is not None:
                out = out.replace(top_logprobs=put(out.top_logprobs, r["top"][0]),
                                  top_ids=put(out.top_ids, r["top"][1].astype(jnp.int32)))
            return caches, slots, out

        caches, slots, out = jax.lax.while_loop(cond, body, (state.caches, slots, out))
        return DecodeState(caches, slots), out
