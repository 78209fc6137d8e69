"""Meshes over 8 fake CPU devices: same logits as one device (qwen2, qwen3, gemma3), params sharded
per the rule table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrast.models.attention_backend import AttentionBackend
from jaxrast.models.hf import load_model
from jaxrast.models.kv_cache import KVCache
from jaxrast.models.partitioning import TOKENS_SPEC, cache_sharding, fit_spec, path_str, rule_for, shard_model
from jaxrast.runtime.mesh import make_mesh


def test_eight_fake_devices():
    assert jax.device_count() == 8


# qwen3 at tensor=4: k_proj's layout splits its 2 kv heads of dim 24 mid-head, and q_norm / k_norm
# (replicated) must still normalise each whole head
# gemma3 as well: its four norms a block replicated, sliding and full layers on the mesh
@pytest.mark.parametrize("kind,fsdp,tensor", [("qwen2", 2, 4), ("qwen2", 4, 2), ("qwen3", 2, 4), ("gemma3", 2, 4)])
def test_mesh_logits_match_single_device(ckpt_dir, kind, fsdp, tensor):
    # Sharded matmuls sum in a different order, so float32 differences scale with the logits'
    # magnitude: at |z| <= ~3.5 (init 0.1) they are ~2e-6; at |z| ~ 7 (init 0.2) ~1.5e-5.
    d = ckpt_dir(kind, kv_heads=2, init_range=0.1, **(dict(head_dim=24) if kind != "qwen2" else {}))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 46, (4, 96)))
    single, _, _ = load_model(d)
    want, _ = jax.jit(lambda m, x: m(x))(single, ids)
    mesh = make_mesh(fsdp=fsdp, tensor=tensor)
    model, cfg, _ = load_model(d, mesh=mesh)
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = value[...]
        name = path_str(path)
        assert arr.sharding.spec == fit_spec(rule_for(name), arr.shape, mesh), name
        # the shard really is smaller along every sharded dimension
        shard = arr.addressable_shards[0].data.shape
        for dim, full, axes in zip(shard, arr.shape, tuple(rule_for(name)) + (None,) * 2):
            expect = full // (mesh.shape[axes] if axes else 1)
            assert dim == expect, (name, shard, arr.shape)
    batch_ids = jax.device_put(ids, NamedSharding(mesh, TOKENS_SPEC))
    got, _ = jax.jit(lambda m, x: m(x))(model, batch_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=f32_atol(want, cfg), rtol=0)

    cache = KVCache.init(cfg, batch=4, max_len=128)
    cache = jax.device_put(cache, cache_sharding(mesh, cache))
    kv_spec = P(("data", "fsdp"), "tensor" if cfg.num_key_value_heads % tensor == 0 else None, None, None)
    assert cache.k[0].sharding.spec == kv_spec
    logits, cache = jax.jit(lambda m, x, c: m(x, cache=c))(model, batch_ids, cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=f32_atol(want, cfg), rtol=0)
    if kind == "gemma3":  # the engine's backend per device under shard_map, each layer's window with it
        backend, bounds = AttentionBackend("xla_ragged", mesh), jnp.full((4,), 96, jnp.int32)
        fresh = jax.device_put(KVCache.init(cfg, batch=4, max_len=128), cache_sharding(mesh, cache))
        logits, _ = jax.jit(lambda m, x, c: m(x, cache=c, attention=backend, kv_len=bounds))(model, batch_ids, fresh)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=f32_atol(want, cfg), rtol=0)


def f32_atol(want, cfg) -> float:
    """How far two float32 programs' logits may differ when one splits the reductions over
    devices: a few ulps of the largest logit per sqrt(longest reduction) of partial sums."""
    return float(4 * np.finfo(np.float32).eps * np.sqrt(cfg.intermediate_size) * max(1.0, np.abs(want).max()))


def test_uneven_shapes_fall_back_to_replication(ckpt_dir):
    d = ckpt_dir("qwen2", vocab=50, kv_heads=1)  # 50 rows do not split over 4 tensor shards
    mesh = make_mesh(fsdp=2, tensor=4)
    with pytest.warns(UserWarning, match="not divisible"):
        model, cfg, _ = load_model(d, mesh=mesh)
    assert model.embed_tokens.embedding[...].sharding.spec == P(None, "fsdp")
    assert model.lm_head.kernel[...].sharding.spec == P("fsdp", None)
    single, _, _ = load_model(d)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 46, (2, 40)))
    want = np.asarray(single(ids)[0])
    np.testing.assert_allclose(np.asarray(model(ids)[0]), want, atol=f32_atol(want, cfg), rtol=0)


def test_shard_existing_model_and_single_device_mesh(ckpt_dir):
    model, _, _ = load_model(ckpt_dir("qwen2"))
    mesh = make_mesh(devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    shard_model(model, make_mesh(fsdp=-1))
    assert model.layers[0].self_attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="devices are available"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        make_mesh(data=0, fsdp=-1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="no partition rule"):
        rule_for("layers.0.mystery.kernel")
