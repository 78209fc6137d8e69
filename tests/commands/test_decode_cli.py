"""`jaxrast decode`: JSONL output, resume after SIGKILL, configs, modes and errors."""

import json
import signal
import subprocess
import sys
import time

import pytest

from jaxrast.cli import build_parser, main
from jaxrast.commands.decode import config_from_args
from jaxrast.data.jsonl import read_finished

SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64)


@pytest.fixture(scope="module")
def paths(ckpt_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "questions.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"id": f"q{i}", "question": "abc " * (1 + i % 7)}) + "\n")
    return dict(base=ckpt_dir("qwen2", seed=1), rl=ckpt_dir("qwen2", seed=2, **SMALL),
                ref=ckpt_dir("qwen2", seed=3, **SMALL), data=str(data))


def decode_args(paths, out, *extra):
    return ["decode", "--base", paths["base"], "--pair", paths["rl"], paths["ref"], "0.5", "--dataset", paths["data"],
            "--prompt-template", "{question}", "--n", "2", "--max-new-tokens", "24", "--batch-size", "2",
            "--seed", "3", "--out", str(out), "--no-progress", *extra]


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def test_kill_mid_run_and_rerun_yields_each_row_once(paths, tmp_path):
    reference = tmp_path / "uninterrupted.jsonl"
    assert main(decode_args(paths, reference)) == 0
    want = {(r["id"], r["sample"]): r["completion"] for r in read_rows(reference)}
    assert len(want) == 48

    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "jaxrast.cli", *decode_args(paths, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(out.read_bytes().splitlines())
    assert 6 <= partial < 48, partial
    with open(out, "a") as f:  # a torn last line, as a crash mid-write leaves
        f.write('{"id": "q2', )
    assert main(decode_args(paths, out)) == 0
    rows = read_rows(out)
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 48
    assert {k: r["completion"] for k, r in zip(keys, rows)} == want


def test_rows_and_modes(paths, tmp_path, capsys):
    out = tmp_path / "rast.jsonl"
    assert main(decode_args(paths, out, "--limit", "3")) == 0
    row = read_rows(out)[0]
    assert set(row) >= {"id", "prompt", "sample", "completion", "num_tokens", "finish_reason", "seed", "mode", "lam"}
    assert row["mode"] == "rast" and row["lam"] == [0.5] and row["prompt"] == "abc "
    # base mode never loads the small models: bogus pair paths are fine
    base_out = tmp_path / "base.jsonl"
    args = decode_args(paths, base_out, "--limit", "2", "--mode", "base")
    args[args.index(paths["rl"])] = "/nonexistent/rl"
    assert main(args) == 0
    assert {r["mode"] for r in read_rows(base_out)} == {"base"}
    # rl mode decodes the RL model alone; the base is not loaded
    rl_out = tmp_path / "rl.jsonl"
    args = decode_args(paths, rl_out, "--limit", "2", "--mode", "rl", "--temperature", "0")
    args[args.index(paths["base"])] = "/nonexistent/base"
    assert main(args) == 0
    assert len(read_rows(rl_out)) == 4


def test_config_file_with_overrides(paths, tmp_path):
    cfg = tmp_path / "decode.yaml"
    cfg.write_text(f"base: {paths['base']}\npairs:\n  - [{paths['rl']}, {paths['ref']}, 0.7]\n"
                   f"dataset: {paths['data']}\nprompt_template: '{{question}}'\nmax_new_tokens: 8\nbatch_size: 4\n")
    out = tmp_path / "cfg.jsonl"
    assert main(["decode", "--config", str(cfg), "--set", "limit=2", "--set", f"out={out}", "--temperature", "0",
                 "--no-progress"]) == 0
    rows = read_rows(out)
    assert len(rows) == 2 and rows[0]["lam"] == [0.7] and rows[0]["temperature"] == 0.0


def test_mismatched_rerun_and_bad_input_errors(paths, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert main(decode_args(paths, out, "--limit", "1")) == 0
    assert main(decode_args(paths, out, "--limit", "1", "--seed", "4")) == 2
    assert "already holds rows of another run (seed: file 3, now 4)" in capsys.readouterr().err
    for changed, diff in [(["--top-k", "5"], "top_k: file 0, now 5"), (["--lam-schedule", "first:3"], "lam_schedule"),
                          (["--stop", "#"], "stop:"), (["--prompt-template", "Q: {question}"], "prompt_template")]:
        assert main(decode_args(paths, out, "--limit", "2", *changed)) == 2  # no rows of other settings mixed in
        assert diff in capsys.readouterr().err
    assert len(read_rows(out)) == 2
    assert main(decode_args(paths, tmp_path / "t.jsonl", "--prompt-template", "paper")) == 2
    assert "the tokenizer cannot encode" in capsys.readouterr().err  # a character vocabulary lacks 'Q', "'"
    assert main(decode_args(paths, tmp_path / "s.jsonl", "--seed", str(2**31))) == 2
    assert "--seed: input should be less than 2147483648" in capsys.readouterr().err
    assert main(["decode", "--base", paths["base"], "--lam", "0.3", "--out", str(tmp_path / "l.jsonl")]) == 2
    assert "--lam weights the pair given by --rl/--ref" in capsys.readouterr().err
    assert main(decode_args(paths, tmp_path / "y.jsonl", "--mode", "rast", "--dataset", "nope.jsonl")) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["decode", "--mode", "rast", "--base", paths["base"], "--out", str(tmp_path / "z.jsonl")]) == 2
    assert "needs a pair" in capsys.readouterr().err
    assert main(decode_args(paths, tmp_path / "w.jsonl", "--mesh", "3,3")) == 2
    assert "DATA,FSDP,TENSOR" in capsys.readouterr().err
    assert main(decode_args(paths, tmp_path / "v.jsonl", "--prompt-template", "{problem}")) == 2
    assert "problem" in capsys.readouterr().err


def test_read_finished_truncates_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    run = {"seed": 0, "mode": "base", "lam": [], "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4}
    path.write_text(json.dumps({"id": "a", "sample": 0, **run}) + "\n" + '{"id": "b", "sam')
    assert read_finished(str(path), run) == {("a", 0)}
    assert path.read_text().endswith("}\n")


def test_stop_flag_unescapes_backslashes_and_keeps_other_text():
    args = build_parser().parse_args(["decode", "--stop", "问题：", "--stop", "\\n\\nÜbung"])
    assert config_from_args(args).stop == ("问题：", "\n\nÜbung")


def test_rl_ref_lam_flags_make_one_pair():
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["decode", "--base", "b", "--rl", "r", "--ref", "f", "--lam", "0.3"]))
    assert cfg.pairs == (("r", "f", 0.3),) and cfg.resolved_mode() == "rast"
    cfg = config_from_args(build_parser().parse_args(["decode", "--base", "b", "--rl", "r", "--ref", "f"]))
    assert cfg.pairs == (("r", "f", 1.0),)
