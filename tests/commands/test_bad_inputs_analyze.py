"""`jaxrast analyze` fed bad inputs (issue 19): numbers out of range, NaN λ, unusable --out
and a pair whose tokenizer differs are refused with exit 2 and a message naming the flag or
the model to blame, and no file changes."""

from __future__ import annotations

import pytest
from hf_fixtures import SMALL, write_questions
from refusals import assert_refused

from jaxrast.cli import main


@pytest.fixture(scope="module")
def paths(ckpt_dir, tmp_path_factory):
    import hf_fixtures

    tmp = tmp_path_factory.mktemp("bad_analyze")
    data = write_questions(tmp / "questions.jsonl", 3)
    p = dict(base=ckpt_dir("qwen2", seed=1, **SMALL), rl=ckpt_dir("qwen2", seed=2, **SMALL),
             ref=ckpt_dir("qwen2", seed=3, **SMALL), traj=str(tmp / "traj.jsonl"), tmp=tmp)
    chars = hf_fixtures.CHARS
    try:  # a pair's rl model with one more token: its tokenizer differs from the base's
        hf_fixtures.CHARS = chars + "!"
        p["other_tok"] = hf_fixtures.make_checkpoint(str(tmp / "rl_other_tokenizer"), seed=2, **SMALL)
    finally:
        hf_fixtures.CHARS = chars
    assert main(["decode", "--base", p["base"], "--mode", "base", "--dataset", data, "--prompt-template",
                 "{question}", "--max-new-tokens", "6", "--save-token-ids", "--out", p["traj"], "--no-progress"]) == 0
    return p


def cov(p, out, *extra):
    return ["analyze", "coverage", "--traj", p["traj"], "--model", p["rl"], "--out", str(out), "--no-progress", *extra]


def kl(p, out, *extra, lam="1", rl=None):
    return ["analyze", "kl", "--traj", p["traj"], "--base", p["base"], "--pair", rl or p["rl"], p["ref"], lam,
            "--out", str(out), "--no-progress", *extra]


def trace(p, out, *extra):
    return ["analyze", "trace", "--traj", p["traj"], "--base", p["base"], "--rows", "q0", "--out", str(out),
            "--no-progress", *extra]


CASES = {
    "--limit -1 (a slice would drop the last row)": (lambda p, t: cov(p, t / "c", "--limit", "-1"),
                                                     r"--limit: input should be greater than or equal to 1, got -1"),
    "--k -1": (lambda p, t: cov(p, t / "c", "--k", "-1"), r"--k\[0\]: input should be greater than or equal to 1"),
    "--top-n -3": (lambda p, t: cov(p, t / "c", "--top-n", "-3"), r"--top-n: input should be greater"),
    "--batch-size 0": (lambda p, t: cov(p, t / "c", "--batch-size", "0"), r"--batch-size: input should be greater"),
    "NaN λ": (lambda p, t: kl(p, t / "k", lam="nan"), r"--pair \S+ \S+ LAM: λ must be a finite number"),
    "inf λ": (lambda p, t: kl(p, t / "k", lam="inf"), r"λ must be a finite number .*got 'inf'"),
    "--top-fraction nan": (lambda p, t: kl(p, t / "k", "--top-fraction", "nan"),
                           r"--top-fraction: input should be a finite number"),
    "--top-fraction 2": (lambda p, t: kl(p, t / "k", "--top-fraction", "2"), r"--top-fraction: input should be less"),
    "--min-occurrences -1": (lambda p, t: kl(p, t / "k", "--min-occurrences", "-1"), r"--min-occurrences: input"),
    "trace --top-k -2": (lambda p, t: trace(p, t / "t.jsonl", "--top-k", "-2"), r"--top-k: input should be greater"),
    "bad λ schedule": (lambda p, t: kl(p, t / "k", "--lam-schedule", "warmup:x"), r"unknown λ schedule 'warmup:x'"),
    "--out is a file": (lambda p, t: cov(p, p["traj"]), r"--out .*traj.jsonl is a file, not a directory"),
    "trace --out is a directory": (lambda p, t: trace(p, t), r"--out .* is a directory"),
    "a pair's rl tokenizer differs": (lambda p, t: kl(p, t / "k", rl=p["other_tok"]),
                                      r"rl_other_tokenizer's tokenizer differs from \S+qwen2_\d+'s"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_and_change_nothing(paths, tmp_path, capsys, case):
    make, match = CASES[case]
    err = assert_refused(make(paths, tmp_path), match, capsys, tmp_path, paths["tmp"])
    if case == "a pair's rl tokenizer differs":
        assert paths["ref"] + "'s tokenizer" not in err  # the ref shares the base's: it is not to blame
