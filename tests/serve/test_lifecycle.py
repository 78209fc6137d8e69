"""A server's boundaries: the API key, SIGTERM (drain, then exit 0), and the CLI."""

import os
import signal
import subprocess
import sys
import threading

import openai
import pytest
from hf_fixtures import REPO
from serve_fixtures import free_port, get_json, post, running, wait_until

from jaxrast.serve.config import ServeConfig
from jaxrast.serve.server import build_service


def test_a_wrong_or_missing_api_key_gets_401(ckpt_dir, monkeypatch):
    service, app = build_service(ServeConfig(base=ckpt_dir("qwen2"), max_slots=2, max_len=64, api_key="s3cret"))
    with running(app) as url:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            code, err, _ = post(url + "/v1/completions", {"model": "jaxrast", "prompt": "ab", "max_tokens": 2}, headers)
            assert code == 401 and err["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="jaxrast", prompt="ab", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        assert get_json(url + "/health")["status"] == "ok"  # health needs no key


def test_sigterm_finishes_running_requests_and_exits_0(ckpt_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), JAX_PLATFORMS="cpu",
               XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "jaxrast", "serve", "--base", ckpt_dir("qwen2"), "--port", str(port),
                             "--max-slots", "2", "--max-len", "1600", "--grace", "30"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(url), 120), proc.stderr.read() if proc.poll() is not None else "no start"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        result = {}

        def long_request():
            result["r"] = client.completions.create(model="jaxrast", prompt="abc", max_tokens=1500, temperature=1.0,
                                                    extra_body={"min_tokens": 1500})  # seconds of decoding

        worker = threading.Thread(target=long_request)
        worker.start()
        assert wait_until(lambda: get_json(url + "/health")["running"] == 1, 30)
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert proc.wait(60) == 0
        # the request that was running when SIGTERM came finished within the grace period
        assert result["r"].choices[0].finish_reason == "length" and result["r"].usage.completion_tokens == 1500
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _up(url: str) -> bool:
    try:
        return get_json(url + "/health", timeout=2)["status"] == "ok"
    except OSError:
        return False


def test_serve_refuses_bad_settings_before_loading(capsys):
    from jaxrast.cli import main

    assert main(["serve", "--port", "8000"]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["serve", "--base", "x", "--max-slots", "0"]) == 2
    assert "--max-slots" in capsys.readouterr().err


def test_an_exposed_server_needs_a_key_and_the_key_can_come_from_a_file(capsys, tmp_path, monkeypatch):
    from jaxrast.cli import build_parser, main
    from jaxrast.commands.serve import config_from_args

    monkeypatch.delenv("JAXRAST_API_KEY", raising=False)
    assert main(["serve", "--base", "x", "--host", "0.0.0.0"]) == 2  # refused before loading anything
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--base", "x", "--api-key-file", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "key").write_text("from-a-file\n")
    args = build_parser().parse_args(["serve", "--base", "x", "--api-key-file", str(tmp_path / "key"),
                                      "--max-body-bytes", "1000", "--read-timeout", "2"])
    cfg = config_from_args(args)
    assert (cfg.api_key, cfg.max_body_bytes, cfg.read_timeout) == ("from-a-file", 1000, 2.0)
