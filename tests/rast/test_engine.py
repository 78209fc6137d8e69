"""The continuous-batching engine against the plain reference decoder (tests/reference_decoder.py),
and its own guarantees: a row's tokens never depend on its neighbours, its slot or the order
requests arrive in (on one device and on a mesh); nothing compiles after the first call;
min_tokens and continue texts; requests that cannot fit are refused."""

import dataclasses
import random

import jax
import numpy as np
import pytest
from reference_decoder import assert_same_up_to_ties, law, reference_decode

from jaxrast.models.attention_backend import AttentionBackend
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.rast.decoding import RAST, SamplingParams
from jaxrast.rast.ensemble import Pair
from jaxrast.rast.requests import Request, RequestParams
from jaxrast.runtime.mesh import make_mesh

PROMPTS = ["abc de", "hello world 12+3=", "x", "qq rr ss tt uu vv ww xx yy zz 1 2 3 4 5 6 7 8 9",
           "a" * 40, "9+9=", "z y x w", "the cat sat on the mat 7*7="]
def mode_models(trio, mode, lam=0.8):
    """(models for the reference, λs, the RAST's base and pairs) of a decoding mode."""
    base, rl, ref, _ = trio
    return {"rast": ([base, rl, ref], [lam], base, [Pair(rl, ref, lam)]), "base": ([base], [], base, []),
            "rl": ([rl], [], rl, [])}[mode]


def ids_of(tok, prompt):
    return prompt if isinstance(prompt, list) else tok(prompt, add_special_tokens=False)["input_ids"]


def check_greedy(eng, models, lams, tok, prompts, max_new=40, stop_ids=None):
    stop = (tok.eos_token_id,) if stop_ids is None else stop_ids
    out = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new, stop_token_ids=stop),
                       progress=False)
    for prompt, (c,) in zip(prompts, out):
        want, z = reference_decode(models, lams, ids_of(tok, prompt), vocab=len(tok), max_new_tokens=max_new,
                                   stop_ids=stop)
        assert_same_up_to_ties(c.token_ids, want, z)


@pytest.mark.parametrize("mode", ["rast", "base", "rl"])
def test_greedy_engine_equals_the_reference_decoder(trio, mode):
    models, lams, base, pairs = mode_models(trio, mode)
    check_greedy(RAST(base, pairs, tokenizer=trio[3], batch_size=4, max_len=128), models, lams, trio[3], PROMPTS)


def test_requests_with_different_settings_share_decode_calls(trio):
    """Requests of different λ, temperature, top-p, top-k and modes decoded together in one
    engine each equal the reference decoder with their own settings (tokens and log-probs)."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 1.0)], tokenizer=tok, batch_size=4, workers=1, max_len=128)
    settings = [dict(lam=(0.8,), temperature=0.0), dict(lam=(0.3,), temperature=0.0),
                dict(mode="base", temperature=0.0), dict(mode="rl", temperature=0.0),
                dict(lam=(1.2,), temperature=0.7, top_p=0.9, seed=3),
                dict(lam=(0.0,), temperature=1.0, top_k=5, seed=4), dict(lam=(0.5,), temperature=1.3, seed=5),
                dict(mode="base", temperature=0.9, top_p=0.5, seed=6)]
    requests = [Request(ids_of(tok, p), RequestParams(max_tokens=30, stop_ids=(tok.eos_token_id,), row_id=i, **s),
                        tag=i) for i, (p, s) in enumerate(zip(PROMPTS, settings))]
    from jaxrast.rast.token_rules import Record
    done = {r.tag: r for batch in eng.scheduler.run(requests, Record(logprobs=True)) for r in batch}
    assert eng.scheduler.stats.calls < 20  # the eight shared decode calls
    for i, s in enumerate(settings):
        mode = s.get("mode", "rast")
        models, lams, _, _ = mode_models(trio, mode, s.get("lam", (0.0,))[0])
        want, z = reference_decode(models, lams, ids_of(tok, PROMPTS[i]), vocab=len(tok), max_new_tokens=30,
                                   stop_ids=(tok.eos_token_id,), temperature=s["temperature"],
                                   top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0), seed=s.get("seed", 0),
                                   row_id=i)
        if s["temperature"] == 0:
            assert_same_up_to_ties(done[i].token_ids, want, z)
        else:
            assert done[i].token_ids == want, (i, s)
            logp = np.log(law(z, 1.0))[np.arange(len(want)), want]
            np.testing.assert_allclose(done[i].logprobs, logp, atol=1e-4)  # float32 log-softmax over 49 tokens


def test_sampled_rows_agree_with_the_reference_decoder(trio):
    """τ = 1, top-p 0.95: the engine's rows are the reference's float64 draws with the same
    uniforms (a row may differ only where a uniform falls within float32 rounding of a CDF
    boundary)."""
    base, rl, ref, tok = trio
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, n=4, seed=11)
    out = RAST(base, [Pair(rl, ref, 0.7)], tokenizer=tok, batch_size=8, max_len=128).generate(
        PROMPTS, params, progress=False)
    same = [c.token_ids == reference_decode([base, rl, ref], [0.7], ids_of(tok, p), vocab=len(tok),
                                            max_new_tokens=16, stop_ids=(tok.eos_token_id,), temperature=1.0,
                                            top_p=0.95, seed=11, row_id=i, sample=c.sample)[0]
            for i, (p, row) in enumerate(zip(PROMPTS, out)) for c in row]
    assert len(same) == 32 and sum(same) >= 31, same


def test_shuffled_submissions_give_identical_rows(trio):
    """The same requests in two orders, through 3 slots and a prefill batch of 2: every row
    lands in other slots, next to other rows, and comes out the same."""
    base, rl, ref, tok = trio
    prompts = PROMPTS * 3
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=3, workers=1, prefill_batch=2, max_len=128)
    assert_same_in_two_orders(eng.scheduler, len(prompts), lambda i: Request(
        ids_of(tok, prompts[i]),
        RequestParams(max_tokens=8 + 3 * (i % 5), temperature=[0.0, 1.0, 0.8][i % 3], top_p=0.9,
                      lam=(0.2 * (i % 4),), stop_ids=(tok.eos_token_id,), seed=1, row_id=i), tag=i))


def assert_same_in_two_orders(sched, n, request):
    """Requests request(0..n-1) submitted in order and shuffled give the same tokens and the
    same log-prob bits."""
    from jaxrast.rast.token_rules import Record

    def run(order):
        return {r.tag: (r.token_ids, r.logprobs) for batch in sched.run([request(i) for i in order], Record(True))
                for r in batch}

    order = list(range(n))
    first = run(order)
    random.Random(0).shuffle(order)
    assert run(order) == first


LONG = [3, 90, 150, 260, 340, 410, 20, 200]  # prompt lengths: rows cross the cache's 128-key blocks


def long_prompts(tok, seed, lengths=LONG):
    rng = random.Random(seed)
    return [[rng.randrange(3, len(tok)) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("kind", ["cpu_kernel", "xla_ragged", "dense"])
def test_every_attention_backend_decodes_the_reference_rows(trio, kind):
    """Slots of 640 positions next to rows of very different lengths: each backend (the
    C++ kernel reading each query's keys, XLA's ragged blocks, the dense reference) gives the
    reference decoder's greedy RAST rows up to float ties."""
    if kind == "cpu_kernel" and not cpu_kernel_available():
        pytest.skip("no C++ compiler: the CPU kernel is not built")
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4, max_len=640, attention=AttentionBackend(kind))
    assert eng.attention == kind
    check_greedy(eng, [base, rl, ref], [0.8], tok, long_prompts(tok, 3)[:6], max_new=60, stop_ids=())


def test_the_backend_is_chosen_once_for_the_platform_and_cache(trio):
    base, _, _, tok = trio
    want = "cpu_kernel" if cpu_kernel_available() else "dense"
    assert RAST(base, tokenizer=tok, batch_size=2, max_len=64).attention == want
    mesh = make_mesh(fsdp=2, tensor=4)
    assert RAST(base, tokenizer=tok, batch_size=2, max_len=64, mesh=mesh).attention == f"{want} per device of 8"
    with pytest.raises(ValueError, match="choose one of"):
        AttentionBackend("flash")


@pytest.mark.parametrize("gamma", [0, 3])
def test_long_caches_shuffled_submissions_give_identical_rows(trio, gamma):
    """The shuffled-orders guarantee in 640-position slots (rows of 3 to 410 prompt tokens),
    plain and speculative."""
    base, rl, ref, tok = trio
    prompts = long_prompts(tok, 4)
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=3, workers=1, prefill_batch=2, max_len=640,
               speculative=gamma)
    assert_same_in_two_orders(eng.scheduler, len(prompts), lambda i: Request(
        prompts[i], RequestParams(max_tokens=30 + 37 * (i % 5), temperature=[0.0, 1.0][i % 2], top_p=0.9,
                                  lam=(0.8,), seed=2, row_id=i), tag=i))


def test_greedy_engine_on_8_devices_equals_the_reference_decoder(trio, mesh_trio):
    """RAST, base-alone and RL-alone rows in one engine on the mesh each equal the
    one-device reference decoder."""
    base, rl, ref, tok, mesh = mesh_trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, mesh=mesh, batch_size=8, max_len=128)
    modes = ["rast", "base", "rl"]
    requests = [Request(ids_of(tok, p), RequestParams(max_tokens=24, temperature=0.0, mode=modes[i % 3],
                                                      lam=(0.8,) if modes[i % 3] == "rast" else None,
                                                      stop_ids=(tok.eos_token_id,), row_id=i))
                for i, p in enumerate(PROMPTS[:6])]
    assert sum(len(done) for done in eng.scheduler.run(requests)) == len(requests)
    for i, req in enumerate(requests):
        models, lams, _, _ = mode_models(trio, modes[i % 3])  # the reference runs the one-device models
        want, z = reference_decode(models, lams, req.prompt_ids, vocab=len(tok), max_new_tokens=24,
                                   stop_ids=(tok.eos_token_id,))
        assert_same_up_to_ties(req.token_ids, want, z)


def test_rows_on_8_devices_do_not_depend_on_their_neighbours(mesh_trio):
    """On the mesh, each device reads its own rows' keys: a row's tokens and log-prob bits are
    the same whatever rows of whatever lengths share its call."""
    base, rl, ref, tok, mesh = mesh_trio
    prompts = long_prompts(tok, 6, [3, 150, 340, 20, 90, 260, 410, 5, 200, 60])
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, mesh=mesh, batch_size=8, max_len=576)
    assert_same_in_two_orders(eng.scheduler, len(prompts), lambda i: Request(
        prompts[i], RequestParams(max_tokens=10 + 29 * (i % 4), temperature=[0.0, 1.0][i % 2], lam=(0.8,), seed=3,
                                  row_id=i), tag=i))


def test_mesh_of_8_devices_samples_the_one_device_rows(trio, mesh_trio):
    base, rl, ref, tok = trio
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=24, seed=2)
    outs = [[[c.token_ids for c in r] for r in RAST(b, [Pair(r1, r2, 0.8)], tokenizer=tok, mesh=m, batch_size=8,
                                                    max_len=128).generate(PROMPTS, params, progress=False)]
            for b, r1, r2, m in ((base, rl, ref, None), (*mesh_trio[:3], mesh_trio[4]))]
    assert outs[0] == outs[1]


def test_toy_family_greedy_engine_equals_the_reference_decoder():
    from jaxrast.toy.demo import load_family
    from jaxrast.toy.task import ChainTask

    fam = load_family()
    (s_base, tok), (s_rl, _), (m_base, _) = fam["s_base"], fam["s_rl"], fam["m_base"]
    prompts = [r["question"] for r in ChainTask().rows(6, seed=5)]
    eng = RAST(m_base, [Pair(s_rl, s_base, 1.0)], tokenizer=tok, batch_size=8)
    check_greedy(eng, [m_base, s_rl, s_base], [1.0], tok, prompts, max_new=64)


def test_prompts_of_any_length_compile_nothing_after_the_first_call(trio):
    """RAST fixes its engine at construction: after the first call and `warm_up` (every
    slot-count bucket), prompts of other lengths and row counts (and 60 mixed requests, whose
    live rows rise and fall) compile nothing; a prompt beyond max_len is refused, naming it."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4, max_len=128)
    params = SamplingParams(temperature=0.7, max_new_tokens=12, logprobs=False)
    eng.generate([[5] * 3], params, progress=False)
    eng.warm_up(params)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _d, **kw: compiles.append(event) if "backend_compile" in event else None)
    for n in (17, 50, 100):
        eng.generate([[7] * n, [9] * (n // 2 + 1)], params, progress=False)
    rng = random.Random(1)
    requests = [Request([rng.randrange(3, len(tok)) for _ in range(rng.choice([1, 5, 16, 17, 30, 40, 60]))],
                        RequestParams(max_tokens=rng.randrange(1, 40), temperature=rng.choice([0, 0.7, 1.0]),
                                      top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 3]),
                                      min_tokens=rng.choice([0, 2]), lam=(rng.uniform(0, 2),),
                                      mode=rng.choice(["rast", "base", "rl"]), seed=i, row_id=i,
                                      stop_ids=(tok.eos_token_id,)))
                for i in range(60)]
    assert sum(len(b) for b in eng.scheduler.run(requests)) == 60
    assert compiles == []
    with pytest.raises(ValueError, match="max_len = 128"):
        eng.generate([[5] * 120], params, progress=False)


def test_min_tokens_and_continue_text(trio):
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4, max_len=128)
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
    sched = RAST(base, tokenizer=tok, batch_size=2, max_len=64).scheduler
    with pytest.raises(ValueError, match="beyond max_len = 64"):
        list(sched.run([Request([5] * 30, RequestParams(max_tokens=10)),
                        Request([5] * 40, RequestParams(max_tokens=30))]))
    assert not sched.groups[0].slots and not sched.queue
    with pytest.raises(ValueError, match="one λ per pair"):
        sched.check(Request([5], RequestParams(max_tokens=3, lam=(1.0, 2.0))))
