"""The continuous-batching engine against the static path, and its own guarantees: a row's
tokens never depend on its neighbours, its slot or the order requests arrive in; no
recompilation after warm-up; min_tokens and continue texts; requests that cannot fit."""

import dataclasses
import random

import jax
import numpy as np
import pytest

from jaxrast.analysis.teacher_forcing import TeacherForcer
from jaxrast.analysis.trajectories import Trajectory
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.models.hf import load_model
from jaxrast.rast.decoding import RAST, SamplingParams
from jaxrast.rast.ensemble import Pair
from jaxrast.rast.requests import Request, RequestParams
from jaxrast.runtime.mesh import make_mesh

SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64)
PROMPTS = ["abc de", "hello world 12+3=", "x", "qq rr ss tt uu vv ww xx yy zz 1 2 3 4 5 6 7 8 9",
           "a" * 40, "9+9=", "z y x w", "the cat sat on the mat 7*7="]


@pytest.fixture(scope="module")
def trio(ckpt_dir):
    """(base, rl, ref, tokenizer) with a padded vocabulary (96 rows, 49 tokens)."""
    base, _, tok = load_model(ckpt_dir("qwen2", seed=1, vocab=96, init_range=0.1))
    rl, _, _ = load_model(ckpt_dir("qwen2", seed=2, vocab=96, **SMALL))
    ref, _, _ = load_model(ckpt_dir("qwen2", seed=3, vocab=96, **SMALL))
    return base, rl, ref, tok


def combined_logits(models, lams, tok, prompt_ids, token_ids):
    """z at every step of a trajectory, teacher-forced: [steps, vocab]."""
    forcer = TeacherForcer(models, vocab=len(tok))
    pairs = [Pair(models[1 + 2 * i], models[2 + 2 * i], lam) for i, lam in enumerate(lams)]
    comb = forcer.combination(models[0], pairs)
    stats = lambda logits, targets, steps: {"z": comb(logits, steps, len(tok))}  # noqa: E731
    return forcer.run(stats, [Trajectory(prompt_ids, token_ids)], progress=False)[0]["z"]


def assert_same_up_to_ties(a, b, z):
    """Two greedy paths are equal, or part where the two best combined logits of the path
    `a` are within 1e-4 (a float tie either program may break its own way)."""
    for step, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top2 = np.sort(z[step])[-2:]
            assert top2[1] - top2[0] < 1e-4, (step, a, b, top2)
            return
    assert len(a) == len(b) or a[:len(b)] == b or b[:len(a)] == a


def _paths(eng, prompts, params):
    return [[c.token_ids for c in r] for r in eng.generate(prompts, params, progress=False)]


@pytest.mark.parametrize("mode", ["rast", "base", "rl"])
def test_greedy_engine_equals_static_path(trio, mode):
    base, rl, ref, tok = trio
    models, lams = {"rast": ([base, rl, ref], [0.8]), "base": ([base], []), "rl": ([rl], [])}[mode]
    pairs = [Pair(rl, ref, 0.8)] if mode == "rast" else []
    params = SamplingParams(temperature=0, max_new_tokens=40)
    runs = [_paths(RAST(models[0], pairs, tokenizer=tok, batch_size=4, scheduler=s), PROMPTS, params)
            for s in ("static", "continuous")]
    for prompt, (a,), (b,) in zip(PROMPTS, *runs):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert_same_up_to_ties(a, b, np.asarray(combined_logits(models, lams, tok, ids, a)))


def test_requests_with_different_settings_share_decode_calls(trio):
    """Requests of different λ, temperature, top-p, top-k and modes decoded together in one
    engine equal each decoded alone by the static path with its own settings."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 1.0)], tokenizer=tok, batch_size=4, workers=1)
    sched = eng.engine_for(128, logprobs=True)
    settings = [dict(lam=(0.8,), temperature=0.0), dict(lam=(0.3,), temperature=0.0),
                dict(mode="base", temperature=0.0), dict(mode="rl", temperature=0.0),
                dict(lam=(1.2,), temperature=0.7, top_p=0.9, seed=3),
                dict(lam=(0.0,), temperature=1.0, top_k=5, seed=4), dict(lam=(0.5,), temperature=1.3, seed=5),
                dict(mode="base", temperature=0.9, top_p=0.5, seed=6)]
    requests = [Request(tok(p, add_special_tokens=False)["input_ids"],
                        RequestParams(max_tokens=30, stop_ids=(tok.eos_token_id,), row_id=i, **s), tag=i)
                for i, (p, s) in enumerate(zip(PROMPTS, settings))]
    done = {r.tag: r for batch in sched.run(requests) for r in batch}
    assert sched.stats.calls < 20  # the eight shared decode calls
    for i, s in enumerate(settings):
        lam = s.get("lam", (0.0,))[0]
        model = rl if s.get("mode") == "rl" else base
        pairs = [Pair(rl, ref, lam)] if s.get("mode") is None else []
        static = RAST(model, pairs, tokenizer=tok, batch_size=1, scheduler="static")
        want = static.generate([PROMPTS[i]], SamplingParams(max_new_tokens=30, temperature=s["temperature"],
                                                            top_p=s.get("top_p", 1.0), top_k=s.get("top_k", 0),
                                                            seed=s.get("seed", 0)), row_ids=[i])[0][0]
        if s["temperature"] == 0:
            ids = tok(PROMPTS[i], add_special_tokens=False)["input_ids"]
            ms, ls = ([model, rl, ref], [lam]) if pairs else ([model], [])
            assert_same_up_to_ties(want.token_ids, done[i].token_ids,
                                   np.asarray(combined_logits(ms, ls, tok, ids, want.token_ids)))
        else:
            assert done[i].token_ids == want.token_ids, (i, s)
            np.testing.assert_allclose(done[i].logprobs, want.logprobs, atol=2e-4)


def test_sampled_rows_agree_with_the_static_path(trio):
    base, rl, ref, tok = trio
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, n=25, seed=11)
    runs = [_paths(RAST(base, [Pair(rl, ref, 0.7)], tokenizer=tok, batch_size=16, scheduler=s), PROMPTS, params)
            for s in ("static", "continuous")]
    rows = [(a == b) for ra, rb in zip(*runs) for a, b in zip(ra, rb)]
    assert len(rows) == 200 and sum(rows) / len(rows) >= 0.995, sum(rows)


def test_shuffled_submissions_give_identical_rows(trio):
    """The same requests in two orders, through 3 slots and a prefill batch of 2: every row
    lands in other slots, next to other rows, and comes out the same."""
    base, rl, ref, tok = trio
    prompts = PROMPTS * 3
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=3, workers=1, prefill_batch=2)
    assert_same_in_two_orders(eng.engine_for(128), len(prompts), lambda i: Request(
        tok(prompts[i], add_special_tokens=False)["input_ids"],
        RequestParams(max_tokens=8 + 3 * (i % 5), temperature=[0.0, 1.0, 0.8][i % 3], top_p=0.9,
                      lam=(0.2 * (i % 4),), stop_ids=(tok.eos_token_id,), seed=1, row_id=i), tag=i))


def assert_same_in_two_orders(sched, n, request):
    """Requests request(0..n-1) submitted in order and shuffled give the same tokens."""
    def run(order):
        return {r.tag: r.token_ids for batch in sched.run([request(i) for i in order]) for r in batch}

    order = list(range(n))
    first = run(order)
    random.Random(0).shuffle(order)
    assert run(order) == first


LONG = [3, 90, 150, 260, 340, 410, 20, 200]  # prompt lengths: rows cross the cache's 128-key blocks


def test_long_caches_greedy_engine_equals_static_path(trio):
    """Slots of 640 positions, where each slot's attention reads only its own key blocks
    (`ragged_attention`), next to rows of very different lengths: greedy RAST equals the
    static path's."""
    base, rl, ref, tok = trio
    rng = random.Random(3)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(n)] for n in LONG]
    params = SamplingParams(temperature=0, max_new_tokens=110)
    runs = [_paths(RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4, scheduler=s), prompts, params)
            for s in ("static", "continuous")]
    for ids, (a,), (b,) in zip(prompts, *runs):
        assert_same_up_to_ties(a, b, np.asarray(combined_logits([base, rl, ref], [0.8], tok, ids, a)))


def test_cpu_kernel_and_xla_attention_decode_the_same_rows(trio):
    """The engine's two attention paths on one device, the C++ kernel (each row its own
    keys) and XLA's ragged blocks, give the same greedy RAST rows up to float ties."""
    base, rl, ref, tok = trio
    rng = random.Random(5)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(n)] for n in LONG]
    runs = []
    for kernel in (True, False):
        eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4, workers=1)
        sched = eng.engine_for(640)
        for group in sched.groups:
            group.engine.cpu_kernel = kernel and group.engine.cpu_kernel
        assert group.engine.cpu_kernel == (kernel and cpu_kernel_available())
        requests = [Request(p, RequestParams(max_tokens=60, temperature=0.0, lam=(0.8,), row_id=i), tag=i)
                    for i, p in enumerate(prompts)]
        runs.append({r.tag: r.token_ids for batch in sched.run(requests) for r in batch})
    for i, ids in enumerate(prompts):
        a, b = runs[0][i], runs[1][i]
        assert_same_up_to_ties(a, b, np.asarray(combined_logits([base, rl, ref], [0.8], tok, ids, a)))


@pytest.mark.parametrize("gamma", [0, 3])
def test_long_caches_shuffled_submissions_give_identical_rows(trio, gamma):
    """The shuffled-orders guarantee where attention is ragged (640-position slots, rows
    of 3 to 410 prompt tokens), plain and speculative."""
    base, rl, ref, tok = trio
    rng = random.Random(4)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(n)] for n in LONG * 2]
    sched = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=3, workers=1, prefill_batch=2,
                 speculative=gamma).engine_for(640)
    assert_same_in_two_orders(sched, len(prompts), lambda i: Request(
        prompts[i], RequestParams(max_tokens=30 + 37 * (i % 5), temperature=[0.0, 1.0][i % 2], top_p=0.9,
                                  lam=(0.8,), seed=2, row_id=i), tag=i))


def test_mesh_of_8_devices_equals_one_device(ckpt_dir):
    paths = [ckpt_dir("qwen2", seed=1, init_range=0.1), ckpt_dir("qwen2", seed=2, **SMALL),
             ckpt_dir("qwen2", seed=3, **SMALL)]
    outs = []
    for mesh in (None, make_mesh(fsdp=2, tensor=4)):
        (base, _, tok), (rl, _, _), (ref, _, _) = (load_model(p, mesh=mesh) for p in paths)
        eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, mesh=mesh, batch_size=8)
        outs.append(_paths(eng, PROMPTS, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=30, seed=2)))
    assert outs[0] == outs[1]


def test_toy_family_greedy_engine_equals_static_path():
    from jaxrast.toy.demo import load_family
    from jaxrast.toy.task import ChainTask

    fam = load_family()
    (s_base, tok), (s_rl, _), (m_base, _) = fam["s_base"], fam["s_rl"], fam["m_base"]
    prompts = [r["question"] for r in ChainTask().rows(12, seed=5)]
    params = SamplingParams(temperature=0, max_new_tokens=64)
    runs = [_paths(RAST(m_base, [Pair(s_rl, s_base, 1.0)], tokenizer=tok, batch_size=8, scheduler=s), prompts, params)
            for s in ("static", "continuous")]
    for prompt, (a,), (b,) in zip(prompts, *runs):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert_same_up_to_ties(a, b, np.asarray(combined_logits([m_base, s_rl, s_base], [1.0], tok, ids, a)))


def test_no_compilation_after_warm_up(trio):
    """After one request per prompt bucket, 200 requests of mixed lengths and settings
    compile nothing."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4)
    sched = eng.engine_for(128)
    rng = random.Random(1)

    def requests(n):
        out = []
        for i in range(n):
            ids = [rng.randrange(3, len(tok)) for _ in range(rng.choice([1, 5, 16, 17, 30, 40, 60]))]
            out.append(Request(ids, RequestParams(max_tokens=rng.randrange(1, 40),
                                                  temperature=rng.choice([0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                                                  top_k=rng.choice([0, 3]),
                                                  min_tokens=rng.choice([0, 2]), lam=(rng.uniform(0, 2),),
                                                  mode=rng.choice(["rast", "base", "rl"]), seed=i, row_id=i,
                                                  stop_ids=(tok.eos_token_id,))))
        return out

    warm = [Request([5] * n, RequestParams(max_tokens=4, row_id=n)) for n in (1, 17, 33, 65)]
    for _ in sched.run(warm):
        pass
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _d, **kw: compiles.append(event) if "backend_compile" in event else None)
    done = sum(len(b) for b in sched.run(requests(200)))
    assert done == 200 and compiles == []


def test_min_tokens_and_continue_text(trio):
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4)
    free = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=()), progress=False)
    # a stop id that the free greedy paths emit early: each row would end at its first occurrence
    stop = next(t for r in free for t in r[0].token_ids[2:6])
    params = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=(stop,))
    plain = eng.generate(PROMPTS, params, progress=False)
    held = eng.generate(PROMPTS, dataclasses.replace(params, min_tokens=12), progress=False)
    cont = eng.generate(PROMPTS, dataclasses.replace(params, min_tokens=12, continue_text="wait"), progress=False)
    wait = tok("wait", add_special_tokens=False)["input_ids"]
    assert any(p[0].finish_reason == "stop" and p[0].num_tokens < 12 for p in plain)
    for p, h, c in zip(plain, held, cont):
        p, h, c = p[0], h[0], c[0]
        assert stop not in h.token_ids[:12] and (h.num_tokens >= 13 or h.finish_reason == "length")
        if p.finish_reason == "stop" and p.num_tokens <= 12:
            # the stop is replaced by the continue text, which is then followed
            first = p.num_tokens - 1
            assert c.token_ids[:first] == p.token_ids[:first] and c.token_ids[first:first + len(wait)] == wait
        assert stop not in c.token_ids[:12] or c.token_ids.index(stop) >= 12


def test_a_request_beyond_the_slot_length_is_refused_before_taking_a_slot(trio):
    base, _, _, tok = trio
    eng = RAST(base, tokenizer=tok, batch_size=2)
    sched = eng.engine_for(64)
    with pytest.raises(ValueError, match="beyond the slot length 64"):
        list(sched.run([Request([5] * 30, RequestParams(max_tokens=10)),
                        Request([5] * 40, RequestParams(max_tokens=30))]))
    assert not sched.groups[0].slots and not sched.queue
    with pytest.raises(ValueError, match="one λ per pair"):
        sched.check(Request([5], RequestParams(max_tokens=3, lam=(1.0, 2.0))))
