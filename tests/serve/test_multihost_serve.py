"""A server on two local processes (2 × 4 CPU devices, the weights and slots split across
both) answers like one process with the same 8-device mesh."""

import os
import signal
import subprocess
import sys

import openai
import pytest
from hf_fixtures import REPO
from serve_fixtures import free_port, get_json, running, wait_until

from jaxrast.serve.config import ServeConfig
from jaxrast.serve.server import build_service

SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64)
PROMPTS = ["abc de", "hello world 12+3=", "x", "qq rr ss tt uu vv"]


def _up(url: str) -> bool:
    try:
        return get_json(url + "/health", timeout=2)["status"] == "ok"
    except OSError:
        return False


def _answers(url: str) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    greedy = client.completions.create(model="jaxrast", prompt=PROMPTS, max_tokens=16, temperature=0)
    sampled = client.completions.create(model="jaxrast", prompt=PROMPTS[1], max_tokens=16, temperature=1.0, n=3,
                                        seed=5, extra_body={"lam": 0.5})
    return [c.text for c in greedy.choices] + [c.text for c in sampled.choices]


@pytest.mark.slow
def test_two_processes_serve_like_one(ckpt_dir):
    base, rl, ref = ckpt_dir("qwen2", seed=1, init_range=0.1), ckpt_dir("qwen2", seed=2, **SMALL), \
        ckpt_dir("qwen2", seed=3, **SMALL)
    args = ["--base", base, "--pair", rl, ref, "0.8", "--mesh", "1,4,2", "--max-slots", "4", "--max-len", "64"]
    service, app = build_service(ServeConfig(base=base, pairs=((rl, ref, 0.8),), mesh="1,4,2", max_slots=4,
                                             max_len=64))
    with running(app) as url:
        one = _answers(url)

    port, coordinator = free_port(), free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    procs = [subprocess.Popen([sys.executable, "-m", "jaxrast", "serve", *args, "--port", str(port),
                               "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for i in range(2)]
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(url) or any(p.poll() is not None for p in procs), 240)
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-3000:] for p in procs]
        two = _answers(url)
        procs[0].send_signal(signal.SIGTERM)  # process 0 drains and tells the other to stop
        codes = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert codes == [0, 0]
    assert two == one
