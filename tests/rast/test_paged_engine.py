"""The engine on a paged KV cache (`page_size`, `pages`): greedy rows equal the dense layout's
token for token (up to float ties) in every mode, with n > 1, speculative rounds and a pool
that holds fewer rows than there are slots (requests wait for pages, never fail); sampled
rows are bit-identical whatever the submission order; page accounting returns every page."""

import dataclasses
import random

import jax
import pytest
from reference_decoder import assert_same_up_to_ties, reference_decode
from test_engine import PROMPTS, assert_same_in_two_orders, ids_of, long_prompts, mode_models

from jaxrast.rast.admission import place
from jaxrast.rast.decoding import RAST, SamplingParams
from jaxrast.rast.ensemble import Pair
from jaxrast.rast.pages import PagePool
from jaxrast.rast.requests import Request, RequestParams


def greedy(eng, tok, prompts, max_new=40, n=1):
    out = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new, n=n,
                                               stop_token_ids=(tok.eos_token_id,)), progress=False)
    return [[c.token_ids for c in row] for row in out]


def test_rows_wait_grow_and_resume_to_the_reference_tokens_in_every_mode(trio):
    """8-position pages, 4 steps a call and a pool of 24 pages (192 positions) under 8 slots:
    rows of every mode (RAST, the base alone, the RL model alone) take pages as they grow,
    requests wait while pages are short, the youngest rows give theirs back and resume
    later from their tokens so far; every row equals the reference decoder, and every page
    comes back."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=8, max_len=128, page_size=8, pages=24,
               steps_per_call=4, workers=1)
    modes = ["rast", "base", "rl"]
    requests = [Request(ids_of(tok, p), RequestParams(max_tokens=48, temperature=0.0, mode=modes[i % 3],
                                                      lam=(0.8,) if modes[i % 3] == "rast" else None, row_id=i))
                for i, p in enumerate(PROMPTS)]
    assert sum(len(done) for done in eng.scheduler.run(requests)) == len(PROMPTS)
    for i, req in enumerate(requests):
        models, lams, _, _ = mode_models(trio, modes[i % 3])
        want, z = reference_decode(models, lams, req.prompt_ids, vocab=len(tok), max_new_tokens=48, stop_ids=())
        assert_same_up_to_ties(req.token_ids, want, z)
    stats = eng.scheduler.stats
    assert stats.preemptions > 0 and any(r.preemptions for r in requests)
    assert stats.pages_used == 0 and 0 < stats.peak_pages <= 24 and stats.peak_rows < 8


def test_paged_speculative_and_n_samples_equal_the_dense_layout(trio):
    base, rl, ref, tok = trio
    pairs = [Pair(rl, ref, 0.8)]
    dense = RAST(base, pairs, tokenizer=tok, batch_size=8, max_len=128, speculative=3)
    paged = RAST(base, pairs, tokenizer=tok, batch_size=8, max_len=128, speculative=3, page_size=8, pages=40)
    prompts = PROMPTS[:4]
    want, got = greedy(dense, tok, prompts, 30, n=3), greedy(paged, tok, prompts, 30, n=3)
    assert got == want  # one backend, one program shape per row: the same bits
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=30, n=3, seed=11)
    a = paged.generate(prompts, sampled, progress=False)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    b = paged.generate([prompts[i] for i in order], sampled, progress=False, row_ids=order)
    for i, row in zip(order, b):
        assert [c.token_ids for c in row] == [c.token_ids for c in a[i]]


def test_a_pool_that_cannot_hold_one_row_is_refused_naming_the_fix(trio):
    base, _, _, tok = trio
    with pytest.raises(ValueError, match="hold less than one row of 128 positions.*more KV memory"):
        RAST(base, tokenizer=tok, batch_size=2, max_len=128, page_size=16, pages=2)


def test_page_pool_takes_frees_and_moves_pages():
    pool = PagePool(num_pages=6, page_size=4, per_slot=3, slots=4, groups=2)
    assert pool.grow(0, 9) and list(pool.table[0]) == [0, 1, 2]
    assert not pool.grow(1, 2)  # slot 1 shares device block 0, now empty: nothing taken
    assert pool.held[1] == 0 and pool.free_pages(1) == 0
    assert pool.grow(2, 5) and list(pool.table[2, :2]) == [3, 4]
    with pytest.raises(ValueError, match="different devices"):
        pool.move(2, 0)
    pool.move(0, 1)
    assert list(pool.table[1]) == [0, 1, 2] and list(pool.table[0]) == [6, 6, 6]
    pool.release(1)
    assert pool.used == 2 and pool.peak == 5 and pool.free_pages(0) == 3


def test_paged_rows_on_8_devices_do_not_depend_on_their_neighbours(mesh_trio):
    """On the mesh each device holds its slots' pages (the page pool split like the slots)
    and reads only its own rows' pages: tokens and log-prob bits do not depend on the rows
    beside them, and greedy rows equal the one-device dense layout's."""
    base, rl, ref, tok, mesh = mesh_trio
    prompts = long_prompts(tok, 6, [3, 150, 40, 20, 90, 130, 110, 5, 100, 60])
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, mesh=mesh, batch_size=8, max_len=256, page_size=32,
               pages=48)
    assert_same_in_two_orders(eng.scheduler, len(prompts), lambda i: Request(
        prompts[i], RequestParams(max_tokens=10 + 29 * (i % 4), temperature=[0.0, 1.0][i % 2], lam=(0.8,), seed=3,
                                  row_id=i), tag=i))


def test_samples_of_a_prompt_share_its_pages_and_its_prefill(trio):
    """n = 8 samples of a 200-token prompt in 16-position pages: the prompt is prefilled
    once, and the samples' tokens are the dense layout's bit for bit."""
    base, rl, ref, tok = trio
    prompt = long_prompts(tok, 3, [200])[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=30, n=8, seed=5, stop_token_ids=())
    paged = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=8, max_len=256, page_size=16, workers=1)
    got = paged.generate([prompt], params, progress=False)[0]
    stats = paged.scheduler.stats
    assert (stats.prefilled, stats.shared) == (1, 7) and stats.pages_used == 0
    dense = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=8, max_len=256, workers=1)
    want = dense.generate([prompt], params, progress=False)[0]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_n_samples_of_a_512_token_prompt_hold_at_most_1_25x_its_pages():
    pool = PagePool(num_pages=400, page_size=16, per_slot=64, slots=8)
    prompt = list(range(1, 513))
    requests = [Request(prompt, RequestParams(max_tokens=100, sample=i)) for i in range(8)]
    placed = place(requests, list(range(8)), pool, chunk=8, positions=lambda r: len(r.prompt_ids) + 1,
                   may_share=lambda r: True)
    assert [p.lead for p in placed] == [None] + [0] * 7
    prompt_pages = -(-511 // 16)  # the positions prefilled: all but the pending last token
    held = {int(p) for s in range(8) for p in pool.table[s, :prompt_pages]}
    assert len(held) == 31 + 8 <= 1.25 * prompt_pages


def test_pages_taken_shared_freed_and_preempted_compile_nothing_after_warm_up(trio):
    """After warm-up, 60 requests of mixed lengths, samples per prompt and settings through
    a pool that holds about 5 of the 8 slots' rows (they wait, share prompt pages, get
    preempted and resume) compile nothing, and every one finishes."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=8, max_len=128, page_size=8, pages=40,
               steps_per_call=8, workers=1)
    params = SamplingParams(temperature=0.7, max_new_tokens=12, logprobs=False)
    eng.generate([[5] * 20], dataclasses.replace(params, n=2), progress=False)
    eng.warm_up(params)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _d, **kw: compiles.append(event) if "backend_compile" in event else None)
    rng = random.Random(2)
    requests = []
    for i in range(20):
        prompt = [rng.randrange(3, len(tok)) for _ in range(rng.choice([1, 9, 17, 30, 45]))]
        settings = dict(max_tokens=rng.randrange(8, 60), temperature=rng.choice([0, 0.7, 1.0]),
                        top_p=rng.choice([1.0, 0.9]), lam=(rng.uniform(0, 2),), mode=rng.choice(["rast", "base", "rl"]),
                        seed=i, row_id=i, stop_ids=())
        requests += [Request(prompt, RequestParams(sample=s, **settings)) for s in range(rng.choice([1, 3, 5]))]
    assert sum(len(b) for b in eng.scheduler.run(requests)) == len(requests) >= 60
    assert all(len(r.token_ids) == r.params.max_tokens for r in requests)
    stats = eng.scheduler.stats
    assert compiles == [] and stats.preemptions > 0 and stats.shared > 0 and stats.pages_used == 0


def test_admission_takes_a_slot_on_a_device_with_pages():
    """Two device blocks of 4 pages (slots 0-1 on one, 2-3 on the other): a request that
    the first block cannot hold goes to the second block's slot."""
    pool = PagePool(num_pages=8, page_size=4, per_slot=4, slots=4, groups=2)
    assert pool.grow(0, 12)  # block 0: 1 page left
    req = Request(list(range(1, 9)), RequestParams(max_tokens=4))
    placed = place([req], [1, 2, 3], pool, chunk=4, positions=lambda r: 9, may_share=lambda r: False)
    assert [p.slot for p in placed] == [2] and pool.held[2] == 3
