"""YAML configs onto dataclasses with dotted CLI overrides."""

import dataclasses

import pytest

from jaxrast.config_io import load_config, save_config, to_dict


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Run:
    name: str = "x"
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\noptim:\n  lr: 0.01\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Run, str(path), ["steps=3", "optim.lr=2e-5"])
    assert cfg == Run("demo", 3, Optim(2e-5, (0.8, 0.9)))
    save_config(cfg, str(tmp_path / "out.yaml"))
    assert load_config(Run, str(tmp_path / "out.yaml")) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stpes'\]"):
        load_config(Run, overrides=["stpes=3"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(Run, overrides=["steps"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Run, str(tmp_path / "missing.yaml"))
