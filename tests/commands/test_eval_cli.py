"""`jaxrast eval` end to end: joins by id, verdicts, reports, compare, plot, errors."""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import pytest
from hf_fixtures import REPO

from jaxrast.cli import main
from jaxrast.data.rows import load_benchmark

ROOT = Path(REPO)

def decode_row(rid, sample, completion, **extra):
    return {"id": rid, "prompt": "p", "sample": sample, "completion": completion, "num_tokens": 3,
            "finish_reason": "stop", "seed": 0, **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args):
    return main(["eval", "--no-progress", *map(str, args)])


@pytest.fixture
def math500_preds(tmp_path):
    """4 problems x 2 samples, shuffled; returns (path, expected verdict per line)."""
    gold = load_benchmark("math500")[:4]
    rows = []
    for r in gold:
        rows.append((decode_row(r["id"], 0, f"so the answer is $\\boxed{{{r['answer']}}}$", benchmark="math500"), True))
        rows.append((decode_row(r["id"], 1, "The answer is \\boxed{-999}.", benchmark="math500"), False))
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path / "preds.jsonl", [r for r, _ in rows]), [ok for _, ok in rows]


def test_eval_joins_by_id_and_lists_verdicts_in_input_order(math500_preds, tmp_path, capsys):
    path, expected = math500_preds
    out = tmp_path / "report.json"
    assert run_cli("--pred", path, "--json", out, "--workers", 0) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "jaxrast.eval/v1" and report["predictions"] == str(path)
    assert [v["correct"] for v in report["verdicts"]] == expected
    assert [v["line"] for v in report["verdicts"]] == list(range(1, 9))
    bench = report["benchmarks"]["math500"]
    assert bench["num_problems"] == 4 and bench["num_gold_problems"] == 500 and bench["num_predictions"] == 8
    assert bench["metrics"]["avg@2"] == 0.5 and bench["metrics"]["pass@2"] == 1.0 and bench["metrics"]["pass@1"] == 0.5
    assert set(bench["groups"]) == {"subject", "level"}
    table = capsys.readouterr().out
    assert "math500" in table and "pass@2" in table


def test_eval_normalises_int_ids_and_takes_benchmark_flag(tmp_path):
    gold = load_benchmark("gsm8k")[:3]
    rows = [decode_row(int(r["id"]), 0, f"... #### {r['answer']}") for r in gold]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    out = tmp_path / "g.json"
    assert run_cli("--pred", path, "--benchmark", "gsm8k", "--json", out, "--workers", 0) == 0
    report = json.loads(out.read_text())
    assert [v["id"] for v in report["verdicts"]] == ["0", "1", "2"]
    assert all(v["correct"] and v["method"] == "last_number" for v in report["verdicts"])


def test_eval_errors_are_clear(tmp_path, capsys):
    no_bench = write_jsonl(tmp_path / "a.jsonl", [decode_row("0", 0, "1")])
    assert run_cli("--pred", no_bench, "--workers", 0) == 2
    assert "--benchmark" in capsys.readouterr().err
    assert run_cli("--pred", no_bench, "--benchmark", "gsm8k", "--workers", 0) == 0
    unknown = write_jsonl(tmp_path / "b.jsonl", [decode_row("nope", 0, "1", benchmark="gsm8k")])
    assert run_cli("--pred", unknown, "--workers", 0) == 2
    assert "not in benchmark 'gsm8k'" in capsys.readouterr().err
    dup = write_jsonl(tmp_path / "c.jsonl", [decode_row("0", 0, "1", benchmark="gsm8k")] * 2)
    assert run_cli("--pred", dup, "--workers", 0) == 2
    assert "duplicate" in capsys.readouterr().err
    assert run_cli("--pred", tmp_path / "missing.jsonl", "--workers", 0) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_eval_accepts_seed_repo_rows(tmp_path):
    rows = [
        {"question": "1+1?", "model_output": "so \\boxed{2}", "answer": "1+1=2\n#### 2"},
        {"question": "1+1?", "model_output": "the answer is 3", "answer": "1+1=2\n#### 2"},
        {"question": "half?", "model_output": ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}"], "answer": "\\frac{1}{2}"},
    ]
    out = tmp_path / "seed.json"
    assert run_cli("--pred", write_jsonl(tmp_path / "seed.jsonl", rows), "--json", out, "--workers", 0) == 0
    report = json.loads(out.read_text())
    assert [v["correct"] for v in report["verdicts"]] == [True, False, True, True, False]
    seed = report["benchmarks"]["seed"]
    assert seed["num_problems"] == 2 and seed["samples"] == {"min": 2, "max": 3}
    assert seed["metrics"]["avg"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert seed["metrics"]["maj@2"] == 1.0  # 1-1 tie goes to the first answer, "2"


def test_eval_with_custom_gold_data(tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"uid": "q1", "problem": "?", "target": "7", "topic": "t"}])
    preds = write_jsonl(tmp_path / "p.jsonl", [decode_row("q1", 0, "\\boxed{7}")])
    out = tmp_path / "r.json"
    assert run_cli("--pred", preds, "--data", gold, "--fields", "id=uid,question=problem,answer=target",
                   "--group-by", "topic", "--json", out, "--workers", 0) == 0
    report = json.loads(out.read_text())
    assert report["benchmarks"]["custom"]["metrics"]["avg@1"] == 1.0
    assert report["benchmarks"]["custom"]["groups"]["topic"]["t"]["num_problems"] == 1


def _model_file(tmp_path, name, accuracy, n=4, problems=20):
    rng = random.Random(name)
    rows = []
    for r in load_benchmark("math500")[:problems]:
        for s in range(n):
            answer = r["answer"] if rng.random() < accuracy else "-12345"
            rows.append(decode_row(r["id"], s, f"\\boxed{{{answer}}}", benchmark="math500"))
    return write_jsonl(tmp_path / f"{name}.jsonl", rows)


def test_compare_prints_recovery_rate(tmp_path, capsys):
    base, rast, rl = (_model_file(tmp_path, n, a) for n, a in [("base", 0.2), ("rast", 0.5), ("rl", 0.6)])
    rast_json = tmp_path / "rast.json"
    assert run_cli("--pred", rast, "--json", rast_json, "--workers", 0) == 0
    out = tmp_path / "cmp.json"
    capsys.readouterr()
    assert run_cli("--compare", base, rast_json, rl, "--json", out, "--workers", 0) == 0
    table = capsys.readouterr().out
    assert "RR" in table and "math500" in table
    row = json.loads(out.read_text())["rows"]["math500"]
    assert row["rr"] == pytest.approx((row["rast"] - row["base"]) / (row["rl"] - row["base"]))


def test_compare_refuses_runs_over_different_problems(tmp_path, capsys):
    base, rast = (_model_file(tmp_path, n, a) for n, a in [("base", 0.2), ("rast", 0.5)])
    rl = _model_file(tmp_path, "rl", 0.6, problems=3)
    assert run_cli("--compare", base, rast, rl, "--workers", 0) != 0
    err = capsys.readouterr().err
    assert "different problems" in err and "RL 3" in err


def test_plot_writes_png(tmp_path):
    files = [_model_file(tmp_path, n, a) for n, a in [("base", 0.2), ("rl", 0.6)]]
    png = tmp_path / "passk.png"
    assert run_cli("--pred", *files, "--plot", png, "--k", 1, 2, 4, "--workers", 0) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_grades_long_synthetic_predictions_in_the_worker_pool(tmp_path):
    """The speed benchmark's input (benchmarks/eval_speed.py: MATH500 x samples of ~3 KB with
    mostly distinct answers), one sample per problem, through the default worker pool: every
    completion that ends in its gold box is correct, every "the answer is gold + k" is not.
    Its speed is measured by the benchmark. The judgement deadline is raised from 5 s to 60 s:
    on a loaded machine a sound judgement can pass 5 s and be scored incorrect; the wall bound
    (ten deadlines) only catches a grader that hangs."""
    spec = importlib.util.spec_from_file_location("eval_speed", ROOT / "benchmarks" / "eval_speed.py")
    eval_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_speed)
    rows = eval_speed.synthetic_predictions(samples=1, chars=3000)
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    start = time.monotonic()
    assert run_cli("--pred", path, "--json", tmp_path / "big.json", "--timeout", 60) == 0
    elapsed = time.monotonic() - start
    print(f"{len(rows)} predictions graded in {elapsed:.1f}s")
    assert elapsed < 10 * 60
    report = json.loads((tmp_path / "big.json").read_text())
    gold = {r["id"]: r["answer"] for r in load_benchmark("math500")}
    verdicts = report["verdicts"]
    assert len(verdicts) == len(rows) == 500 and [v["line"] for v in verdicts] == list(range(1, 501))
    boxed = [v["correct"] for r, v in zip(rows, verdicts) if r["completion"].endswith(f"\\boxed{{{gold[r['id']]}}}")]
    stated = [v["correct"] for r, v in zip(rows, verdicts) if r["completion"].endswith("$.")]
    assert len(boxed) > 150 and all(boxed)
    assert len(stated) > 50 and not any(stated)
    assert report["benchmarks"]["math500"]["num_predictions"] == 500
