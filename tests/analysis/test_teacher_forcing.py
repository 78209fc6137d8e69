"""Token-level analyses: known answers on constructed models, and teacher forcing against a
token-by-token reference on random tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrast.analysis.reports import coverage_report, kl_report, similarity_report, token_table, trace_records
from jaxrast.analysis.teacher_forcing import coverage_positions, kl_positions, similarity_positions, trace_positions
from jaxrast.analysis.trajectories import Trajectory, parse_row_selector
from jaxrast.models.config import ModelConfig
from jaxrast.models.hf import load_model
from jaxrast.models.kv_cache import KVCache
from jaxrast.models.transformer import CausalLM
from jaxrast.rast.combine import combine_logits
from jaxrast.rast.decoding import RAST, Pair, SamplingParams
from jaxrast.runtime.shapes import bucket_length

SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64)
PROMPTS = ["abc de", "hello world 12+3=", "x", "qq rr ss tt 1 2 3", "7*8="]


@pytest.fixture(scope="module")
def family(ckpt_dir):
    """Random tiny checkpoints: a base, a pair, and for each an identical second copy."""
    paths = dict(base=ckpt_dir("qwen2", seed=1), rl=ckpt_dir("qwen2", seed=2, **SMALL),
                 ref=ckpt_dir("qwen2", seed=3, **SMALL))
    models = {name: load_model(p)[0] for name, p in paths.items()}
    models.update({f"{name}_copy": load_model(p)[0] for name, p in paths.items()})
    return models, load_model(paths["base"])[2]


def decode(model, tok, pairs=(), temperature=0.0, n=1, schedule=None):
    eng = RAST(model, pairs, tokenizer=tok, batch_size=4, lam_schedule=schedule)
    res = eng.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=20, n=n, seed=5))
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    trajs = [Trajectory(prompt_ids[c.index], c.token_ids, str(c.index), c.sample) for row in res for c in row]
    return trajs, [c.logprobs for row in res for c in row]


# ---- known answers on constructed models ------------------------------------------------------------

def test_identical_models_give_coverage_one_kl_zero_cosine_one(family):
    models, tok = family
    base, rl, ref = models["base"], models["rl"], models["ref"]
    greedy, _ = decode(base, tok)
    # the trajectory's own model, an identical copy, and RAST with a zero delta (rl == ref copy)
    pp = coverage_positions(greedy, {"self": base, "copy": models["base_copy"]}, vocab=len(tok),
                            base=models["base_copy"], pairs=[Pair(ref, models["ref_copy"], 1.5)])
    rep = coverage_report(greedy, pp, tok)
    assert {n: m["coverage"] for n, m in rep["models"].items()} == {"self": 1.0, "copy": 1.0, "RAST": 1.0}
    assert all(m["missed_tokens"] == [] for m in rep["models"].values())

    kl = kl_positions(greedy, base, [Pair(rl, models["rl_copy"], 1.0)], vocab=len(tok),
                      models={"copy": models["base_copy"]})
    for name in ("RAST", "pair0", "copy"):
        assert np.abs(np.concatenate([p[f"{name}/kl"] for p in kl])).max() < 1e-6, name
        assert np.abs(np.concatenate([p[f"{name}/dlogp"] for p in kl])).max() < 1e-5, name

    sim = similarity_report(greedy, similarity_positions(
        greedy, {"a": (rl, ref), "b": (models["rl_copy"], models["ref_copy"]), "flip": (ref, rl)}, vocab=len(tok)))
    for kind in ("full", "shared"):
        assert sim["comparisons"]["a|b"][kind]["mean"] == pytest.approx(1.0, abs=1e-5)
        assert sim["comparisons"]["a|flip"][kind]["mean"] == pytest.approx(-1.0, abs=1e-5)


def constructed_model(cfg: ModelConfig, embedding: np.ndarray, head: np.ndarray) -> CausalLM:
    """A model whose logits at a position are rmsnorm(embedding[input token]) @ head: every
    attention and MLP output projection is zero, so the residual stream is the embedding."""
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    model.embed_tokens.embedding[...] = jnp.asarray(embedding, jnp.float32)
    for layer in model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    model.lm_head.kernel[...] = jnp.asarray(head, jnp.float32)
    return model


CFG = ModelConfig(model_type="qwen2", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, attention_bias=True)
REAL = 24  # tokenizer vocabulary: rows 24..31 are padding


def test_known_delta_vectors_give_the_expected_cosine():
    # constant hidden state (all embedding rows equal): logits = c · head[0] at every position
    ones = np.ones((CFG.vocab_size, CFG.hidden_size))
    e = np.eye(CFG.vocab_size)

    def head(row):
        h = np.zeros((CFG.hidden_size, CFG.vocab_size))
        h[0] = row
        return h

    zero = constructed_model(CFG, ones, head(np.zeros(CFG.vocab_size)))
    # ΔR_a = e0 + e30 (one padded row), ΔR_b = e0 + e1, ΔR_c = −2·ΔR_a
    a, b, c = (constructed_model(CFG, ones, head(v)) for v in (e[0] + e[30], e[0] + e[1], -2 * (e[0] + e[30])))
    trajs = [Trajectory([3, 4, 5], [6, 7, 8, 9]), Trajectory([1], [2, 3])]
    rep = similarity_report(trajs, similarity_positions(trajs, {"a": (a, zero), "b": (b, zero), "c": (c, zero)},
                                                        vocab=REAL))
    want = {"a|b": (0.5, 1 / np.sqrt(2)), "a|c": (-1.0, -1.0), "b|c": (-0.5, -1 / np.sqrt(2))}
    for name, (full, shared) in want.items():
        got = rep["comparisons"][name]
        assert got["full"]["per_position"] == [[pytest.approx(full, abs=1e-6)] * len(t.token_ids) for t in trajs]
        assert got["shared"]["mean"] == pytest.approx(shared, abs=1e-6)


def test_position_dependent_delta_cosine_and_kl_match_closed_form():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(CFG.vocab_size, CFG.hidden_size))
    heads = {k: rng.normal(size=(CFG.hidden_size, CFG.vocab_size)) for k in ("base", "rl_a", "ref_a", "rl_b", "ref_b")}
    models = {k: constructed_model(CFG, emb, h) for k, h in heads.items()}
    trajs = [Trajectory(list(rng.integers(3, REAL, 4)), list(rng.integers(3, REAL, n))) for n in (5, 1, 9)]

    normed = lambda ids: emb[ids] / np.sqrt(np.mean(emb[ids] ** 2, -1, keepdims=True) + CFG.rms_norm_eps)  # noqa
    inputs = [np.array(t.prompt_ids + t.token_ids)[len(t.prompt_ids) - 1:-1] for t in trajs]  # token before each target
    da = [normed(x) @ (heads["rl_a"] - heads["ref_a"]) for x in inputs]
    db = [normed(x) @ (heads["rl_b"] - heads["ref_b"]) for x in inputs]
    cos = lambda u, v: np.sum(u * v, -1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)  # noqa

    sim = similarity_positions(trajs, {"a": (models["rl_a"], models["ref_a"]), "b": (models["rl_b"], models["ref_b"])},
                               vocab=REAL)
    for pp, u, v in zip(sim, da, db):
        np.testing.assert_allclose(pp["a|b/full"], cos(u, v), atol=1e-5)
        np.testing.assert_allclose(pp["a|b/shared"], cos(u[:, :REAL], v[:, :REAL]), atol=1e-5)

    lam = 0.7
    kl = kl_positions(trajs, models["base"], [Pair(models["rl_a"], models["ref_a"], lam)], vocab=REAL)
    for pp, t, x, u in zip(kl, trajs, inputs, da):
        zb = (normed(x) @ heads["base"])[:, :REAL]
        lq = zb - np.log(np.exp(zb).sum(-1, keepdims=True))
        zr = zb + lam * u[:, :REAL]
        lp = zr - np.log(np.exp(zr).sum(-1, keepdims=True))
        np.testing.assert_allclose(pp["RAST/kl"], np.sum(np.exp(lp) * (lp - lq), -1), rtol=1e-4, atol=1e-6)
        tgt = np.array(t.token_ids)
        np.testing.assert_allclose(pp["RAST/dlogp"], lp[np.arange(len(tgt)), tgt] - lq[np.arange(len(tgt)), tgt],
                                   atol=1e-5)


# ---- teacher forcing == token by token ----------------------------------------

WIDTH, CACHE = 32, 64


@jax.jit
def _prefill(model, tokens, mask):
    """The prompt (left-padded to WIDTH) into a fresh cache; logits for the first generated token."""
    cache = KVCache.init(model.cfg, 1, CACHE)
    logits, cache = model(tokens, attention_mask=mask, cache=cache, last_only=True)
    return logits[0, -1], cache


@jax.jit
def _step(model, token, position, cache):
    """One token appended to the cache; logits for the next one."""
    logits, cache = model(token[None, None], position[None, None], cache=cache)
    return logits[0, -1], cache


def token_by_token_logits(model, t: Trajectory) -> np.ndarray:
    """[num_tokens, V]: the model's logits before each trajectory token, fed one token at a
    time through the KV cache (the decoding path, not the teacher-forced one)."""
    p = len(t.prompt_ids)
    tokens = np.zeros((1, WIDTH), np.int32)
    tokens[0, WIDTH - p:] = t.prompt_ids
    z, cache = _prefill(model, jnp.asarray(tokens), jnp.asarray(np.arange(WIDTH) >= WIDTH - p)[None])
    out = [z]
    for k, token in enumerate(t.token_ids[:-1]):
        z, cache = _step(model, jnp.int32(token), jnp.int32(p + k), cache)
        out.append(z)
    return np.stack(jax.device_get(out))


def test_teacher_forced_coverage_equals_token_by_token_reference(family):
    models, tok = family
    base, rl, ref = models["base"], models["rl"], models["ref"]
    vocab, lam = len(tok), 0.8
    sampled, _ = decode(rl, tok, temperature=1.0, n=2)  # S_RL-style sampled trajectories
    assert len({bucket_length(len(t.prompt_ids) + len(t.token_ids)) for t in sampled}) > 1  # padding, buckets
    pairs = [Pair(rl, ref, lam)]
    pp = coverage_positions(sampled, {"base": base, "ref": ref}, vocab=vocab, base=base, pairs=pairs, batch_size=4)
    kl = kl_positions(sampled, base, pairs, vocab=vocab, batch_size=3)
    matches = {"base": [], "ref": [], "RAST": []}
    for t, got, got_kl in zip(sampled, pp, kl):
        z = {name: token_by_token_logits(m, t) for name, m in (("base", base), ("rl", rl), ("ref", ref))}
        z["RAST"] = np.asarray(combine_logits(z["base"], [z["rl"]], [z["ref"]], [lam], vocab))
        for name in matches:
            pred = z[name][:, :vocab].argmax(-1)
            np.testing.assert_array_equal(got[f"{name}/pred"], pred, err_msg=f"{t.name} {name}")
            matches[name].extend(pred == np.array(t.token_ids))
        lp, lq = (np.asarray(jax.nn.log_softmax(z[n][:, :vocab], axis=-1)) for n in ("RAST", "base"))
        np.testing.assert_allclose(got_kl["RAST/kl"], np.sum(np.exp(lp) * (lp - lq), -1), rtol=1e-4, atol=1e-6)
    rep = coverage_report(sampled, pp, tok)
    for name, m in matches.items():
        assert rep["models"][name]["coverage"] == pytest.approx(np.mean(m))
    assert 0 < rep["models"]["base"]["coverage"] < 1


def test_rast_trajectories_are_fully_covered_by_rast_and_trace_matches_decode_logprobs(family):
    models, tok = family
    base, rl, ref = models["base"], models["rl"], models["ref"]
    pairs = [Pair(rl, ref, 1.0)]
    greedy, logprobs = decode(base, tok, pairs, schedule="first:3")
    pp = coverage_positions(greedy, {"base": base}, vocab=len(tok), base=base, pairs=pairs, lam_schedule="first:3")
    assert coverage_report(greedy, pp)["models"]["RAST"]["coverage"] == 1.0
    trace = trace_positions(greedy, base, pairs, vocab=len(tok), top_k=3, lam_schedule="first:3")
    for _, tr, lp in zip(greedy, trace, logprobs):
        np.testing.assert_allclose(tr["logp_combined"], lp, atol=2e-4)
        assert np.all(tr["delta/values"][3:] == 0) and np.any(tr["delta/values"][:3] != 0)  # ΔR for 3 tokens only
    rec = trace_records(greedy[:1], trace[:1], tok)[0]
    assert len(rec["steps"]) == len(greedy[0].token_ids) and len(rec["steps"][0]["combined"]) == 3
    assert rec["steps"][0]["combined"][0][2] >= rec["steps"][0]["combined"][1][2]


def test_top_shifted_tokens_and_reports():
    keys = np.array(list("wwwaxbw"))
    kl = np.array([5.0, 4.0, 3.0, 0.1, 0.2, 0.0, 0.0])
    table = token_table(keys, kl > 1, {"kl": kl}, top_n=5)
    assert table[0] == {"token": "w", "count": 3, "occurrences": 4, "share": 0.75, "mean_kl": 3.0}
    assert [r["token"] for r in token_table(keys, np.ones(7, bool), {"kl": kl}, rank_by="kl")][:2] == ["w", "x"]
    trajs = [Trajectory([1], [2, 2, 3]), Trajectory([1], [2])]
    per_pos = [{"RAST/kl": np.array([1.0, 2.0, 0.0]), "RAST/dlogp": np.array([1.0, 1.0, 0.0]),
                "RAST/promoted": np.array([2, 2, 3])}, {"RAST/kl": np.array([9.0]), "RAST/dlogp": np.array([2.0]),
                                                         "RAST/promoted": np.array([2])}]
    rep = kl_report(trajs, per_pos, None, top_fraction=0.5, min_occurrences=1)["series"]["RAST"]
    assert rep["top_tokens"][0] == {"token": "2", "count": 2, "occurrences": 3, "share": 2 / 3, "mean_kl": 4.0,
                                    "mean_dlogp": 4 / 3}
    assert rep["profile"]["mean"] == [5.0, 2.0, 0.0] and rep["profile"]["count"] == [2, 1, 1]
    selected = parse_row_selector(["q1", "test/a:b.json", "q2:1"])
    assert selected("q1", 3) and selected("test/a:b.json", 0) and selected("q2", 1) and not selected("q2", 0)
