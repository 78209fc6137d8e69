"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for the session and the commands it runs (inherited by
# subprocesses): jitted programs are cached per Python object, so every test's new engine
# would otherwise compile programs identical to an earlier test's. Loaded executables are
# what a fresh compile gives; the cache starts empty each session and is removed after it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxrast-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
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


# The files that take longest (~100-220 s each on 2 cores) run first: workers take whole files
# (--dist loadfile) in collection order, and one started last would leave the others idle.
LONGEST_FIRST = ("project/test_docs.py", "rast/test_engine.py", "runtime/test_multihost.py",
                 "serve/test_real_clients.py", "rast/test_decoding.py", "grpo/test_grpo_train.py",
                 "rast/test_speculative.py", "models/test_transformer.py", "models/test_gemma3_real.py")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), here), len(rank)))  # stable


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most one per 6 GiB of memory
    (a worker holding 8 fake devices' decoding programs peaks near 6 GiB), at most 4 (the
    suite's longest file sets the floor beyond that)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 6 << 30
    return max(1, min(cores, memory // (6 << 30), 4))
