"""Logit parity of the NNX decoder with transformers' PyTorch Qwen2/Qwen3/Llama/Gemma 3 (float32 and bf16)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxrast.models.attention_backend import AttentionBackend
from jaxrast.models.cpu_attention import available as cpu_kernel_available
from jaxrast.models.hf import load_model
from jaxrast.models.kv_cache import KVCache
from jaxrast.rast.decoding import RAST, SamplingParams

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CONFIGS = {
    "qwen2-untied-gqa2": ("qwen2", dict(kv_heads=2)),
    "qwen2-tied-gqa4": ("qwen2", dict(tie=True, kv_heads=1)),
    "qwen2-mha-gqa1": ("qwen2", dict(kv_heads=4, theta=1e6)),
    "qwen2-padded-vocab": ("qwen2", dict(vocab=96)),
    "llama3-rope-scaling": ("llama", dict(rope_scaling=LLAMA3)),
    "llama-biases": ("llama", dict(bias=True)),  # attention_bias covers q/k/v *and* o_proj in llama
    # q/k norms over a head_dim that is not hidden / heads (64 / 4 = 16); tied embeddings and
    # biases (q/k/v and o_proj, as llama's) are covered by the export round trip
    "qwen3-head-dim-gqa2": ("qwen3", dict(kv_heads=2, head_dim=24)),
    # a window of 8 (the prompts are far longer), sliding and full layers with their own RoPE θ
    "gemma3-sliding-full": ("gemma3", dict(kv_heads=2, window=8)),
    # three layers (sliding, full, sliding), tied, one kv head of dim 24, a score scalar that is
    # not head_dim, linear RoPE scaling on the full layer, soft-capped final logits
    "gemma3-tied-capped": ("gemma3", dict(layers=3, tie=True, kv_heads=1, head_dim=24, scalar=20, final_cap=3.0,
                                          rope_scaling={"rope_type": "linear", "factor": 4.0})),
}
ATOL_F32 = 1e-4
# bfloat16 keeps 8 mantissa bits; logits of magnitude ~10 after 2 layers differ by up to
# a few tenths. The bound is relative to the logit scale.
BF16_REL = 0.08


def torch_logits(directory, ids):
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor(np.asarray(ids))).logits.numpy()


def random_ids(seed, shape, high=46):
    return np.random.RandomState(seed).randint(3, high, size=shape)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_parity_long_prompt(ckpt_dir, name):
    kind, kw = CONFIGS[name]
    d = ckpt_dir(kind, **kw)
    model, cfg, tok = load_model(d)
    ids = random_ids(0, (2, 320))
    logits, cache = model(jnp.asarray(ids))
    assert cache is None
    chex.assert_shape(logits, (2, 320, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    ref = torch_logits(d, ids)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL_F32, rtol=0)


def test_logits_from_and_last_only_slice_the_full_forward(ckpt_dir):
    model, cfg, _ = load_model(ckpt_dir("qwen2", tie=True, kv_heads=1))
    ids = jnp.asarray(random_ids(3, (2, 40)))
    full, _ = model(ids)
    tail, _ = model(ids, logits_from=25)
    last, _ = model(ids, last_only=True)
    chex.assert_shape(tail, (2, 15, cfg.vocab_size))
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 25:]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-6)


@pytest.mark.parametrize("name", ["qwen2-untied-gqa2", "llama3-rope-scaling", "qwen3-head-dim-gqa2",
                                  "gemma3-tied-capped"])
def test_left_padded_prefill_and_cached_decode_parity(ckpt_dir, name):
    """Rows of different lengths, left padded; prefill then 1 token per step with the cache."""
    kind, kw = CONFIGS[name]
    d = ckpt_dir(kind, **kw)
    model, cfg, _ = load_model(d)
    lengths, extra, width = [250, 180, 97], 24, 250
    rows = [random_ids(i + 1, (n + extra,)) for i, n in enumerate(lengths)]
    prompt = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), bool)
    for i, n in enumerate(lengths):
        prompt[i, width - n:] = rows[i][:n]
        mask[i, width - n:] = True
    cache = KVCache.init(cfg, batch=3, max_len=width + extra)
    step = jax.jit(lambda tokens, m, c: model(tokens, attention_mask=m, cache=c, last_only=True))
    logits, cache = step(jnp.asarray(prompt), jnp.asarray(mask), cache)
    got = [np.asarray(logits[:, 0])]
    positions = mask.sum(1)
    decode = jax.jit(lambda tokens, pos, c: model(tokens, pos, cache=c))
    for t in range(extra - 1):
        nxt = np.array([r[n + t] for r, n in zip(rows, lengths)])[:, None]
        logits, cache = decode(jnp.asarray(nxt), jnp.asarray(positions[:, None] + t), cache)
        got.append(np.asarray(logits[:, 0]))
    got = np.stack(got, 1)  # [batch, extra, vocab]
    for i, n in enumerate(lengths):
        ref = torch_logits(d, rows[i][None, : n + extra - 1])[0, n - 1:]
        np.testing.assert_allclose(got[i], ref, atol=ATOL_F32, rtol=0)


def engine_greedy_equals_generate(d, prompts, steps, max_len, attention=None):
    """The engine's programs (chunked prefill into slots, then cached decode steps): each
    greedy row is transformers' greedy `generate` of its prompt."""
    model, _, tok = load_model(d)
    rows = RAST(model, tokenizer=tok, batch_size=2, max_len=max_len, attention=attention).generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=steps))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    padding = list(range(len(tok), hf.config.vocab_size))  # embedding rows past the tokenizer: never sampled
    for prompt, (row,) in zip(prompts, rows):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        want = hf.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=0, suppress_tokens=padding)[0, len(ids):].tolist()
        assert row.token_ids == want


def test_qwen3_engine_greedy_equals_transformers_generate(ckpt_dir):
    kind, kw = CONFIGS["qwen3-head-dim-gqa2"]
    engine_greedy_equals_generate(ckpt_dir(kind, **kw), ["abc de", "hello world 12+3= qq rr ss tt"], 12, 64)


@pytest.mark.parametrize("kind", ["cpu_kernel", "xla_ragged", "dense"])
def test_gemma3_engine_greedy_equals_transformers_generate(ckpt_dir, kind):
    """Through each backend, with prompts and continuations far past the window of 8: a cache of
    96 positions is three 32-key blocks for the ragged kernel, which skips those behind the window."""
    if kind == "cpu_kernel" and not cpu_kernel_available():
        pytest.skip("no C++ compiler: the CPU kernel is not built")
    name, kw = CONFIGS["gemma3-tied-capped"]
    prompts = ["abc de 12+3= qq rr ss tt uu vv ww xx yy zz 45", "hello world 7*8=56 and then some more text"]
    engine_greedy_equals_generate(ckpt_dir(name, **kw), prompts, 16, 96, AttentionBackend(kind))


def test_bfloat16_within_documented_bound(ckpt_dir):
    d = ckpt_dir("qwen2")
    model, _, _ = load_model(d, dtype="bfloat16")
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ids = random_ids(3, (2, 128))
    logits, _ = model(jnp.asarray(ids))
    ref = torch_logits(d, ids)
    err = np.abs(np.asarray(logits) - ref).max()
    assert err <= BF16_REL * np.abs(ref).max(), err
    # The argmax agrees almost everywhere.
    assert (np.asarray(logits).argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_param_dtype_separate_from_compute_dtype(ckpt_dir):
    model, _, _ = load_model(ckpt_dir("qwen2"), dtype="bfloat16", param_dtype="float32")
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    logits, _ = model(jnp.asarray(random_ids(0, (1, 8))))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["xla_ragged", "cpu_kernel"])
def test_attention_backends_read_each_rows_own_keys_bit_for_bit(ckpt_dir, kind):
    """Per-row bounds through a backend (XLA's ragged blocks, the C++ kernel): each row
    agrees with dense attention, and its result is the same bit for bit whatever its
    neighbours' bounds and whichever slot it sits in; a free slot reads nothing."""
    if kind == "cpu_kernel" and not cpu_kernel_available():
        pytest.skip("no C++ compiler: the CPU kernel is not built")
    backend = AttentionBackend(kind)
    model, cfg, _ = load_model(ckpt_dir("qwen2", kv_heads=2))
    ids = jnp.asarray(random_ids(6, (4, 500)))
    lengths = jnp.asarray([30, 200, 390, 470], jnp.int32)

    @jax.jit
    def step(order, bounds):
        cache = KVCache.init(cfg, 4, 512, per_row=True, mask=True)
        _, cache = model(ids[order], cache=cache)
        pos, tok = lengths[order], ids[order][jnp.arange(4), lengths[order]][:, None]
        out = model(tok, pos[:, None], cache=cache.replace(index=pos), last_only=True, attention=backend,
                    kv_len=bounds)[0][:, -1]
        full = model(tok, pos[:, None], cache=cache.replace(index=pos), last_only=True)[0][:, -1]
        return out, full

    order = jnp.arange(4)
    own, full = (np.asarray(x) for x in step(order, lengths + 1))
    np.testing.assert_allclose(own, full, atol=1e-5, rtol=0)
    longer, _ = step(order, jnp.asarray([512, 201, 391, 512], jnp.int32))  # rows 0 and 3 read more blocks
    np.testing.assert_array_equal(np.asarray(longer)[1:3], own[1:3])
    np.testing.assert_array_equal(np.asarray(longer)[[0, 3]], own[[0, 3]])  # extra blocks add exactly nothing
    flipped = jnp.asarray([3, 1, 0, 2])
    moved, _ = step(flipped, lengths[flipped] + 1)
    np.testing.assert_array_equal(np.asarray(moved), own[np.asarray(flipped)])
    if kind == "xla_ragged":  # the kernel reads up to each query's position, whatever the bound
        short, _ = step(order, jnp.asarray([31, 201, 31, 471], jnp.int32))
        assert not np.allclose(np.asarray(short)[2], full[2], atol=1e-3)  # the bound is really applied
    idle, _ = step(order, jnp.asarray([0, 201, 391, 0], jnp.int32))  # free slots (bound 0)
    np.testing.assert_array_equal(np.asarray(idle)[1:3], own[1:3])
    assert np.isfinite(np.asarray(idle)).all()
