"""`RAST.generate` against the reference decoder and naive statistics: greedy, sampled, top-p
frequencies, padded vocabularies, stop strings, log-probs, concurrent slot groups."""

import dataclasses

import jax
import jax.numpy as jnp
import jax.scipy.stats
import numpy as np
import pytest
from hf_fixtures import SMALL
from reference_decoder import assert_same_up_to_ties, law, reference_decode

from jaxrast.models.hf import load_model
from jaxrast.rast.combine import combine_logits
from jaxrast.rast.decoding import RAST, Pair, SamplingParams
from jaxrast.toy.tokenizer import char_tokenizer

PROMPTS = ["abc de", "hello world 12+3=", "x", "qq rr ss tt uu vv ww xx yy zz 1 2 3 4 5 6 7 8 9"]



@pytest.fixture(scope="module")
def trio(ckpt_dir):
    """(base, rl, ref, tokenizer): a 2-layer base and two different 1-layer small models."""
    base, _, tok = load_model(ckpt_dir("qwen2", seed=1))
    rl, _, _ = load_model(ckpt_dir("qwen2", seed=2, **SMALL))
    ref, _, _ = load_model(ckpt_dir("qwen2", seed=3, **SMALL))
    return base, rl, ref, tok


@jax.jit
def _full_forward(model, seq):
    return model(seq)[0]


def test_concurrent_programs_give_the_same_rows(trio):
    """workers=3 splits 3 slots into three one-slot groups decoded from threads: every row
    equals the one-group decode."""
    base, rl, ref, tok = trio
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=4, seed=5)
    rows = {}
    for workers in (1, 3):
        eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=3, workers=workers, max_len=128)
        assert eng.spec.max_slots == 3 // workers
        batches = list(eng.generate_iter(PROMPTS, params, progress=False))
        rows[workers] = [((c.index, c.sample), c.token_ids) for b in batches for c in b]
    assert len(rows[3]) == 16
    assert sorted(rows[1]) == sorted(rows[3])  # rows come back as they finish; each group decodes them alike
    with pytest.raises(ValueError, match="must be >= 1 and divide batch_size"):
        RAST(base, tokenizer=tok, batch_size=4, workers=3)


def test_greedy_rast_equals_the_reference_decoder(trio):
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=4, max_len=128)
    res = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    for prompt, (c,) in zip(PROMPTS, res):
        want, z = reference_decode([base, rl, ref], [0.8], tok(prompt, add_special_tokens=False)["input_ids"],
                                   vocab=len(tok), max_new_tokens=24, stop_ids=(tok.eos_token_id,))
        assert_same_up_to_ties(c.token_ids, want, z)
        if c.token_ids == want:
            assert c.finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    # the RAST shift changed the outcome: base alone decodes differently
    plain = RAST(base, tokenizer=tok, batch_size=4, max_len=128).generate(
        PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    assert [p[0].token_ids for p in plain] != [r[0].token_ids for r in res]


def test_two_pairs_and_shared_ref(trio):
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.5), Pair(base, ref, 0.25)], tokenizer=tok, batch_size=2)
    assert len(eng.models) == 3  # base reused as an rl model, each model runs once per step
    res = eng.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, (c,) in zip(PROMPTS, res):
        want, z = reference_decode([base, rl, ref, base, ref], [0.5, 0.25], tok(prompt, add_special_tokens=False)[
            "input_ids"], vocab=len(tok), max_new_tokens=12, stop_ids=(tok.eos_token_id,))
        assert_same_up_to_ties(c.token_ids, want, z)


def test_no_pairs_equals_plain_sampled_decoding(trio):
    base, _, _, tok = trio
    eng = RAST(base, tokenizer=tok, batch_size=4)
    assert len(eng.models) == 1  # the small models are not part of the program at all
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=16, n=2, seed=7)
    res = eng.generate(PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        for s in range(2):
            want, _ = reference_decode([base], [], tok(prompt, add_special_tokens=False)["input_ids"], vocab=len(tok),
                                       max_new_tokens=16, stop_ids=(tok.eos_token_id,), temperature=0.9, top_p=0.95,
                                       seed=7, row_id=i, sample=s)
            c = res[i][s]
            assert c.token_ids == want
    # deterministic for a seed, independent of batch size
    again = RAST(base, tokenizer=tok, batch_size=3).generate(PROMPTS, params)
    assert [[c.token_ids for c in r] for r in again] == [[c.token_ids for c in r] for r in res]


def test_token_ids_without_a_tokenizer_or_stop_ids(trio):
    base, _, _, tok = trio
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    eng = RAST(base, batch_size=2, workers=1)  # no tokenizer: no pad or eos token to fall back on
    out = eng.generate(ids, SamplingParams(temperature=0, max_new_tokens=5, stop_token_ids=()))
    assert [c[0].num_tokens for c in out] == [5, 5] and all(c[0].finish_reason == "length" for c in out)
    with pytest.raises(ValueError, match="seed must be"):
        SamplingParams(seed=2**31)


def test_prompts_past_the_position_limit_warn():
    from jaxrast.toy.demo import family_dir

    model, cfg, tok = load_model(family_dir() + "/s_base")
    with pytest.warns(UserWarning, match="beyond a model's max_position_embeddings"):
        eng = RAST(model, tokenizer=tok, batch_size=1, workers=1, max_len=cfg.max_position_embeddings + 8)
    eng.generate([[5] * cfg.max_position_embeddings], SamplingParams(temperature=0, max_new_tokens=2))


def test_sampling_frequencies_match_top_p_softmax(trio):
    base, rl, ref, tok = trio
    lam, tau, top_p, draws = 0.7, 0.8, 0.9, 2000
    # pages of 8: each admit call prefills the prompt once for its 32 samples; one program for 500 rows
    eng = RAST(base, [Pair(rl, ref, lam)], tokenizer=tok, batch_size=500, max_len=128, page_size=8, buckets=False)
    prompt = "hello world 12+3="
    res = eng.generate([prompt], SamplingParams(temperature=tau, top_p=top_p, max_new_tokens=1, n=draws, seed=3,
                                                stop_token_ids=()))
    counts = np.bincount([c.token_ids[0] for c in res[0]], minlength=len(tok))
    seq = jnp.asarray([tok(prompt, add_special_tokens=False)["input_ids"]])
    z = combine_logits(base(seq)[0][:, -1], [rl(seq)[0][:, -1]], [ref(seq)[0][:, -1]], [lam], len(tok))
    probs = law(np.asarray(z, np.float64)[0], tau, 0, top_p)
    support = probs > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus is ever drawn
    assert 2 <= support.sum() < len(tok)  # the test exercises a real cut
    expected = probs[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    p_value = float(jax.scipy.stats.chi2.sf(chi2, support.sum() - 1))
    assert p_value > 1e-3, (chi2, p_value)


def test_padded_vocab_rows_never_sampled(ckpt_dir):
    base, cfg, tok = load_model(ckpt_dir("qwen2", vocab=96, seed=4))
    rl, _, _ = load_model(ckpt_dir("qwen2", seed=2, **SMALL))
    ref, _, _ = load_model(ckpt_dir("qwen2", seed=3, **SMALL))
    real = len(tok)
    assert cfg.vocab_size == 96 > real
    kernel = base.lm_head.kernel[...]
    base.lm_head.kernel[...] = kernel.at[:, real:].set(5.0)  # padded rows would win everywhere
    logits, _ = base(jnp.asarray([[5, 6, 7]]))
    assert int(logits[0, -1].argmax()) >= real
    for pairs in ([], [Pair(rl, ref, 1.0)]):
        eng = RAST(base, pairs, tokenizer=tok, batch_size=8)
        for temperature in (0.0, 1.5):
            res = eng.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=12, n=2))
            ids = [t for r in res for c in r for t in c.token_ids]
            assert ids and max(ids) < real


def test_tokenizer_mismatch_refused(trio):
    base, rl, ref, tok = trio
    other = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789")
    with pytest.raises(ValueError, match="tokenizer differs from the base"):
        RAST(base, [Pair(rl, ref, 1.0, tokenizer=other)], tokenizer=tok)


def test_stop_strings_and_length(trio):
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.5)], tokenizer=tok, batch_size=4, max_len=128)
    free = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=30, seed=1, stop_token_ids=()))
    assert all(c.finish_reason == "length" and c.num_tokens == 30 for r in free for c in r)
    stop = free[1][0].text[5]
    res = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=30, seed=1, stop_token_ids=(),
                                               stop_strings=(stop,)))
    for f, (c,) in zip(free, res):
        if stop in f[0].text:
            assert c.finish_reason == "stop" and c.text == f[0].text[: f[0].text.index(stop)]
            # the row ends with the token that completed the stop string
            assert c.token_ids == f[0].token_ids[: c.num_tokens]
            text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 (as the engine matches)
            assert stop in text(c.token_ids) and stop not in text(c.token_ids[:-1])
        else:
            assert c.text == f[0].text and c.finish_reason == "length"
    assert res[1][0].finish_reason == "stop"


def test_logprobs_match_teacher_forced_forward_and_weights_are_read_fresh(ckpt_dir):
    model, _, tok = load_model(ckpt_dir("qwen2", seed=5))
    eng = RAST(model, tokenizer=tok, batch_size=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=2, stop_token_ids=())
    (c,), = eng.generate(["abc"], params)
    prompt = tok("abc", add_special_tokens=False)["input_ids"]
    logits = _full_forward(model, jnp.asarray([prompt + c.token_ids]))[0]
    logp = jax.nn.log_softmax(logits[len(prompt) - 1:-1, : len(tok)], axis=-1)
    want = np.take_along_axis(np.asarray(logp), np.asarray(c.token_ids)[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(c.logprobs, want, atol=1e-4)
    # entropies of softmax(z / τ), as GRPO's training forward computes them
    (c3,), = eng.generate(["abc"], dataclasses.replace(params, temperature=0.7, entropies=True, logprobs=False))
    logp = jax.nn.log_softmax(_full_forward(model, jnp.asarray([prompt + c3.token_ids]))[0][len(prompt) - 1:-1,
                              : len(tok)] / 0.7, axis=-1)
    np.testing.assert_allclose(c3.entropies, -np.sum(np.exp(logp) * logp, axis=-1), atol=1e-4)
    assert c3.logprobs == [] and c.entropies == []
    # an in-place parameter update (as an optimizer step does) is seen by the next call
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])  # uniform next-token law
    (c2,), = eng.generate(["abc"], params)
    np.testing.assert_allclose(c2.logprobs, -np.log(len(tok)), rtol=1e-5)
