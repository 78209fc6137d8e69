"""`jaxrast plan`: exact parameter counts from config.json, memory formulas, mesh shares, CLI."""

import dataclasses
import json
import math
import os

import jax
import pytest
from hf_fixtures import REPO
from jax.sharding import PartitionSpec as P

from jaxrast.cli import main
from jaxrast.models.config import ModelConfig
from jaxrast.models.hf import abstract_model
from jaxrast.models.partitioning import param_shardings, path_str, shard_shape
from jaxrast.plan.memory import (
    Buffer,
    DecodeShape,
    TrainShape,
    grpo_plan,
    param_buffers,
    param_count,
    param_shapes,
    rast_plan,
    resolve_config,
    smallest_mesh,
    totals,
)
from jaxrast.plan.presets import PRESETS, PUBLISHED_PARAMS
from jaxrast.runtime.mesh import make_mesh

GB = 1e9
SMALL = {
    "qwen2_untied": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True, vocab_size=50),
    "llama": dict(model_type="llama", num_key_value_heads=4),
    "llama_biases_head_dim": dict(model_type="llama", attention_bias=True, mlp_bias=True, head_dim=24),
    "qwen3_qk_norm_biases": dict(model_type="qwen3", attention_bias=True, head_dim=24),
    "gemma3_sandwich_norms": dict(model_type="gemma3_text", attention_bias=True, head_dim=24),
}


def small_cfg(**kw) -> ModelConfig:
    raw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2)
    return ModelConfig.from_hf_dict({**raw, **kw})


@pytest.mark.parametrize("name", sorted(SMALL))
def test_param_shapes_match_built_model(name):
    cfg = small_cfg(**SMALL[name])
    _, abstract = abstract_model(cfg)
    built = {path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    assert param_shapes(cfg) == built
    assert param_count(cfg) == sum(int(math.prod(s)) for s in built.values())


@pytest.mark.filterwarnings("ignore:.*not divisible")
@pytest.mark.parametrize("name", sorted(SMALL))
def test_per_device_params_match_real_shardings(name):
    cfg = small_cfg(**SMALL[name])  # vocab 50 and 3 layers exercise the replication fallback
    mesh = make_mesh(fsdp=2, tensor=4)
    _, abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh)
    real = sum(4 * math.prod(s.shard_shape(leaf.shape)) for leaf, s in
               zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)))
    planned = sum(b.per_device(dict(mesh.shape)) for b in param_buffers(cfg, 4))
    assert planned == real
    assert sum(b.total() for b in param_buffers(cfg, 4)) == 4 * param_count(cfg)


def test_shard_shape_falls_back_to_replication():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    assert shard_shape(P("tensor", "fsdp"), (50, 64), sizes) == (50, 32)
    assert shard_shape(P(("data", "fsdp"), None), (6, 10), sizes) == (3, 10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_published_counts(name):
    n = param_count(resolve_config(name))
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.005, n


def test_preset_facts_and_aliases():
    q32, q14, q15 = (resolve_config(n) for n in ("Qwen/Qwen2.5-32B", "Qwen2.5-14B", "qwen2.5-1.5b"))
    assert (q32.hidden_size, q32.num_hidden_layers, q32.num_attention_heads, q32.num_key_value_heads,
            q32.intermediate_size, q32.vocab_size, q32.tie_word_embeddings) == (5120, 64, 40, 8, 27648, 152064, False)
    assert (q14.num_hidden_layers, q14.intermediate_size, q14.vocab_size) == (48, 13824, 152064)
    assert (q15.hidden_size, q15.vocab_size, q15.tie_word_embeddings) == (1536, 151936, True)
    assert resolve_config("hkust-nlp/Qwen-2.5-14B-SimpleRL-Zoo") == q14
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_config("nobody/unknown-model")


def test_rast_32b_with_14b_pair():
    base, pair = resolve_config("Qwen/Qwen2.5-32B"), resolve_config("Qwen/Qwen2.5-14B")
    shape = DecodeShape(batch=16, prompt_len=512, new_tokens=1536, dtype="bfloat16")
    comps = rast_plan([("base", "32b", base), ("rl", "rl14", pair), ("ref", "ref14", pair)], shape)
    weights = sum(c.total() for c in comps if c.name.startswith("weights"))
    assert 124 * GB < weights < 126 * GB  # (32.76 + 2 × 14.77) B params × 2 bytes
    kv = {c.name: c.total() for c in comps if c.name.startswith("KV")}
    assert kv["KV cache 32b"] == 2 * 64 * 8 * 128 * 2 * 16 * 2048
    assert kv["KV cache rl14"] == 2 * 48 * 8 * 128 * 2 * 16 * 2048
    # a reference shared by two pairs is loaded (and cached) once
    shared = rast_plan([("base", "32b", base), ("rl", "a", pair), ("ref", "r", pair), ("rl", "b", pair),
                        ("ref", "r", pair)], shape)
    assert "weights r (ref, ref)" in [c.name for c in shared]
    assert sum(c.name.startswith("weights") for c in shared) == 4


def test_grpo_components_follow_dtypes():
    cfg = resolve_config("Qwen/Qwen2.5-32B")
    n = param_count(cfg)
    by = {c.name.split(" (")[0].split(" Qwen")[0]: c.total() for c in grpo_plan("Qwen/Qwen2.5-32B", cfg, TrainShape())}
    assert by["policy weights"] == 4 * n and by["gradients"] == 4 * n
    assert by["reference weights"] == 2 * n and by["Adam m + v"] == 8 * n
    half = TrainShape(master_dtype="bfloat16", optimizer_dtype="bfloat16")
    states = sum(c.total() for c in grpo_plan("b", cfg, half)[:4])
    assert states == 5 * 2 * n  # the paper's all-bf16 accounting: ~328 GB for 32B
    remat, full = (sum(c.total() for c in grpo_plan("b", cfg, dataclasses.replace(half, remat=r))[4:5])
                   for r in (True, False))
    assert remat < full / 10


def test_smallest_mesh_is_tight():
    cfg = resolve_config("Qwen/Qwen2.5-7B")
    comps = rast_plan([("base", "7b", cfg)], DecodeShape(batch=8))
    capacity = 16 * 2**30
    best = smallest_mesh(lambda _: comps, capacity)
    n = best["fsdp"] * best["tensor"]
    assert totals(comps, best)[1] <= capacity
    for t in (1, 2, 4, 8):
        if (n // 2) % t == 0:
            assert totals(comps, {"data": 1, "fsdp": n // 2 // t, "tensor": t})[1] > capacity
    assert Buffer((8, 4), 2, P(("data", "fsdp")), 3).per_device({"data": 2, "fsdp": 2, "tensor": 1}) == 3 * 2 * 2 * 4


def test_cli_table_and_json(capsys):
    argv = ["plan", "--base", "Qwen/Qwen2.5-32B", "--pair", "hkust-nlp/Qwen-2.5-14B-SimpleRL-Zoo",
            "Qwen/Qwen2.5-14B", "1.0", "--mesh", "1,8,1", "--device", "h100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RAST decoding" in out and "GRPO-training Qwen/Qwen2.5-32B" in out and "fits on 8 × h100" in out
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rast"]["fits"] and not report["grpo"]["fits"]
    weights = sum(c["total_bytes"] for c in report["rast"]["components"] if c["name"].startswith("weights"))
    assert round(weights / GB) == 125


def test_cli_reads_checkpoint_config_and_decode_yaml(tmp_path, capsys):
    cfg = small_cfg(model_type="qwen2", tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert main(["plan", "--base", str(tmp_path), "--json", "--device-memory", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rast"]["components"][0]["params"] == param_count(cfg)
    config = os.path.join(REPO, "configs", "decode_qwen2.5_7b_rast.yaml")
    assert main(["plan", "--config", config, "--mesh", "1,4,1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decode"]["new_tokens"] == 4096 and len(report["pairs"]) == 1


@pytest.mark.parametrize("argv,message", [
    (["--base", "nobody/missing"], "not in the local HuggingFace cache"),
    (["--base", "Qwen2.5-7B", "--mesh", "1,-1,1"], "give every size"),
    (["--base", "Qwen2.5-7B", "--device", "tpu9"], "unknown --device"),
    (["--base", "Qwen2.5-7B", "--pair", "Qwen2.5-1.5B"], "RL REF"),
])
def test_cli_errors_name_the_fix(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err
