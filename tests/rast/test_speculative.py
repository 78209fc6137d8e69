"""Speculative RAST: greedy outputs equal plain RAST's, sampled outputs follow RAST's target
law exactly (chi-square on the next two tokens), and rounds stop where rows must stop."""

import jax
import jax.numpy as jnp
import jax.scipy.stats
import numpy as np
import pytest
from hf_fixtures import SMALL
from reference_decoder import assert_same_up_to_ties, combine, law, next_logits
from test_engine import PROMPTS

from jaxrast.models.hf import load_model
from jaxrast.rast.combine import combine_logits
from jaxrast.rast.decoding import RAST, SamplingParams
from jaxrast.rast.ensemble import Pair
from jaxrast.rast.requests import Request, RequestParams


@pytest.fixture(scope="module")
def models(ckpt_dir):
    """A base, two different small pairs, and the tokenizer (padded vocabulary)."""
    base, _, tok = load_model(ckpt_dir("qwen2", seed=1, vocab=96, init_range=0.1))
    small = [load_model(ckpt_dir("qwen2", seed=s, vocab=96, **SMALL))[0] for s in (2, 3, 4, 5)]
    return base, small, tok


def combined_logits(models_, lams, tok, prompt_ids, token_ids):
    """z before each token of a path, from full forwards (the reference decoder's): [steps, vocab]."""
    return np.stack([combine([next_logits(m, list(prompt_ids) + list(token_ids[:i])) for m in models_], lams,
                             len(tok)) for i in range(len(token_ids))])


def _paths(eng, params):
    return [c.token_ids for r in eng.generate(PROMPTS, params, progress=False) for c in r]


@pytest.mark.parametrize("setup", ["rast", "base_with_pair_draft", "two_pairs"])
def test_greedy_speculative_equals_plain_rast(models, setup):
    base, (rl, ref, rl2, ref2), tok = models
    pairs = {"rast": [Pair(rl, ref, 0.8)], "base_with_pair_draft": [Pair(rl, ref, 0.0)],
             "two_pairs": [Pair(rl, ref, 0.6), Pair(rl2, ref2, 0.4)]}[setup]
    params = SamplingParams(temperature=0, max_new_tokens=40)
    plain = _paths(RAST(base, pairs, tokenizer=tok, batch_size=4, max_len=128), params)
    ms = [base, *(m for p in pairs for m in (p.rl, p.ref))]
    # one engine drafting up to 5 tokens; each request takes its own γ (1, 3 or 5) per round
    sched = RAST(base, pairs, tokenizer=tok, batch_size=4, speculative=5, max_len=128).scheduler
    for gamma in (1, 3, 5):
        requests = [Request(tok(p, add_special_tokens=False)["input_ids"],
                            RequestParams(max_tokens=40, temperature=0.0, stop_ids=(tok.eos_token_id,), gamma=gamma,
                                          lam=tuple(p.lam for p in pairs)), tag=i) for i, p in enumerate(PROMPTS)]
        drafted = sched.stats.drafted
        assert sum(len(b) for b in sched.run(requests)) == len(PROMPTS)
        for prompt, a, r in zip(PROMPTS, plain, requests):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            z = np.asarray(combined_logits(ms, [p.lam for p in pairs], tok, ids, a)) if a != r.token_ids else None
            assert_same_up_to_ties(a, r.token_ids, z)
        assert sched.stats.drafted > drafted
    assert 1.0 <= sched.stats.accepted_length <= 6


def _target(models_, lams, tok, prefix, temperature, top_p):
    """The processed RAST law of the next token after `prefix` (token ids): [vocab]."""
    seq = jnp.asarray([prefix])
    logits = [m(seq)[0][:, -1] for m in models_]
    z = combine_logits(logits[0], logits[1::2], logits[2::2], lams, len(tok))
    return law(np.asarray(z, np.float64)[0], temperature, 0, top_p)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_speculative_follows_the_target_law(models, temperature, top_p):
    """At a fixed prompt, the joint law of the next two tokens under speculative decoding
    (γ = 3, draws of many rows) is RAST's: p(x1) p(x2 | x1), chi-square over the cells with
    enough expected mass."""
    base, (rl, ref, _, _), tok = models
    lam, draws, prompt = 0.9, 4000, "hello world 12+3="
    # pages of 8: each admit call prefills the prompt once for its 32 samples; one program for 500 rows
    eng = RAST(base, [Pair(rl, ref, lam)], tokenizer=tok, batch_size=500, speculative=3, max_len=64, page_size=8,
               buckets=False)
    res = eng.generate([prompt], SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=2, n=draws,
                                                seed=11, stop_token_ids=()), progress=False)
    pairs = [tuple(c.token_ids) for c in res[0]]
    assert all(len(p) == 2 for p in pairs)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ms = [base, rl, ref]
    p1 = _target(ms, [lam], tok, ids, temperature, top_p)
    expected = {}
    for x1 in np.flatnonzero(p1 > 0):
        p2 = _target(ms, [lam], tok, ids + [int(x1)], temperature, top_p)
        for x2 in np.flatnonzero(p2 > 0):
            expected[(int(x1), int(x2))] = draws * p1[x1] * p2[x2]
    counts: dict = {}
    for p in pairs:
        assert p in expected, f"{p} is outside the target's support"
        counts[p] = counts.get(p, 0) + 1
    big = [k for k, e in expected.items() if e >= 5]
    obs = [counts.get(k, 0) for k in big] + [draws - sum(counts.get(k, 0) for k in big)]
    exp = [expected[k] for k in big] + [draws - sum(expected[k] for k in big)]
    chi2 = float(sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0))
    p_value = float(jax.scipy.stats.chi2.sf(chi2, len(obs) - 1))
    assert len(big) >= 10 and p_value > 1e-3, (chi2, len(obs), p_value)


def test_rejected_rounds_still_advance_and_rows_stop_inside_a_round(models):
    base, (rl, ref, _, _), tok = models
    # an unrelated draft (λ = 0: the target is the base) is rejected at almost every first token
    sched = RAST(base, [Pair(rl, ref, 0.0)], tokenizer=tok, batch_size=4, speculative=4, steps_per_call=4,
                 max_len=128).scheduler
    free = [Request(tok(p, add_special_tokens=False)["input_ids"], RequestParams(max_tokens=30, temperature=0.0,
                                                                                   row_id=i)) for i, p in
            enumerate(PROMPTS[:4])]
    done = {id(r): r for batch in sched.run(free) for r in batch}
    assert all(len(r.token_ids) == 30 for r in free) and len(done) == 4
    stats = sched.stats
    assert stats.accepted_length >= 1.0 and stats.acceptance < 0.5  # one token per round at least
    # budgets and stop ids that fall inside a round end the row exactly there
    stop = free[0].token_ids[5]
    first = free[0].token_ids.index(stop)
    cut = [Request(list(r.prompt_ids), RequestParams(max_tokens=b, temperature=0.0, stop_ids=(stop,), row_id=i))
           for i, (r, b) in enumerate(zip(free, (30, 7, 13, 3)))]
    assert sum(len(batch) for batch in sched.run(cut)) == 4
    assert cut[0].token_ids == free[0].token_ids[:first + 1] and cut[0].finish_reason == "stop"
    for r, f, b in zip(cut[1:], free[1:], (7, 13, 3)):
        want = f.token_ids[:b]
        if stop in want:
            want = want[:want.index(stop) + 1]
        assert r.token_ids == want and r.finish_reason == ("stop" if stop in f.token_ids[:b] else "length")


def test_speculative_needs_a_pair_and_room_for_the_drafts(models):
    base, (rl, ref, _, _), tok = models
    with pytest.raises(ValueError, match="needs a pair"):
        RAST(base, tokenizer=tok, speculative=2)
    sched = RAST(base, [Pair(rl, ref, 1.0)], tokenizer=tok, batch_size=2, speculative=4, max_len=64).scheduler
    with pytest.raises(ValueError, match="plus γ = 4 draft positions"):
        sched.check(Request([5] * 30, RequestParams(max_tokens=32)))


def test_toy_family_greedy_speculative_equals_plain():
    from jaxrast.toy.demo import load_family
    from jaxrast.toy.task import ChainTask

    fam = load_family()
    (s_base, tok), (s_rl, _), (m_base, _) = fam["s_base"], fam["s_rl"], fam["m_base"]
    prompts = [r["question"] for r in ChainTask().rows(16, seed=9)]
    params = SamplingParams(temperature=0, max_new_tokens=64)
    pairs = [Pair(s_rl, s_base, 1.0)]
    plain = [c.token_ids for r in RAST(m_base, pairs, tokenizer=tok, batch_size=8).generate(prompts, params) for c in r]
    spec = RAST(m_base, pairs, tokenizer=tok, batch_size=8, speculative=4)
    got = [c.token_ids for r in spec.generate(prompts, params) for c in r]
    for prompt, a, b in zip(prompts, plain, got):
        z = None if a == b else np.asarray(combined_logits([m_base, s_rl, s_base], [1.0], tok,
                                                            tok(prompt, add_special_tokens=False)["input_ids"], a))
        assert_same_up_to_ties(a, b, z)
    assert spec.scheduler.stats.acceptance > 0.5  # the trained rl model is a good draft for RAST
