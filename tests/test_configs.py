"""Every shipped YAML config parses onto its dataclass (typos in configs/ fail CI)."""

import glob
import os

import pytest

from jaxrast.config_io import load_config
from jaxrast.decode_job import DecodeConfig

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "decode_*.yaml"))))
def test_decode_configs_parse(path):
    cfg = load_config(DecodeConfig, path)
    assert cfg.resolved_mode() in ("base", "rl", "rast")
