"""`jaxrast analyze` and the decode trace options, end to end on tiny checkpoints."""

import json
import os
from pathlib import Path

import pytest

from jaxrast.analysis.trajectories import read_trajectories
from jaxrast.cli import main

SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64)


@pytest.fixture(scope="module")
def paths(ckpt_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    data = tmp / "questions.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"q{i}", "question": "abc " * (1 + i % 4) + "=?"}) + "\n")
    p = dict(base=ckpt_dir("qwen2", seed=1), rl=ckpt_dir("qwen2", seed=2, **SMALL),
             ref=ckpt_dir("qwen2", seed=3, **SMALL), data=str(data), tmp=tmp)
    # S_RL's greedy trajectories with their token ids: the analyses' input
    p["traj"] = str(tmp / "s_rl.jsonl")
    assert main(["decode", "--mode", "rl", "--pair", p["rl"], p["ref"], "1", "--dataset", p["data"],
                 "--prompt-template", "{question}", "--temperature", "0", "--max-new-tokens", "12",
                 "--batch-size", "4", "--save-token-ids", "--out", p["traj"], "--no-progress"]) == 0
    return p


def load(path):
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else [json.loads(line) for line in f]


def test_decode_saves_token_ids_and_writes_a_trace(paths):
    out = str(paths["tmp"] / "rast.jsonl")
    assert main(["decode", "--base", paths["base"], "--pair", paths["rl"], paths["ref"], "0.5", "--dataset",
                 paths["data"], "--prompt-template", "{question}", "--n", "2", "--max-new-tokens", "10",
                 "--batch-size", "4", "--save-token-ids", "--trace-rows", "q1", "q2:0", "--trace-top-k", "3",
                 "--out", out, "--no-progress"]) == 0
    rows = {(r["id"], r["sample"]): r for r in load(out)}
    assert all(len(r["token_ids"]) == r["num_tokens"] for r in rows.values())
    trace = load(str(paths["tmp"] / "rast.trace.jsonl"))
    assert sorted((t["id"], t["sample"]) for t in trace) == [("q1", 0), ("q1", 1), ("q2", 0)]
    for t in trace:
        row = rows[(t["id"], t["sample"])]
        assert [s["id"] for s in t["steps"]] == row["token_ids"]
        step = t["steps"][0]
        assert {"base", "delta", "delta_low", "combined", "kl", "logp_combined"} <= set(step)
        assert len(step["combined"]) == 3 and step["delta"][0][2] >= step["delta"][1][2]


def test_text_rows_retokenize_to_the_saved_ids(paths):
    """For a character tokenizer, rows holding only text give the ids decoding produced."""
    from hf_fixtures import CHARS

    from jaxrast.toy.tokenizer import char_tokenizer

    tok = char_tokenizer(CHARS)
    rows = load(paths["traj"])
    assert all(len(r["token_ids"]) == r["num_tokens"] and r["prompt_ids"] for r in rows)
    with_ids = read_trajectories(paths["traj"])
    text_only = str(paths["tmp"] / "text_only.jsonl")
    with open(text_only, "w") as f:
        for row in rows:
            ids = (row.pop("prompt_ids"), row.pop("token_ids"))
            row["prompt"], row["completion"] = (tok.decode(x, skip_special_tokens=True) for x in ids)
            f.write(json.dumps(row) + "\n")
    for a, b in zip(with_ids, read_trajectories(text_only, tok, limit=4)):
        assert a.prompt_ids == b.prompt_ids
        # the text drops the stop token (eos) that the saved ids keep
        assert a.token_ids[:len(b.token_ids)] == b.token_ids and len(a.token_ids) - len(b.token_ids) in (0, 1)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        read_trajectories(text_only)


def test_coverage_kl_similarity_and_trace_commands(paths, capsys):
    out = paths["tmp"] / "an"
    traj, base, rl, ref = paths["traj"], paths["base"], paths["rl"], paths["ref"]
    rast = ["--base", base, "--pair", rl, ref, "1.0"]
    assert main(["analyze", "coverage", "--traj", traj, "--model", f"s_rl={rl}", "--model", f"m_base={base}",
                 *rast, "--out", str(out / "cov"), "--no-progress"]) == 0
    cov = load(str(out / "cov" / "coverage.json"))
    assert cov["trajectories"] == 6 and set(cov["models"]) == {"s_rl", "m_base", "RAST"}
    assert cov["models"]["s_rl"]["coverage"] == 1.0  # greedy trajectories of S_RL itself
    assert 0 <= cov["models"]["m_base"]["coverage"] < 1 and cov["models"]["m_base"]["missed_tokens"]
    assert "s_rl: coverage 100.00%" in capsys.readouterr().out

    assert main(["analyze", "kl", "--traj", traj, *rast, "--model", f"s_rl={rl}", "--top-fraction", "0.2",
                 "--out", str(out / "kl"), "--no-progress"]) == 0
    kl = load(str(out / "kl" / "kl.json"))
    pair = f"{os.path.basename(rl)} vs {os.path.basename(ref)}"
    assert set(kl["series"]) == {"RAST", pair, "s_rl"} and kl["series"][pair]["what"] == "KL(P_rl ‖ P_ref)"
    assert kl["series"]["RAST"]["kl"]["mean"] > 0 and kl["series"]["RAST"]["top_tokens"]

    assert main(["analyze", "similarity", "--traj", traj, "--pair", rl, ref, "--pair", rl, ref, "1.0",
                 "--out", str(out / "sim"), "--no-progress"]) == 0
    sim = load(str(out / "sim" / "similarity.json"))
    (name, comp), = sim["comparisons"].items()
    assert name.endswith("_2") and comp["shared"]["mean"] == pytest.approx(1.0, abs=1e-5)

    assert main(["analyze", "trace", "--traj", traj, "--rows", "q3", *rast, "--top-k", "2",
                 "--out", str(out / "trace.jsonl"), "--no-progress"]) == 0
    (record,) = load(str(out / "trace.jsonl"))
    assert record["id"] == "q3" and len(record["steps"][0]["base"]) == 2
    for png in ("cov/coverage.png", "kl/kl_per_position.png", "kl/top_shifted_tokens.png",
                "sim/similarity_per_position.png"):
        assert os.path.getsize(out / png) > 1000, png


def test_errors_name_the_problem(paths, tmp_path, capsys):
    rl, ref = paths["rl"], paths["ref"]
    assert main(["analyze", "coverage", "--traj", str(tmp_path / "nope.jsonl"), "--model", rl,
                 "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", "similarity", "--traj", paths["traj"], "--pair", rl, ref, "--out", str(tmp_path)]) == 2
    assert "at least twice" in capsys.readouterr().err
    assert main(["analyze", "kl", "--traj", paths["traj"], "--base", rl, "--out", str(tmp_path)]) == 2
    assert "--pair" in capsys.readouterr().err
    assert main(["analyze", "trace", "--traj", paths["traj"], "--rows", "zz", "--base", rl,
                 "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "matches --rows zz" in capsys.readouterr().err
    rows = load(paths["traj"])
    rows[1]["token_ids"][0] = 10_000  # decoded with another tokenizer
    oov = tmp_path / "oov.jsonl"
    oov.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["analyze", "coverage", "--traj", str(oov), "--model", rl, "--out", str(tmp_path)]) == 2
    assert "token id 10000, outside the vocabulary" in capsys.readouterr().err


def test_checkpoint_without_tokenizer_files_analyses_token_ids(paths, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((Path(paths["rl"]) / name).read_bytes())
    with pytest.warns(UserWarning, match="no tokenizer"):
        assert main(["analyze", "coverage", "--traj", paths["traj"], "--model", str(bare),
                     "--out", str(tmp_path / "cov")]) == 0
    with_tok = tmp_path / "with_tok"
    assert main(["analyze", "coverage", "--traj", paths["traj"], "--model", paths["rl"], "--out", str(with_tok)]) == 0
    bare_report, tok_report = (load(str(d / "coverage.json")) for d in (tmp_path / "cov", with_tok))
    assert bare_report["positions"] == tok_report["positions"] > 0
    # S_RL covers its own greedy tokens; without a tokenizer the padded rows compete too
    assert [m["coverage"] for m in tok_report["models"].values()] == [1.0]
    assert all(0 <= m["coverage"] <= 1 for m in bare_report["models"].values())
