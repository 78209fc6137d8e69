"""YAML configs onto dataclasses with dotted CLI overrides."""

import dataclasses

import pytest

from jaxrast.runtime.config import Texts, config_dataclass, load_config, save_config, to_dict


@config_dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@config_dataclass
class Run:
    name: str = "x"
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)
    stops: Texts = ()
    fast: bool = False
    limit: int | None = None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\noptim:\n  lr: 0.01\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Run, str(path), ["steps=3", "optim.lr=2e-5"])
    assert cfg == Run("demo", 3, Optim(2e-5, (0.8, 0.9)))
    save_config(cfg, str(tmp_path / "out.yaml"))
    assert load_config(Run, str(tmp_path / "out.yaml")) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"--set stpes: unknown key; valid keys"):
        load_config(Run, overrides=["stpes=3"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(Run, overrides=["steps"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Run, str(tmp_path / "missing.yaml"))


def test_values_are_checked_against_their_field_types():
    ok = load_config(Run, overrides=["steps=4.0", "stops=ab", "limit=null", "fast=true", "optim.betas=[1, 0.5]"])
    assert ok.steps == 4 and ok.stops == ("ab",) and ok.limit is None and ok.fast and ok.optim.betas == (1.0, 0.5)
    assert load_config(Run, overrides=["stops=[a, '#']"]).stops == ("a", "#")
    assert load_config(Run, overrides=["name=#1"]).name == "#1"  # not a YAML comment
    for override, match in [("steps=1.5", "whole number"), ("fast=yes please", "true or false"),
                            ("name={question}", "quote the value"), ("optim=3", "mapping of Optim"),
                            ("steps.x=1", "steps: input should be a valid integer"),
                            ("optim.lr=fast", "optim.lr: input should be a valid number"),
                            ("optim.betas=[1]", r"optim.betas\[1\]: field required"),
                            ("stops=[1]", r"stops\[0\]: input should be a valid string"),
                            ("limit=2.5", "whole number")]:
        with pytest.raises(ValueError, match=match):
            load_config(Run, overrides=[override])
    with pytest.raises(ValueError, match="is a value, not a section"):
        load_config(Run, overrides=["name=a", "name.x=1"])
