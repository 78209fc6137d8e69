"""Bad-input tests' shared check: the command exits 2, its message names the problem, there
is no traceback, and no file under the watched directories changed (none created, removed
or rewritten)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from jaxrast.cli import main


def snapshot(*roots) -> dict[str, str]:
    """{path: sha256} of every file under `roots` (files or directories)."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(argv: list[str], match: str, capsys, *watched, absent: tuple[str, ...] = ()) -> str:
    """Runs `jaxrast ARGV` in this process and checks the refusal; returns stderr.

    match: a regular expression the message must contain; watched: directories or files
    that must be byte-for-byte unchanged; absent: texts the message must not contain
    (bytes of a file it must not have read)."""
    capsys.readouterr()
    before = snapshot(*watched)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, expected 2; stderr:\n{err}"
    assert re.search(match, err), f"{match!r} not in the message:\n{err}"
    assert "Traceback" not in err
    assert err.count("error:") == 1 and err.strip().startswith(f"jaxrast {argv[0]}: error:"), err
    for text in absent:
        assert text not in err, f"{text!r} leaked into the message:\n{err}"
    after = snapshot(*watched)
    changed = sorted(set(before) ^ set(after) | {p for p in before if p in after and before[p] != after[p]})
    assert not changed, f"files changed by a refused command: {changed}"
    return err


def jsonl_lines(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
