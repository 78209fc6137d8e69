"""`jaxrast decode` fed bad inputs (issue 19): each is refused with exit 2 and a message that
names the problem, without a traceback and without changing any file; plus the faults
(Ctrl-C, a second writer, a peer that never starts) and the resume cases that must work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from hf_fixtures import REPO, SMALL, write_questions
from refusals import assert_refused, jsonl_lines, snapshot

from jaxrast.cli import main


@pytest.fixture(scope="module")
def paths(ckpt_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_decode")
    data = write_questions(tmp / "questions.jsonl", 4)
    return dict(base=ckpt_dir("qwen2", seed=1, **SMALL), rl=ckpt_dir("qwen2", seed=2, **SMALL),
                ref=ckpt_dir("qwen2", seed=3, **SMALL), short=ckpt_dir("qwen2", seed=4, max_pos=32, **SMALL),
                data=data, tmp=tmp)


def rast(p, out, *extra):
    return ["decode", "--base", p["base"], "--pair", p["rl"], p["ref"], "0.5", "--dataset", p["data"],
            "--prompt-template", "{question}", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out),
            "--no-progress", *extra]


def rl_only(p, model, out, *extra):
    return ["decode", "--mode", "rl", "--pair", str(model), p["ref"], "1", "--dataset", p["data"],
            "--prompt-template", "{question}", "--max-new-tokens", "4", "--out", str(out), "--no-progress", *extra]


# ---- checkpoints with a broken header, index or pickle -------------------------------------

def _copy(p, tmp, name):
    d = tmp / name
    shutil.copytree(p["rl"], d)
    return d


def _header(d):
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(d, header, body=b""):
    blob = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def _edit_entry(change):
    def make(d):
        header, body = _header(d)
        name = sorted(k for k in header if k != "__metadata__")[0]
        header[name] = change(header[name])
        _write(d, header, body)
    return make


def _sharded(weight_map_edit=None, text=None):
    def make(d):
        header, _ = _header(d)
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        wm = {k: "model-00001-of-00001.safetensors" for k in header if k != "__metadata__"}
        index = text if text is not None else json.dumps({"weight_map": weight_map_edit(wm, d)})
        (d / "model.safetensors.index.json").write_text(index)
    return make


SECRET = b"TOPSECRET-credentials-0123456789\n" * 4


def _outside(wm, d):
    secret = d.parent / f"{d.name}_secret.txt"
    secret.write_bytes(SECRET)
    return {**wm, sorted(wm)[0]: str(secret)}


def _dotdot(wm, d):  # another (valid!) checkpoint's weights: it would load silently
    other = d.parent / f"{d.name}_other"
    shutil.copytree(d, other)
    return {k: f"../{other.name}/model-00001-of-00001.safetensors" for k in wm}


def _symlink(wm, d):
    secret = d.parent / f"{d.name}_secret.bin"
    secret.write_bytes(SECRET)
    os.symlink(secret, d / "model-00002-of-00002.safetensors")
    return {**wm, sorted(wm)[0]: "model-00002-of-00002.safetensors"}


CHECKPOINTS = {
    "header is a list": (lambda d: _write(d, [1, 2]), r"model.safetensors: corrupt safetensors header \(a JSON list"),
    "entry not an object": (_edit_entry(lambda e: 5), r"tensor '[\w.]+': its header entry is not an object"),
    "entry without offsets": (_edit_entry(lambda e: {"dtype": e["dtype"], "shape": e["shape"]}),
                              r"tensor '[\w.]+': its header entry has no data_offsets"),
    "offsets not numbers": (_edit_entry(lambda e: {**e, "data_offsets": ["a", "b"]}), r"its data_offsets are not"),
    "shape of text": (_edit_entry(lambda e: {**e, "shape": "big"}), r"its shape is not a list of whole numbers"),
    "shape and offsets disagree": (_edit_entry(lambda e: {**e, "shape": [3, 7]}),
                                   r"tensor '[\w.]+': shape \[3, 7\] of F32 needs 84 bytes"),
    "metadata not an object": (lambda d: _write(d, {**_header(d)[0], "__metadata__": [1]}, _header(d)[1]),
                               r"__metadata__ is not an object"),
    "index not JSON": (_sharded(text="{not json"), r"model.safetensors.index.json is not valid JSON"),
    "index without weight_map": (_sharded(text='{"metadata": {}}'), r"index.json has no \"weight_map\""),
    "index maps to a number": (_sharded(lambda wm, d: {**wm, sorted(wm)[0]: 3}), r"maps to int 3, not a shard"),
    "index lists a tensor its shard lacks": (
        _sharded(lambda wm, d: {**wm, "model.extra.weight": "model-00001-of-00001.safetensors"}),
        r"lists tensor 'model.extra.weight' in shard model-00001-of-00001.safetensors, which does not hold it"),
    "index shard outside (absolute)": (_sharded(_outside), r"outside the checkpoint directory"),
    "index shard outside (..)": (_sharded(_dotdot), r"outside the checkpoint directory"),
    "index shard links outside": (_sharded(_symlink), r"a link to a file outside the checkpoint directory"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_broken_checkpoints_are_named_errors(paths, tmp_path, capsys, case):
    make, match = CHECKPOINTS[case]
    d = _copy(paths, tmp_path, "ckpt")
    make(d)
    leaked = str(struct.unpack("<Q", SECRET[:8])[0])  # the "header length" the secret's first bytes announce
    assert_refused(rl_only(paths, d, tmp_path / "out.jsonl"), match, capsys, tmp_path,
                   absent=("TOPSECRET", leaked))


def test_a_malicious_pickle_is_refused_by_name(paths, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    d = tmp_path / "pickled"
    d.mkdir()
    for name in os.listdir(paths["rl"]):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(paths["rl"], name), d / name)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Payload()}, d / "pytorch_model.bin")
    assert_refused(rl_only(paths, d, tmp_path / "out.jsonl", "--allow-pickle"),
                   r"pytorch_model.bin: torch refused to load it as plain weights .*nothing of it ran",
                   capsys, tmp_path)
    assert not marker.exists()


# ---- the output file -------------------------------------------------------------------------

def _text_file(p, tmp):
    notes = tmp / "notes.txt"
    notes.write_text("my notes\nmy precious last line")  # no final newline: looks like a torn line
    return rast(p, notes), r"notes.txt:1 is not valid JSON"


def _other_run(p, tmp):
    other = tmp / "other.jsonl"
    rows = [{"id": f"x{i}", "sample": 0, "seed": 99, "completion": "c"} for i in range(2)]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "x2", "sam')
    return rast(p, other), r"other.jsonl already holds rows of another run \(seed: file 99, now 0\)"


def _not_rows(p, tmp):
    out = tmp / "numbers.jsonl"
    out.write_text("1\n2\n3")
    return rast(p, out), r"numbers.jsonl:1 is not a jaxrast row"


def _foreign_fields(p, tmp):
    out = tmp / "foreign.jsonl"
    out.write_text(json.dumps({"id": "q0", "sample": 0, "models": 5, "stop": None}) + "\n")
    return rast(p, out), r"foreign.jsonl already holds rows of another run \(stop: file None, .*models: file 5"


def _foreign_torn_tail(p, tmp):
    out = tmp / "ours_then_text.jsonl"
    assert main(rast(p, out, "--limit", "1")) == 0
    with open(out, "a") as f:
        f.write("a line someone appended")
    return rast(p, out, "--limit", "2"), r"ends in an incomplete line that is not a jaxrast row"


def _changed_prompts(p, tmp):
    out = tmp / "done.jsonl"
    assert main(rast(p, out, "--limit", "2")) == 0
    changed = tmp / "changed.jsonl"  # the same ids, other questions
    changed.write_text("".join(json.dumps({"id": f"q{i}", "question": "cba " * (1 + i)}) + "\n" for i in range(4)))
    args = rast(p, out, "--limit", "2")
    args[args.index(p["data"])] = str(changed)
    return args, r"done.jsonl:1: row 'q0' was decoded from another prompt"


def _dir(p, tmp):
    return rast(p, tmp), r"--out .* is a directory"


def _under_a_file(p, tmp):
    (tmp / "a_file").write_text("x")
    return rast(p, tmp / "a_file" / "out.jsonl"), r"a_file is a file, not a directory"


def _trace_out_dir(p, tmp):
    return rast(p, tmp / "o.jsonl", "--trace-rows", "q0", "--trace-out", str(tmp)), r"--trace-out .* is a directory"


# ---- values ---------------------------------------------------------------------------------

def _swap(old, new):
    def make(p, tmp):
        args = rast(p, tmp / "out.jsonl")
        args[args.index(old)] = new
        return args, None
    return make


def _config(text):
    def make(p, tmp):
        cfg = tmp / "decode.yaml"
        cfg.write_text(text)
        return ["decode", "--config", str(cfg), "--out", str(tmp / "out.jsonl")], None
    return make


def _dataset(name):
    def make(p, tmp):
        args = rast(p, tmp / "out.jsonl")
        args[args.index(p["data"])] = name
        return args, None
    return make


def _too_long(p, tmp):
    args = rast(p, tmp / "out.jsonl", "--limit", "3")
    args[args.index(p["base"])] = p["short"]  # max_position_embeddings 32
    args[args.index("--max-new-tokens") + 1] = "24"
    return args, (r"1 of 3 prompts are too long: row 'q2' has 12 prompt tokens, plus --max-new-tokens 24 = 36 "
                  r"positions, beyond max_position_embeddings = 32 .*lower --max-new-tokens to 20")


CASES = {
    # Found: data loss — nothing may be written before the file is known to be ours
    "--out is a text file with a torn-looking last line": (_text_file, None),
    "--out holds another run's rows and a torn line": (_other_run, None),
    "--out holds JSON that is not rows": (_not_rows, None),
    "--out: our rows, then a foreign unterminated line": (_foreign_torn_tail, None),
    "--out: rows with other types in our fields": (_foreign_fields, None),
    # Found: silently wrong results
    "resume with other prompts under the same ids": (_changed_prompts, None),
    "empty stop string": (lambda p, t: (rast(p, t / "o.jsonl", "--stop", ""), None),
                          r"--stop\[0\]: expected a non-empty string"),
    "NaN λ in --pair": (_swap("0.5", "nan"), r"--pair \S+ \S+ LAM: λ must be a finite number .*got 'nan'"),
    "inf --lam": (lambda p, t: (["decode", "--base", p["base"], "--rl", p["rl"], "--ref", p["ref"], "--lam", "inf",
                                 "--out", str(t / "o.jsonl")], None), r"--lam: λ must be a finite number"),
    "NaN temperature": (lambda p, t: (rast(p, t / "o.jsonl", "--temperature", "nan"), None),
                        r"--temperature: input should be a finite number"),
    "NaN top-p": (lambda p, t: (rast(p, t / "o.jsonl", "--top-p", "nan"), None), r"--top-p: input should be a finite"),
    "negative --limit": (lambda p, t: (rast(p, t / "o.jsonl", "--limit", "-1"), None),
                         r"--limit: input should be greater than or equal to 1, got -1"),
    "negative --n": (lambda p, t: (rast(p, t / "o.jsonl", "--n", "-2"), None), r"--n: input should be greater"),
    "--min-tokens -1": (lambda p, t: (rast(p, t / "o.jsonl", "--min-tokens", "-1"), None), r"--min-tokens: input"),
    "bad λ schedule": (lambda p, t: (rast(p, t / "o.jsonl", "--lam-schedule", "first:-3"), None),
                       r"unknown λ schedule 'first:-3'"),
    # Found: tracebacks instead of messages
    "--out is a directory": (_dir, None),
    "--out under a file": (_under_a_file, None),
    "--trace-out is a directory": (_trace_out_dir, None),
    "over-long prompt": (_too_long, None),
    "dataset neither benchmark nor path": (_dataset("mathh500"),
                                          r"no such file: mathh500; it is neither a shipped benchmark \(aime24"),
    "dataset looks like a hub id": (_dataset("nobody/no-such-dataset"),
                                    r"loading it as a HuggingFace hub dataset id \(split 'test'\) failed"),
    "config YAML syntax error": (_config("base: [unclosed\n"), r"decode.yaml is not valid YAML: .* at line 2"),
    "config top level is a list": (_config("- 1\n"), r"decode.yaml: a config must be a YAML mapping"),
    "--set value is broken YAML": (lambda p, t: (rast(p, t / "o.jsonl", "--set", "limit=[1,"), None),
                                   r"override 'limit=\[1,': the value is not valid YAML"),
    "--set names the key it set": (lambda p, t: (rast(p, t / "o.jsonl", "--set", "batch_size=0"), None),
                                   r"--set batch_size: input should be greater than or equal to 1"),
    "config value named by file and key": (_config("base: b\nn: -3\n"), r"decode.yaml.n: input should be greater"),
    "--distributed-timeout 0": (lambda p, t: (rast(p, t / "o.jsonl", "--distributed-timeout", "0"), None),
                                r"--distributed-timeout must be a number of seconds > 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_and_change_nothing(paths, tmp_path, capsys, case):
    make, match = CASES[case]
    args, own_match = make(paths, tmp_path)
    assert_refused(args, match or own_match, capsys, tmp_path, paths["data"])


# ---- what must work ---------------------------------------------------------------------------

def test_resume_accepts_the_same_checkpoint_by_another_relative_path(paths, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rel.jsonl"
    assert main(rast(paths, out, "--limit", "2")) == 0
    rows = jsonl_lines(out)
    monkeypatch.chdir(os.path.dirname(paths["base"]))
    args = rast(paths, out, "--limit", "2")
    args[args.index(paths["base"])] = "./" + os.path.basename(paths["base"]) + "/"
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert "0 rows written" in capsys.readouterr().out and jsonl_lines(out) == rows
    assert all(json.loads(r)["prompt_hash"] for r in rows)


def test_our_torn_last_line_is_still_repaired(paths, tmp_path):
    out = tmp_path / "torn.jsonl"
    assert main(rast(paths, out, "--limit", "2")) == 0
    first = jsonl_lines(out)
    with open(out, "a") as f:
        f.write('{"id": "q1", "benchmark": null, "pro')
    assert main(rast(paths, out, "--limit", "3")) == 0
    lines = jsonl_lines(out)
    assert lines[:2] == first and len(lines) == 3 and all(json.loads(x) for x in lines)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), JAX_PLATFORMS="cpu",
                HF_HUB_OFFLINE="1")


def test_a_second_writer_of_the_same_out_is_refused(paths, tmp_path, capsys):
    out = tmp_path / "shared.jsonl"
    assert main(rast(paths, out, "--limit", "1")) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(out)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_refused(rast(paths, out, "--limit", "3"), r"--out .*shared.jsonl is being written by another running "
                       r"jaxrast process", capsys, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert main(rast(paths, out, "--limit", "3")) == 0  # once the other writer is gone
    assert len(jsonl_lines(out)) == 3


def test_ctrl_c_prints_one_line_and_exits_130(paths, tmp_path):
    """3,200 rows of the other tests' prompts and shapes: the subprocess loads the programs
    they compiled (the compilation cache) and is interrupted after its first row. It starts
    with Python's Ctrl-C handler, as a command in a terminal does: a suite launched as a
    background job (`cmd &` without job control) ignores SIGINT, and so would its children."""
    data = write_questions(tmp_path / "many.jsonl", 400, cycle=4)
    out = tmp_path / "interrupted.jsonl"
    args = rast(paths, out, "--n", "8")
    args[args.index(paths["data"])] = data
    as_in_a_terminal = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "from jaxrast.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start = time.time()
    while time.time() < start + 120 and (not out.exists() or not out.read_text()) and proc.poll() is None:
        time.sleep(0.05)
    waited, alive = time.time() - start, proc.poll() is None
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (f"signalled after {waited:.1f} s (still running: {alive}), "
                                    f"{len(jsonl_lines(out)) if out.exists() else 0} rows written\n{stdout}\n{err}")
    assert "Traceback" not in err and "jaxrast decode: interrupted (Ctrl-C)" in err
    lines = jsonl_lines(out)
    assert 0 < len(lines) < 3200 and all(json.loads(x)["id"] for x in lines[:-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_peer_that_never_starts_is_reported_while_waiting_and_at_the_timeout(paths, tmp_path):
    out = tmp_path / "mp.jsonl"
    args = rast(paths, out, "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "0",
                "--distributed-timeout", "3")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "jaxrast.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.time() - t0 < 60
    assert "process 0 of 2 waiting for process 1 to connect to 127.0.0.1:" in proc.stderr
    assert "gave up waiting for process 1" in proc.stderr and "--distributed-timeout SECONDS" in proc.stderr
    assert "Traceback" not in proc.stderr and "Check failure" not in proc.stderr and not out.exists()
    assert snapshot(tmp_path) == {}


def test_hostile_templates_and_oversized_prompts_are_refused_before_tokenizing(paths, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    err = assert_refused(rast(paths, out, "--prompt-template", "{question:>100000000}"),
                         r"prompt template '\{question:>100000000\}'.*not a plain field", capsys)
    assert len(err) < 1000
    assert_refused(rast(paths, out, "--prompt-template", "{question.__class__}"), "not a plain field", capsys)
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"id": "big", "question": "a" * 10_000_000}) + "\n")
    err = assert_refused(rast({**paths, "data": str(huge)}, out), r"is 10000000 bytes, over the limit", capsys)
    assert len(err) < 1000
    long = tmp_path / "long.jsonl"  # 100,000 tokens of the character tokenizer
    long.write_text(json.dumps({"id": "long", "question": "abc " * 25_000}) + "\n")
    assert_refused(rast({**paths, "data": str(long)}, out), "bytes, over the limit", capsys)
    assert_refused(rast({**paths, "data": str(long)}, out, "--max-prompt-bytes", "1000000"),
                   "100000 prompt tokens.*beyond max_position_embeddings", capsys)
