"""Multi-process runs: 2 local processes × 4 fake CPU devices (gloo collectives) give the
same greedy RAST rows and the same first GRPO step as one process with 8 devices; the
helpers of `jaxrast.runtime.distributed` are pass-throughs in one process; bad setups are named."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from grpo_toy import toy_rows
from hf_fixtures import REPO
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrast.cli import main
from jaxrast.grpo.log import TIMING_KEYS, read_metrics
from jaxrast.runtime import distributed
from jaxrast.runtime.mesh import make_mesh

ROOT = REPO
SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=2, inter=64)  # kv heads split over tensor=2
TIMEOUT_S = 240  # a hung collective fails the test instead of hanging it


@pytest.fixture(scope="module")
def setup(ckpt_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    questions = root / "questions.jsonl"
    with open(questions, "w") as f:
        # prompts of one length bucket, one batch: a single compilation of the decode loop
        f.writelines(json.dumps({"id": f"q{i}", "question": "abc " * (1 + i % 3)}) + "\n" for i in range(8))
    rows = root / "rows.jsonl"
    with open(rows, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in toy_rows())
    config = root / "grpo.yaml"
    # β > 0 and μ = 2 exercise the scoring passes (reference and old log-probs) as well as the update
    config.write_text(f"""
model: {{path: {ckpt_dir("qwen2")}}}
data: {{source: {rows}, template: "{{question}}"}}
rollout: {{prompts_per_step: 4, group_size: 4, max_new_tokens: 8, batch_size: 16}}
loss: {{micro_batch_size: 8, iterations: 2, beta: 0.05}}
optim: {{lr: 0.01}}
mesh: {{data: 2, fsdp: 4, tensor: 1}}
rewards: {{"grpo_toy:a_reward": 1.0}}
steps: 1
progress: false
""")
    return dict(base=ckpt_dir("qwen2", seed=1), rl=ckpt_dir("qwen2", seed=2, **SMALL),
                ref=ckpt_dir("qwen2", seed=3, **SMALL), questions=str(questions), config=str(config))


def decode_args(s, out):
    """Greedy RAST over a (fsdp, tensor) = (4, 2) mesh: the batch and the weights span both processes."""
    return ["decode", "--base", s["base"], "--pair", s["rl"], s["ref"], "0.5", "--dataset", s["questions"],
            "--prompt-template", "{question}", "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "8",
            "--mesh", "1,4,2", "--save-token-ids", "--trace-rows", "q1", "--no-progress", "--out", str(out)]


def train_args(s, out):
    return ["train", "--config", s["config"], "--set", f"output_dir={out}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(args: list[str], n: int = 2, devices: int = 4, via_env: bool = False,
                  status: int = 0, env_of: dict[int, dict[str, str]] | None = None) -> list[tuple[str, str]]:
    """Runs `jaxrast ARGS` as n local processes of `devices` CPU devices each, expecting exit
    `status` from each; returns their (stdout, stderr). Coordinates by flags, or by the JAX_*
    variables with via_env. On timeout every process group is killed, so a deadlock fails
    instead of hanging the suite."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    procs = []
    for i in range(n):
        setup = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        env_i = dict(env, **(env_of or {}).get(i, {}))
        if via_env:
            env_i.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
            setup = []
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxrast.cli", *args, *setup], env=env_i,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    deadline, outputs = time.time() + TIMEOUT_S, []
    try:
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
            assert proc.returncode == status, f"process {i} exited {proc.returncode}:\n{err[-3000:]}"
            outputs.append((out, err))  # stdout also holds gloo's (interleaved) connection notes
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[:1])}: {n} processes did not finish in {TIMEOUT_S}s (a hung collective?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return outputs


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def assert_close(a, b, tol: float) -> None:
    """Equal JSON values, floats within `tol` (sums in another order differ in the last digits)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key], tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=tol)
    else:
        assert a == b


@pytest.mark.slow
def test_two_processes_decode_and_train_like_one(setup, tmp_path):
    t0 = time.perf_counter()
    assert main(decode_args(setup, tmp_path / "one.jsonl")) == 0  # this process: 8 devices
    assert main(train_args(setup, tmp_path / "one_train")) == 0
    t1 = time.perf_counter()
    (out0, _), (out1, _) = run_processes(decode_args(setup, tmp_path / "two.jsonl"))
    assert "8 rows written" in out0 and "rows written" not in out1  # process 0 alone reports
    t2 = time.perf_counter()
    run_processes(train_args(setup, tmp_path / "two_train"), via_env=True)
    t3 = time.perf_counter()

    one, two = read_rows(tmp_path / "one.jsonl"), read_rows(tmp_path / "two.jsonl")
    assert len(two) == 8  # written once, by process 0
    assert two == one
    trace_one, trace_two = read_rows(tmp_path / "one.trace.jsonl"), read_rows(tmp_path / "two.trace.jsonl")
    assert len(trace_two) == 1  # teacher forcing across processes too: same tokens, values to 1e-5
    assert_close(trace_two, trace_one, 1e-5)
    first, again = read_metrics(tmp_path / "one_train" / "metrics.jsonl"), \
        read_metrics(tmp_path / "two_train" / "metrics.jsonl")
    assert [m["step"] for m in again] == [1]  # one line: process 1 wrote nothing
    print(f"1 process: {t1 - t0:.1f}s, 2 processes: decode {t2 - t1:.1f}s, train {t3 - t2:.1f}s; "
          f"decode rows identical: {two == one}; "
          f"first-step loss {first[0]['loss']:.8f} vs {again[0]['loss']:.8f} "
          f"(diff {abs(first[0]['loss'] - again[0]['loss']):.1e})")
    assert again[0]["loss"] == pytest.approx(first[0]["loss"], abs=1e-5)
    for key in set(first[0]) - set(TIMING_KEYS):
        assert again[0][key] == pytest.approx(first[0][key], abs=1e-5, rel=1e-5), key
    # orbax's multi-process protocol wrote one checkpoint; process 0 exported the HF model
    assert sorted(os.listdir(tmp_path / "two_train" / "checkpoints")) == ["1"]
    assert (tmp_path / "two_train" / "hf" / "model.safetensors").exists()


def test_an_error_on_process_0_reaches_every_process(setup, tmp_path):
    """Only process 0 reads the output file; when it refuses the file (rows of another run),
    process 1 gets the same error instead of waiting for it in a collective."""
    out = tmp_path / "other_run.jsonl"
    out.write_text(json.dumps({"id": "q0", "sample": 0, "seed": 5}) + "\n")
    for _, err in run_processes(decode_args(setup, out), status=2):
        assert "already holds rows of another run" in err


def test_a_user_error_on_one_process_stops_the_others(setup, tmp_path):
    """The base exists only in process 0's home: process 1's clean error must reach process 0
    at once, not after the runtime's 5-minute barrier timeout."""
    for i in (0, 1):
        (tmp_path / f"home{i}").mkdir()
    shutil.copytree(setup["base"], tmp_path / "home0" / "base")
    args = decode_args(setup, tmp_path / "out.jsonl")
    args[args.index(setup["base"])] = "~/base"
    t0 = time.time()
    outputs = run_processes(args, status=2, env_of={i: {"HOME": str(tmp_path / f"home{i}")} for i in (0, 1)})
    assert time.time() - t0 < 120
    assert "does not exist" in outputs[1][1] and "failed on another process" in outputs[0][1]


# ---- the helpers in one process ---------------------------------------------------------------

def ns(**kw) -> argparse.Namespace:
    base = dict(coordinator=None, num_processes=None, process_id=None, distributed=None)
    return argparse.Namespace(**{**base, **kw})


def test_resolve_precedence_and_auto_detection():
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert distributed.resolve(ns(), {}) is None
    assert distributed.resolve(ns(), env) == distributed.Settings("h0:1234", 4, 2)
    # a flag wins over its variable, value by value
    assert distributed.resolve(ns(process_id=3, coordinator="h1:9"), env) == distributed.Settings("h1:9", 4, 3)
    assert distributed.resolve(ns(num_processes=1), {}) is None  # one process: nothing to start
    assert distributed.resolve(ns(distributed=False), env) is None
    assert distributed.resolve(ns(), {**env, "JAXRAST_DISTRIBUTED": "0"}) is None
    # --distributed leaves what is unset to JAX's cluster detection (TPU VM, SLURM, Open MPI)
    assert distributed.resolve(ns(distributed=True), {}) == distributed.Settings()
    assert distributed.resolve(ns(), {"JAXRAST_DISTRIBUTED": "1"}) == distributed.Settings()
    srun = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert distributed.resolve(ns(), srun) == distributed.Settings()
    assert distributed.resolve(ns(), {**srun, "SLURM_STEP_NUM_TASKS": "1"}) is None


@pytest.mark.parametrize("kw, env, match", [
    (dict(num_processes=2), {}, "missing --coordinator HOST:PORT and --process-id I"),
    (dict(coordinator="h:1", process_id=0), {}, "missing --num-processes N"),
    (dict(num_processes=2, process_id=2, coordinator="h:1"), {}, "process-id must be in 0..1"),
    (dict(), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    (dict(), {"JAXRAST_DISTRIBUTED": "maybe"}, "JAXRAST_DISTRIBUTED"),
])
def test_half_configured_setups_name_the_fix(kw, env, match):
    with pytest.raises(ValueError, match=match) as err:
        distributed.resolve(ns(**kw), env)
    if "missing" in match:
        assert "--distributed" in str(err.value)  # the other way out: cluster detection


def test_cli_reports_an_incomplete_setup(tmp_path, capsys):
    assert main(["decode", "--base", "x", "--num-processes", "2", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "missing --coordinator" in capsys.readouterr().err


def test_helpers_are_pass_throughs_in_one_process():
    assert distributed.maybe_initialize(ns()) is False
    assert distributed.process_count() == 1 and distributed.is_main()
    mesh = make_mesh(1, 4, 2)
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    placed = distributed.put_global(x, sharding)
    assert placed.sharding == sharding
    np.testing.assert_array_equal(np.asarray(placed), np.asarray(jax.device_put(x, sharding)))
    back = distributed.host_array({"x": placed, "n": np.int32(3), "s": jax.numpy.float32(2.5)})
    assert isinstance(back["x"], np.ndarray) and back["n"] == 3 and back["s"] == 2.5
    np.testing.assert_array_equal(back["x"], x)
    assert distributed.any_process(True) and not distributed.any_process(False)
    value = {"done": [["q1", 0]], "n": 2}
    assert distributed.broadcast_json(value) == value
