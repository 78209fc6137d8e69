"""load_model / save_hf: round trip through transformers, and a clear error for each bad input."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxrast.models.config import ModelConfig
from jaxrast.models.hf import load_model, save_hf
from jaxrast.models.safetensors_io import SafetensorsFile, save_file


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# qwen3 with every option its export must carry: biases (q/k/v and o_proj), q/k norms, an
# explicit head_dim (not hidden / heads), tied embeddings; gemma3 also with its layer types and
# window (8, under the 64-token prompt), both RoPE sets (linear scaling on the full layers), a
# score scalar and a final soft-cap
GEMMA3 = dict(bias=True, head_dim=24, kv_heads=1, layers=3, scalar=20, final_cap=3.0,
              rope_scaling={"rope_type": "linear", "factor": 4.0})
@pytest.mark.parametrize("kind,kw", [("qwen2", dict(tie=True)),
                                     ("qwen3", dict(tie=True, bias=True, head_dim=24, kv_heads=1)),
                                     ("gemma3", GEMMA3)])
def test_round_trip_save_hf_loads_in_transformers(ckpt_dir, tmp_path, kind, kw):
    model, cfg, tok = load_model(ckpt_dir(kind, **kw))
    out = save_hf(model, tok, str(tmp_path / "out"))
    ids = np.random.RandomState(0).randint(3, 40, (2, 64))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got, _ = model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    again, cfg2, tok2 = load_model(out)
    assert cfg2 == cfg and len(tok2) == len(tok)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))[0]), np.asarray(got))


def test_save_hf_bf16_and_sharded_index(ckpt_dir, tmp_path):
    model, cfg, tok = load_model(ckpt_dir("llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    out = save_hf(model, tok, str(tmp_path / "sharded"), dtype="bfloat16", max_shard_bytes=20_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    ref = AutoModelForCausalLM.from_pretrained(out)
    assert ref.model.embed_tokens.weight.dtype == torch.bfloat16
    back, cfg2, _ = load_model(out)
    assert cfg2.rope_type == "llama3"
    np.testing.assert_allclose(np.asarray(back.layers[0].mlp.up_proj.kernel[...]),
                               np.asarray(model.layers[0].mlp.up_proj.kernel[...].astype(jnp.bfloat16)
                                          .astype(jnp.float32)))


def test_missing_config(tmp_path, ckpt_dir):
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        load_model(d)


def test_missing_weights(tmp_path, ckpt_dir):
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="has no model weights .*it contains: config.json"):
        load_model(d)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/nonexistent/dir/model")


def test_hub_id_not_cached_offline():
    with pytest.raises(FileNotFoundError, match="nor in the local HuggingFace cache"):
        load_model("Qwen/Qwen2.5-0.5B-not-cached")


def test_hub_id_resolved_from_local_cache(tmp_path, ckpt_dir, monkeypatch):
    """A hub id found in the HF cache layout (models--org--name/snapshots/REV) loads offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-qwen" / "snapshots" / ("a" * 40)
    shutil.copytree(ckpt_dir("qwen2"), snap)
    (cache / "models--acme--tiny-qwen" / "refs").mkdir()
    (cache / "models--acme--tiny-qwen" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    model, cfg, tok = load_model("acme/tiny-qwen")
    assert cfg.model_type == "qwen2" and tok is not None


def test_unsupported_model_type(tmp_path, ckpt_dir):
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; jaxrast supports qwen2, qwen3, llama, "
                                         "gemma3_text"):
        load_model(d)


def test_qwen3_config_defaults_and_sliding_window_refused():
    """A qwen3 config.json read as transformers' Qwen3Config reads it: head_dim 128 when absent,
    no q/k/v bias unless attention_bias, no MLP bias ever; a sliding window is refused."""
    raw = dict(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, mlp_bias=True)
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg.head_dim == 128 and cfg.qk_norm
    assert not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)
    assert ModelConfig.from_hf_dict({**raw, "attention_bias": True}).o_proj_bias
    assert cfg.to_hf_dict()["architectures"] == ["Qwen3ForCausalLM"]
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):
        ModelConfig.from_hf_dict({**raw, "use_sliding_window": True})


GEMMA3_RAW = dict(model_type="gemma3_text", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                  num_attention_heads=4, num_key_value_heads=1)


@pytest.mark.parametrize("extra", [
    {},  # every default: head_dim 256, tied, window 4096, θ 1e6 / 1e4, scalar 256, every 6th layer full
    # the older file layout: top-level rope_theta / rope_local_base_freq / rope_scaling, a pattern
    dict(rope_theta=5e5, rope_local_base_freq=2e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
         sliding_window_pattern=3, sliding_window=64, head_dim=16, tie_word_embeddings=False, query_pre_attn_scalar=8),
])
def test_gemma3_config_read_as_transformers_reads_it(extra):
    """Each layer's window and RoPE, the defaults of absent keys, the activation and the score
    scale agree with transformers' own Gemma3TextConfig of the same dict."""
    from transformers import Gemma3TextConfig
    raw = {**GEMMA3_RAW, **extra}
    cfg, hf = ModelConfig.from_hf_dict(raw), Gemma3TextConfig(**raw)
    assert cfg.layer_types == tuple(hf.layer_types) and cfg.sliding_window == hf.sliding_window
    assert [cfg.layer_window(i) for i in range(7)] == [
        hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (cfg.rope_theta, cfg.rope_local_base_freq) == (full["rope_theta"], local["rope_theta"])
    assert dict(cfg.rope_scaling) == {k: v for k, v in full.items() if k != "rope_theta"}
    assert (cfg.head_dim, cfg.tie_word_embeddings, cfg.hidden_act) == (hf.head_dim, hf.tie_word_embeddings,
                                                                      hf.hidden_activation)
    assert cfg.attention_divisor == hf.query_pre_attn_scalar**0.5
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.norm_offset == 1.0 and cfg.embed_scale == 8.0
    back = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert back == cfg and cfg.to_hf_dict()["architectures"] == ["Gemma3ForCausalLM"]


@pytest.mark.parametrize("extra,message", [
    (dict(attn_logit_softcapping=50.0), "transformers' Gemma 3 ignores it"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types must list 7 entries"),
    (dict(layer_types=["local"] * 7), "layer_types must list 7 entries"),
    (dict(sliding_window=0), "sliding_window must be a whole number"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "rope scaling on sliding_attention layers"),
    (dict(hidden_activation="relu"), "MLP activation 'relu' is not supported"),
])
def test_gemma3_config_errors_name_the_setting(extra, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**GEMMA3_RAW, **extra})


def test_wrong_tensor_shape(tmp_path, ckpt_dir):
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    f = SafetensorsFile(os.path.join(d, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    del f
    save_file(tensors, os.path.join(d, "model.safetensors"))
    shape = r"'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\) .*implies \(96, 64\)"
    with pytest.raises(ValueError, match=shape):
        load_model(d)


def test_unknown_tensor_is_refused(tmp_path, ckpt_dir):
    """A tensor the model has no place for (an architecture variant) must not be dropped silently."""
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    f = SafetensorsFile(os.path.join(d, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match=r"no place in jaxrast's qwen2 model.*o_proj.bias"):
        load_model(d)


def test_export_over_an_earlier_export_and_generation_config(ckpt_dir, tmp_path, monkeypatch):
    src = ckpt_dir("qwen2")
    (tmp_path / "src").mkdir()
    src = copy_ckpt(src, tmp_path / "src" / "ckpt")
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 5], "temperature": 0.7}, f)
    monkeypatch.setenv("HOME", str(tmp_path / "src"))
    model, _, tok = load_model("~/ckpt")  # ~ is expanded
    ids = np.random.RandomState(0).randint(3, 40, (1, 32))
    out = str(tmp_path / "hf")
    save_hf(model, tok, out, max_shard_bytes=20_000)  # sharded first, then one file over it, then sharded
    for shard_bytes in (1 << 40, 20_000):
        layer = model.layers[0].mlp.up_proj.kernel
        layer[...] = layer[...] + 0.5
        save_hf(model, tok, out, max_shard_bytes=shard_bytes, source="~/ckpt")
        want = np.asarray(model(jnp.asarray(ids))[0])
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            np.testing.assert_allclose(ref(torch.tensor(ids)).logits.numpy(), want, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asarray(load_model(out)[0](jnp.asarray(ids))[0]), want)
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == [1, 5]


def test_missing_tensor(tmp_path, ckpt_dir):
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    f = SafetensorsFile(os.path.join(d, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys() if k != "model.norm.weight"}
    del f
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' is missing"):
        load_model(d)


def test_truncated_safetensors(tmp_path, ckpt_dir):
    d = copy_ckpt(ckpt_dir("qwen2"), tmp_path / "c")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match="truncated safetensors file"):
        load_model(d)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ValueError, match="truncated safetensors file"):
        load_model(d)


def test_sharded_index_with_missing_shard(tmp_path, ckpt_dir):
    model, _, tok = load_model(ckpt_dir("qwen2"))
    out = save_hf(model, tok, str(tmp_path / "s"), max_shard_bytes=20_000)
    second = sorted(n for n in os.listdir(out) if n.startswith("model-00002-of-"))[0]
    os.remove(os.path.join(out, second))
    with pytest.raises(FileNotFoundError, match="lists shard model-00002"):
        load_model(out)


def test_pickle_only_refused_unless_opted_in(tmp_path, ckpt_dir):
    src = ckpt_dir("qwen2")
    d = copy_ckpt(src, tmp_path / "p")
    os.remove(os.path.join(d, "model.safetensors"))
    ref = AutoModelForCausalLM.from_pretrained(src)
    torch.save(ref.state_dict(), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="only pickle weights .*allow_pickle=True"):
        load_model(d)
    model, _, _ = load_model(d, allow_pickle=True)
    want, _, _ = load_model(src)
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), np.asarray(want.lm_head.kernel[...]))
