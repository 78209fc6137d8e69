"""`jaxrast demo` fed bad inputs (issue 19): refused with exit 2 before minutes of decoding,
naming the flag; no file changes."""

from __future__ import annotations

import pytest
from refusals import assert_refused


def demo(*extra):
    return ["demo", "--no-progress", *extra]


CASES = {
    "--problems -1": (lambda t: demo("--problems", "-1"), r"--problems: input should be greater than or equal to 1"),
    "--lam nan": (lambda t: demo("--lam", "nan"), r"--lam: input should be a finite number"),
    "--sweep with inf": (lambda t: demo("--sweep", "0", "inf"), r"--sweep\[1\]: input should be a finite number"),
    "--out-dir is a file": (lambda t: demo("--out-dir", str(t / "f.txt")), r"--out-dir .*f.txt is a file"),
    "--json is a directory": (lambda t: demo("--json", str(t)), r"--json .* is a directory"),
    "--family without the models": (lambda t: demo("--family", str(t)), r"toy family at .* lacks"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_and_change_nothing(tmp_path, capsys, case):
    (tmp_path / "f.txt").write_text("mine")
    make, match = CASES[case]
    assert_refused(make(tmp_path), match, capsys, tmp_path)
