"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """Factory: a cached random tiny HF checkpoint per (kind, options)."""
    from hf_fixtures import make_checkpoint

    cache: dict = {}
    root = tmp_path_factory.mktemp("ckpts")

    def make(kind: str = "qwen2", seed: int = 0, **kw) -> str:
        key = (kind, seed, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = make_checkpoint(str(root / f"{kind}_{len(cache)}"), kind, seed=seed, **kw)
        return cache[key]

    return make
