"""The tests' reference decoder itself: its logits are a plain forward's, greedy takes their
argmax, sampling draws the law at the engine's stream, and the law is what it says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_decoder import law, reference_decode

from jaxrast.rast.combine import combine_logits


def forced_z(models, lams, prompt, out, vocab):
    """z at every generated position from one unpadded forward of prompt + out per model,
    combined in float32 by the package's rule: [steps, vocab]."""
    seq = jnp.asarray([list(prompt) + list(out)])
    logits = [m(seq)[0][0, len(prompt) - 1:len(prompt) - 1 + len(out)] for m in models]
    return np.asarray(combine_logits(logits[0], logits[1::2], logits[2::2], list(lams), vocab), np.float64)


@pytest.mark.parametrize("mode", ["rast", "base", "rl"])
def test_greedy_is_the_argmax_of_full_forward_logits(trio, mode):
    base, rl, ref, tok = trio
    models, lams = {"rast": ([base, rl, ref], [0.8]), "base": ([base], []), "rl": ([rl], [])}[mode]
    prompt = tok("hello world 12+3=", add_special_tokens=False)["input_ids"]
    out, z = reference_decode(models, lams, prompt, vocab=len(tok), max_new_tokens=12)
    assert len(out) == 12 and z.shape == (12, len(tok)) and z.dtype == np.float64
    want = forced_z(models, lams, prompt, out, len(tok))
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)  # float32 forwards of two widths
    for step, t in enumerate(out):
        assert t == int(np.argmax(z[step]))
        top2 = np.sort(want[step])[-2:]
        assert t == int(np.argmax(want[step])) or top2[1] - top2[0] < 1e-4, step


def test_stop_ids_end_the_row_and_the_budget_holds(trio):
    base, _, _, tok = trio
    prompt = tok("abc de", add_special_tokens=False)["input_ids"]
    out, _ = reference_decode([base], [], prompt, vocab=len(tok), max_new_tokens=10)
    stop = out[4]
    cut, z = reference_decode([base], [], prompt, vocab=len(tok), max_new_tokens=10, stop_ids=(stop, 95))
    assert cut == out[:out.index(stop) + 1] and z.shape == (len(cut), len(tok))
    assert reference_decode([base], [], prompt, vocab=len(tok), max_new_tokens=3)[0] == out[:3]


def test_sampling_inverts_the_law_at_the_engine_stream(trio):
    base, rl, ref, tok = trio
    prompt = tok("x", add_special_tokens=False)["input_ids"]
    settings = dict(temperature=0.9, top_k=20, top_p=0.9, seed=3, row_id=2, sample=1)
    out, z = reference_decode([base, rl, ref], [0.5], prompt, vocab=len(tok), max_new_tokens=16, **settings)
    stream = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 2), 1)
    for i, t in enumerate(out):
        q = law(z[i], 0.9, 20, 0.9)
        u = 1.0 - float(jax.random.uniform(jax.random.fold_in(stream, i)))
        cdf = np.cumsum(q)
        assert q[t] > 0 and cdf[t] >= u * cdf[-1] > (cdf[t - 1] if t else 0.0), (i, t, u)
    again, _ = reference_decode([base, rl, ref], [0.5], prompt, vocab=len(tok), max_new_tokens=16, **settings)
    assert again == out
    other, _ = reference_decode([base, rl, ref], [0.5], prompt, vocab=len(tok), max_new_tokens=16,
                                **{**settings, "row_id": 3})
    assert other != out


@pytest.mark.parametrize("tau, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 12, 1.0), (1.0, 12, 0.6),
                                               (0.5, 1, 0.9), (2.0, 40, 0.3)])
def test_law_sums_to_one_and_respects_the_filters(tau, top_k, top_p):
    z = np.random.default_rng(0).normal(size=(4, 50)) * 2
    z[1, :6] = z[1].max()  # a six-way tie at the top
    z[2, 10:] = -np.inf
    z[3, 5:15] = np.sort(z[3])[-8]  # ties around the 8th value
    q = law(z, tau, top_k, top_p)
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-12)
    for zi, qi in zip(z, q):
        keep = qi > 0
        assert zi[keep].min() >= zi[~keep].max(initial=-np.inf)  # the most likely tokens
        k_kept = zi >= np.sort(zi)[::-1][top_k - 1] if top_k else np.isfinite(zi)  # top-k, ties kept
        assert not np.any(keep & ~k_kept)
        p = np.exp((zi - zi.max()) / tau) * k_kept
        p /= p.sum()
        above = np.array([p[zi > x].sum() for x in zi])  # mass of the strictly more likely tokens
        np.testing.assert_array_equal(keep, k_kept & (p > 0) & (above < top_p))
        np.testing.assert_allclose(qi[keep], p[keep] / p[keep].sum(), rtol=1e-12)


def test_greedy_law_is_one_hot_at_the_first_argmax():
    z = np.array([[0.0, 2.0, 2.0, -np.inf], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(law(z, 0.0, top_k=1, top_p=0.1), [[0, 1, 0, 0], [1, 0, 0, 0]])
