"""`jaxrast plan` fed bad inputs (issue 19): negative or zero sizes ("fits: yes" with negative
GB before), non-finite memory and λ, an impossible mesh and broken configs are refused with
exit 2 and a message naming the flag or file; no file changes."""

from __future__ import annotations

import json

import pytest
from refusals import assert_refused

BASE = "Qwen2.5-0.5B"  # an embedded config: no files needed


def plan(*extra):
    return ["plan", "--base", BASE, *extra]


def _broken_config(text):
    def make(tmp):
        d = tmp / "ckpt"
        d.mkdir()
        (d / "config.json").write_text(text)
        return ["plan", "--base", str(d)]
    return make


CASES = {
    "--batch -1": (lambda t: plan("--batch", "-1"), r"--batch: input should be greater than or equal to 1, got -1"),
    "--batch 0 (fell back to 16)": (lambda t: plan("--batch", "0"), r"--batch: input should be greater"),
    "--prompt-len -100": (lambda t: plan("--prompt-len", "-100"), r"--prompt-len: input should be greater"),
    "--new-tokens -5": (lambda t: plan("--new-tokens", "-5"), r"--new-tokens: input should be greater"),
    "--micro-batch -1": (lambda t: plan("--micro-batch", "-1"), r"--micro-batch: input should be greater"),
    "--seq-len -1": (lambda t: plan("--seq-len", "-1"), r"--seq-len: input should be greater"),
    "--rollout-batch -1": (lambda t: plan("--rollout-batch", "-1"), r"--rollout-batch: input should be greater"),
    "--device-memory -16": (lambda t: plan("--device-memory", "-16"), r"--device-memory: input should be greater"),
    "--device-memory nan": (lambda t: plan("--device-memory", "nan"), r"--device-memory: input should be a finite"),
    "--usable nan": (lambda t: plan("--usable", "nan"), r"--usable: input should be a finite number"),
    "--mesh with a 0": (lambda t: plan("--mesh", "1,0,1"), r"mesh '1,0,1': every size must be >= 1"),
    "NaN λ": (lambda t: plan("--pair", BASE, BASE, "nan"), r"--pair \S+ \S+ LAM: λ must be a finite number"),
    "config.json is a list": (_broken_config("[1, 2]"), r"config.json: expected a JSON object of model settings"),
    "config.json with a negative size": (_broken_config(json.dumps(
        {"model_type": "qwen2", "vocab_size": 10, "hidden_size": -64, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 1})), r"config.json: hidden_size must be a whole number >= 1, got -64"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_and_change_nothing(tmp_path, capsys, case):
    make, match = CASES[case]
    assert_refused(make(tmp_path), match, capsys, tmp_path)
