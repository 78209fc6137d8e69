"""`jaxrast eval` fed bad inputs (issue 19): out-of-range numbers and flags that eval would
ignore are refused with exit 2 and a message naming the flag, before any grading, and no
file changes."""

from __future__ import annotations

import json

import pytest
from refusals import assert_refused

from jaxrast.cli import main


@pytest.fixture
def files(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"id": f"q{i}", "question": "1+1", "answer": str(i)}) + "\n" for i in range(3)))
    pred = tmp_path / "pred.jsonl"
    rows = [{"id": f"q{i}", "sample": s, "completion": f"\\boxed{{{i}}}"} for i in range(3) for s in range(2)]
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report.json"
    assert main(["eval", "--no-progress", "--workers", "0", "--pred", str(pred), "--data", str(gold),
                 "--json", str(report)]) == 0
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    return dict(gold=str(gold), pred=str(pred), report=str(report), tmp=tmp_path)


def pred(f, *extra):
    return ["eval", "--no-progress", "--workers", "0", "--pred", f["pred"], "--data", f["gold"], *extra]


def compare(f, *extra):
    return ["eval", "--no-progress", "--workers", "0", "--compare", f["pred"], f["pred"], f["pred"],
            "--data", f["gold"], *extra]


CASES = {
    # numbers by type and range
    "--k 0": (lambda f: pred(f, "--k", "1", "0"), r"--k\[1\]: input should be greater than or equal to 1, got 0"),
    "--k -1": (lambda f: pred(f, "--k", "-1"), r"--k\[0\]: input should be greater than or equal to 1"),
    "--timeout nan": (lambda f: pred(f, "--timeout", "nan"), r"--timeout: input should be a finite number"),
    "--timeout -1": (lambda f: pred(f, "--timeout", "-1"), r"--timeout: input should be greater than 0"),
    "--workers -3": (lambda f: pred(f, "--workers", "-3"), r"--workers: input should be greater than or equal to 0"),
    # flags eval would ignore: the output would silently not be what was asked
    "--k above the samples per problem": (lambda f: pred(f, "--k", "1", "4"),
                                          r"--k 4: .*pred.jsonl has only 2 sample\(s\) per problem"),
    "--metric with --pred": (lambda f: pred(f, "--metric", "pass@1"), r"--metric chooses the accuracy of --compare"),
    "--plot with --compare": (lambda f: compare(f, "--plot", str(f["tmp"] / "p.png")), r"--plot applies to --pred"),
    "--groups with --compare": (lambda f: compare(f, "--groups"), r"--groups applies to --pred"),
    "--group-by without --groups or --json": (lambda f: pred(f, "--group-by", "level"),
                                              r"--group-by adds rows to --groups .* and to --json"),
    "--fields without --data": (lambda f: ["eval", "--workers", "0", "--pred", f["pred"], "--benchmark", "gsm8k",
                                           "--fields", "id=uid"], r"--fields describes the gold data of --data"),
    "--split without --data": (lambda f: ["eval", "--workers", "0", "--pred", f["pred"], "--split", "train"],
                               r"--split describes the gold data of --data"),
    "--split for a JSONL --data": (lambda f: pred(f, "--split", "train"), r"--split chooses a split of a datasets"),
    "--k for a graded .json report": (lambda f: ["eval", "--workers", "0", "--pred", f["report"], "--k", "1"],
                                      r"--k does not apply to .*report.json: a .json report is already graded"),
    "--data for a graded .json report": (lambda f: ["eval", "--workers", "0", "--compare", f["report"], f["report"],
                                                    f["report"], "--data", f["gold"]], r"--data does not apply"),
    # files
    "--json is a directory": (lambda f: pred(f, "--json", str(f["tmp"])), r"--json .* is a directory"),
    "--plot under a file": (lambda f: pred(f, "--plot", f["gold"] + "/p.png"), r"gold.jsonl is a file, not a dir"),
    "a broken .json report": (lambda f: ["eval", "--workers", "0", "--pred", str(f["tmp"] / "broken.json")],
                              r"broken.json is not a JSON file"),
    "a binary predictions file": (lambda f: ["eval", "--workers", "0", "--pred", str(f["tmp"] / "binary.jsonl"),
                                             "--benchmark", "gsm8k"], r"binary.jsonl:\d+: not UTF-8 text"),
    "--data neither benchmark nor path": (lambda f: ["eval", "--workers", "0", "--pred", f["pred"], "--data", "gsm9k"],
                                          r"no such file: gsm9k; it is neither a shipped benchmark"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_and_change_nothing(files, capsys, case):
    make, match = CASES[case]
    assert_refused(make(files), match, capsys, files["tmp"])
