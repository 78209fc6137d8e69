"""Every shipped YAML config parses onto its dataclass (typos in configs/ fail CI)."""

import glob
import os

import pytest
from hf_fixtures import REPO

from jaxrast.commands.decode_job import DecodeConfig
from jaxrast.runtime.config import load_config

ROOT = os.path.join(REPO, "configs")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "decode_*.yaml"))))
def test_decode_configs_parse(path):
    cfg = load_config(DecodeConfig, path)
    assert cfg.resolved_mode() in ("base", "rl", "rast")
