"""`jaxrast train`: SIGKILL mid-run and --resume replays an uninterrupted run;
SIGTERM finishes the step and checkpoints; `jaxrast plot-train` draws the curves."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from grpo_toy import toy_policy, toy_rows
from hf_fixtures import REPO

from jaxrast.cli import main
from jaxrast.grpo.log import TIMING_KEYS, read_metrics
from jaxrast.models.hf import save_hf

ROOT = REPO
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config path, env): a toy HF checkpoint, JSONL data and a config with β>0, μ=2, warm-up.

    The trainer subprocesses inherit the session's compilation cache (tests/conftest.py): they
    load the programs the first run compiled instead of compiling them again."""
    root = tmp_path_factory.mktemp("resume")
    model, tok = toy_policy(seed=1)
    save_hf(model, tok, str(root / "toy_hf"))
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in toy_rows())
    config = root / "toy.yaml"
    config.write_text(f"""
model: {{path: {root / 'toy_hf'}}}
data: {{source: {root / 'rows.jsonl'}, template: "{{question}}"}}
rollout: {{prompts_per_step: 8, group_size: 8, max_new_tokens: 8, batch_size: 64, temperature: 0.9}}
loss: {{micro_batch_size: 16, iterations: 2, beta: 0.05, epsilon_high: 0.28}}
optim: {{lr: 0.01, warmup_steps: 3, min_lr_ratio: 0.1}}
mesh: {{data: 1, fsdp: 1, tensor: 1}}
rewards: {{"grpo_toy:a_reward": 1.0}}
steps: {STEPS}
save_every: 1
keep_checkpoints: 2
progress: false
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    return str(config), env, root


def launch(setup, out, *extra):
    config, env, _ = setup
    cmd = [sys.executable, "-m", "jaxrast.cli", "train", "--config", config, "--set", f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_here(setup, capsys, out, *extra) -> str:
    """`jaxrast train` in this process; returns stdout."""
    config, _, _ = setup
    capsys.readouterr()
    code = main(["train", "--config", config, "--set", f"output_dir={out}", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def signal_after(proc, metrics: str, lines: int, sig) -> None:
    """Sends `sig` once `metrics` holds `lines` steps."""
    while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= lines):
        assert proc.poll() is None, f"trainer exited before step {lines}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.02)
    proc.send_signal(sig)


def finish(proc) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(setup, tmp_path, capsys):
    """The runs that get a signal are `python -m jaxrast.cli` subprocesses; the uninterrupted
    reference, the last resume and plot-train run in this process (another process than the
    killed one's, as before, without paying the start-up of three more)."""
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    run_here(setup, capsys, ref_dir)
    reference = read_metrics(ref_dir / "metrics.jsonl")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    proc = launch(setup, run_dir)
    signal_after(proc, str(run_dir / "metrics.jsonl"), 3, signal.SIGKILL)
    proc.wait()
    # SIGTERM: the run finishes its step, checkpoints it and exits cleanly
    proc = launch(setup, run_dir, "--resume")
    signal_after(proc, str(run_dir / "metrics.jsonl"), 5, signal.SIGTERM)
    out = finish(proc)
    resumed_from = int(re.search(r"resumed from step (\d+)", out).group(1))
    assert 1 <= resumed_from <= 3
    logged = read_metrics(run_dir / "metrics.jsonl")
    stopped_at = logged[-1]["step"]
    assert 5 <= stopped_at < STEPS and not (run_dir / "hf").exists()
    steps_saved = sorted(int(p) for p in os.listdir(run_dir / "checkpoints") if p.isdigit())
    assert steps_saved[-1] == stopped_at  # the exit checkpoint

    out = run_here(setup, capsys, run_dir, "--resume")
    assert f"resumed from step {stopped_at}" in out
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no duplicates after truncation
    pairs = list(zip(comparable(reference), comparable(resumed)))
    assert all(a.keys() == b.keys() for a, b in pairs)
    worst = max(abs(a[k] - b[k]) for a, b in pairs for k in a)
    print(f"killed at step 3 (checkpoint {resumed_from}), stopped at {stopped_at}; max |metric diff| = {worst:.1e}")
    assert worst <= 1e-6
    assert (run_dir / "hf" / "model.safetensors").exists()

    png = tmp_path / "curves.png"
    assert main(["plot-train", str(ref_dir), str(run_dir), "--out", str(png)]) == 0, capsys.readouterr().err
    assert png.stat().st_size > 10_000


def test_cli_errors_name_the_problem(setup, tmp_path, capsys):
    """The CLI entry point in this process (the subprocess above already runs `python -m jaxrast.cli`)."""
    config, _, _ = setup
    assert main(["train", "--config", config, "--set", "loss.aggregation=mean"]) == 2
    assert "loss.aggregation must be one of" in capsys.readouterr().err
    assert main(["plot-train", str(tmp_path / "nowhere")]) == 2
    assert "no metrics file" in capsys.readouterr().err
