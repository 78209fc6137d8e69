"""The decoding tests' shared models."""

import pytest
from hf_fixtures import SMALL

from jaxrast.models.hf import load_model
from jaxrast.runtime.mesh import make_mesh


@pytest.fixture(scope="module")
def trio(ckpt_dir):
    """(base, rl, ref, tokenizer) with a padded vocabulary (96 rows, 49 tokens)."""
    base, _, tok = load_model(ckpt_dir("qwen2", seed=1, vocab=96, init_range=0.1))
    rl, _, _ = load_model(ckpt_dir("qwen2", seed=2, vocab=96, **SMALL))
    ref, _, _ = load_model(ckpt_dir("qwen2", seed=3, vocab=96, **SMALL))
    return base, rl, ref, tok


@pytest.fixture(scope="module")
def mesh_trio(ckpt_dir):
    """The trio's shapes on 8 fake devices (fsdp 2 × tensor 4)."""
    mesh = make_mesh(fsdp=2, tensor=4)
    paths = [ckpt_dir("qwen2", seed=1, vocab=96, init_range=0.1), ckpt_dir("qwen2", seed=2, vocab=96, **SMALL),
             ckpt_dir("qwen2", seed=3, vocab=96, **SMALL)]
    (base, _, tok), (rl, _, _), (ref, _, _) = (load_model(p, mesh=mesh) for p in paths)
    return base, rl, ref, tok, mesh
