"""`jaxrast train` fed bad inputs (issue 19): config errors are messages naming the file or the
--set key, an unusable or busy output_dir is refused before the models load, and a step
that goes NaN/inf stops the run before a checkpoint of it is written (the last good one
stays)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_fixtures import SMALL
from refusals import assert_refused, snapshot, tree

from jaxrast.cli import main


@pytest.fixture(scope="module")
def setup(ckpt_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_train")
    rows = tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "question": "abc " * (1 + i % 3), "answer": "1"}) + "\n"
                            for i in range(8)))
    config = tmp / "grpo.yaml"
    config.write_text(f"""
model: {{path: {ckpt_dir("qwen2", seed=2, **SMALL)}}}
data: {{source: {rows}, template: "{{question}}", max_prompt_tokens: 32}}
rollout: {{prompts_per_step: 2, group_size: 2, max_new_tokens: 4, batch_size: 4}}
loss: {{micro_batch_size: 4}}
optim: {{lr: 0.001}}
mesh: {{data: 1, fsdp: 1, tensor: 1}}
rewards: {{math: 1.0}}
reward_workers: 0
steps: 1
save_every: 1
async_checkpointing: false
export_hf: false
progress: false
""")
    return dict(config=str(config), tmp=tmp)


def train(s, out, *sets, resume=False):
    return ["train", "--config", s["config"], *(["--resume"] if resume else []), "--set", f"output_dir={out}", *sets]


def _yaml(text):
    def make(s, tmp):
        bad = tmp / "bad.yaml"
        bad.write_text(text)
        return ["train", "--config", str(bad)]
    return make


def _busy(s, tmp):
    out = tmp / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time\n"
                               f"f = open({str(out / '.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return train(s, out), holder


def _no_resume(s, tmp):
    out = tmp / "done"
    (out / "checkpoints" / "1").mkdir(parents=True)
    (out / "checkpoints" / "1" / "x").write_text("a checkpoint")
    return train(s, out)


CASES = {
    "config YAML syntax error": (_yaml("model:\n  path: [unclosed\n"), r"bad.yaml is not valid YAML: .* at line 3"),
    "config is not a mapping": (_yaml("- steps\n"), r"bad.yaml: a config must be a YAML mapping"),
    "--set value is broken YAML": (lambda s, t: train(s, t / "o", "optim.lr=[1,"),
                                   r"override 'optim.lr=\[1,': the value is not valid YAML"),
    "NaN reward weight": (lambda s, t: train(s, t / "o", "rewards.math=nan"),
                          r"--set rewards.math: input should be a finite number"),
    "inf learning rate": (lambda s, t: train(s, t / "o", "optim.lr=inf"), r"--set optim.lr: input should be a finite"),
    "empty stop string": (lambda s, t: train(s, t / "o", "rollout.stop_strings=''"),
                          r"--set rollout.stop_strings\[0\]: expected a non-empty string"),
    "mesh size 0": (lambda s, t: train(s, t / "o", "mesh.fsdp=0"), r"--set mesh.fsdp: a mesh size must be >= 1"),
    "negative steps": (lambda s, t: train(s, t / "o", "steps=-1"), r"--set steps: input should be greater"),
    "output_dir is a file": (lambda s, t: train(s, s["config"]), r"output_dir .*grpo.yaml is a file, not a directory"),
    "output_dir holds checkpoints, no --resume": (_no_resume, r"done already holds checkpoints \(steps \[1\]\); pass "
                                                              r"--resume"),
    "dataset neither benchmark nor path": (lambda s, t: train(s, t / "o", "data.source=gsm9k"),
                                          r"no such file: gsm9k; it is neither a shipped benchmark"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_and_change_nothing(setup, tmp_path, capsys, case):
    make, match = CASES[case]
    assert_refused(make(setup, tmp_path), match, capsys, tmp_path, setup["tmp"])


def test_a_second_trainer_of_the_same_output_dir_is_refused(setup, tmp_path, capsys):
    args, holder = _busy(setup, tmp_path)
    try:
        assert_refused(args, r"output_dir .*busy is being written by another running jaxrast process", capsys,
                       tmp_path, setup["tmp"])
    finally:
        holder.kill()
        holder.wait()


def test_a_non_finite_step_stops_before_its_checkpoint_and_the_last_good_one_stays(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(setup, out)) == 0  # step 1: fine, checkpointed
    good = snapshot(out / "checkpoints")
    assert tree(out / "checkpoints")[0].startswith("1/")
    # 1e39 is a finite float, but inf in float32: the update at step 2 makes the parameters inf/NaN
    err = assert_refused(train(setup, out, "steps=3", "optim.lr=1e39", resume=True),
                         r"step 2: parameters became NaN or infinite .*stopped before writing a checkpoint of it\. "
                         r"The last good checkpoint, step 1 in \S+checkpoints, is kept", capsys, out / "checkpoints")
    assert "Lower optim.lr" in err
    assert snapshot(out / "checkpoints") == good
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the bad step's metrics are kept for the diagnosis
