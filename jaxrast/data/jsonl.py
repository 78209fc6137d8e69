"""Resumable JSONL output: rows appended (and fsync'ed) as they finish, keyed by (id, sample),
so a rerun of the same command skips every row already written."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from jaxrast.runtime.distributed import broadcast_json, is_main, process_count


def read_finished(path: str, run: dict[str, Any]) -> set[tuple[str, int]]:
    """(id, sample) pairs already in `path`. A torn last line (a crash mid-write) is cut off
    so the file stays valid JSONL; rows from a different run configuration are an error."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno} is not valid JSON; repair or remove the line, or use a new "
                             "--out.") from None
        # keys a row lacks were not recorded by the jaxrast that wrote it: not a difference
        diff = {k: (row[k], run[k]) for k in run if k in row and row[k] != run[k]}
        if diff:
            changes = ", ".join(f"{k}: file {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path} already holds rows of another run ({changes}). "
                             "Use a new --out file, or the same settings to resume.")
        done.add((str(row["id"]), int(row["sample"])))
    return done


def finished_everywhere(path: str, run: dict[str, Any]) -> set[tuple[str, int]]:
    """`read_finished` on process 0 (it may cut a torn line off the file), shared with every
    process so all of them decode the same rows; its error, if any, is raised everywhere."""
    if process_count() == 1:
        return read_finished(path, run)
    shared: dict[str, Any] = {}
    if is_main():
        try:
            shared = {"done": sorted(read_finished(path, run))}
        except (ValueError, OSError) as err:
            shared = {"error": str(err)}
    shared = broadcast_json(shared)
    if "error" in shared:
        raise ValueError(shared["error"])
    return {(str(i), int(s)) for i, s in shared["done"]}


def append_rows(f, records: Sequence[dict[str, Any]]) -> None:
    """Appends JSON records to the open file `f` and makes them durable (a crash after this
    returns loses none of them; one during it leaves at most a torn last line)."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())
