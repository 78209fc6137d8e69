"""Resumable JSONL output: rows appended (and fsync'ed) as they finish, keyed by (id, sample),
so a rerun of the same command skips every row already written.

A file is only written to once it is known to be ours: every complete line a row of this
job (a JSON object with `id` and `sample`) with the same settings and, for the ids decoded
again, the same prompt (`prompt_hash`). Only then is a torn last line (a crash mid-write)
cut off. Anything else (a text file, another run's rows, rows of other prompts) is refused
with the file left exactly as it was. `OutputFile` also locks the file, so a second process
writing the same `--out` is refused instead of writing every row twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

from jaxrast.runtime.distributed import broadcast_json, is_main, process_count
from jaxrast.runtime.files import check_writable, lock, make_parent

_ROW_START = b'{"id": '  # how every row `append_rows` writes begins (id is the first key)


def prompt_hash(prompt: str) -> str:
    """A short fingerprint of a rendered prompt, recorded in each row (`prompt_hash`)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _row_fingerprint(row: Mapping[str, Any]) -> str | None:
    if isinstance(row.get("prompt_hash"), str):
        return row["prompt_hash"]
    return prompt_hash(row["prompt"]) if isinstance(row.get("prompt"), str) else None  # rows of older versions


def _scan(path: str, data: bytes, run: Mapping[str, Any], prompts: Mapping[str, str] | None,
          normalise: Mapping[str, Callable[[Any], Any]]) -> set[tuple[str, int]]:
    """The (id, sample) pairs of the complete lines of `data`; ValueError unless each is a
    row of this run (same settings, same prompt for the ids in `prompts`)."""
    fix = "Use a new --out file (nothing in this one was changed)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 JSONL file of jaxrast rows. {fix}.") from None
    norm = {k: normalise.get(k, lambda v: v) for k in run}
    want = {k: norm[k](v) for k, v in run.items()}
    fingerprints = {i: prompt_hash(p) for i, p in (prompts or {}).items()}
    done = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno} is not valid JSON, so the file is not (only) jaxrast rows. "
                             f"{fix}, or repair or remove the line.") from None
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("sample"), int):
            raise ValueError(f"{path}:{lineno} is not a jaxrast row (a JSON object with 'id' and 'sample'). {fix}.")
        # keys a row lacks were not recorded by the jaxrast that wrote it: not a difference
        diff = {k: (row[k], run[k]) for k in run if k in row and norm[k](row[k]) != want[k]}
        if diff:
            changes = ", ".join(f"{k}: file {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path} already holds rows of another run ({changes}). "
                             "Use a new --out file, or the same settings to resume.")
        rid = str(row["id"])
        recorded = _row_fingerprint(row)
        if rid in fingerprints and recorded is not None and recorded != fingerprints[rid]:
            raise ValueError(f"{path}:{lineno}: row {rid!r} was decoded from another prompt than the dataset and "
                             "template give it now (the questions changed under the same ids). Use a new --out "
                             "file, or the data the rows were decoded from.")
        done.add((rid, int(row["sample"])))
    return done


def read_finished(path: str, run: dict[str, Any], prompts: Mapping[str, str] | None = None, *,
                  normalise: Mapping[str, Callable[[Any], Any]] | None = None, fd: int | None = None
                  ) -> set[tuple[str, int]]:
    """(id, sample) pairs already in `path`, after checking the whole file is ours.

    `run`: the settings every row records; `prompts`: id -> rendered prompt of the rows to
    decode (their fingerprints must match); `normalise`: key -> function applied to both
    sides before comparing (e.g. resolving model paths). A torn last line is cut off (through
    `fd` when given) only after every complete line passed, and only if it begins like one
    of our rows; otherwise the file is refused untouched.
    """
    if not os.path.exists(path):
        return set()
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a JSONL file path.")
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    complete, torn = data[:keep], data[keep:]
    done = _scan(path, complete, run, prompts, normalise or {})
    if torn:
        if not torn.startswith(_ROW_START):
            raise ValueError(f"{path} ends in an incomplete line that is not a jaxrast row. Use a new --out file "
                             "(nothing in this one was changed).")
        if fd is not None:
            os.ftruncate(fd, keep)
        else:
            with open(path, "r+b") as f:
                f.truncate(keep)
    return done


def shared_from_main(read: Callable[[], set[tuple[str, int]]]) -> set[tuple[str, int]]:
    """`read()` on process 0 (it may repair the file), shared with every process so all of
    them decode the same rows; its error, if any, is raised everywhere."""
    if process_count() == 1:
        return read()
    shared: dict[str, Any] = {}
    if is_main():
        try:
            shared = {"done": sorted(read())}
        except (ValueError, OSError) as err:
            shared = {"error": str(err)}
    shared = broadcast_json(shared)
    if "error" in shared:
        raise ValueError(shared["error"])
    return {(str(i), int(s)) for i, s in shared["done"]}


def finished_everywhere(path: str, run: dict[str, Any], prompts: Mapping[str, str] | None = None
                        ) -> set[tuple[str, int]]:
    """`read_finished` on process 0, shared with every process (see `shared_from_main`)."""
    return shared_from_main(lambda: read_finished(path, run, prompts))


class OutputFile:
    """A job's resumable `--out`, on the process that writes it: checked, locked, read and
    appended to. `open()` refuses an unwritable path, a file another process is writing
    (advisory lock) and a file that is not ours, before any model is loaded; `close()`
    removes the file again if this job created it and wrote nothing."""

    def __init__(self, path: str, what: str = "--out"):
        self.path, self.what = path, what
        self._file = None
        self._created = False

    def open(self, run: dict[str, Any], prompts: Mapping[str, str] | None = None, *,
             normalise: Mapping[str, Callable[[Any], Any]] | None = None) -> set[tuple[str, int]]:
        check_writable(self.path, self.what)
        make_parent(self.path, self.what)
        self._created = not os.path.exists(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"{self.what} {self.path}: cannot open it for writing ({err.strerror}).") from None
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        try:
            lock(fd, self.path, self.what)
            return read_finished(self.path, run, prompts, normalise=normalise, fd=fd)
        except BaseException:
            self.close()
            raise

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        append_rows(self._file, records)

    def close(self) -> None:
        if self._file is None:
            return
        if self._created and os.path.exists(self.path) and os.path.getsize(self.path) == 0:
            os.remove(self.path)  # ours, still empty: leave no trace of a run that wrote nothing (lock held)
        self._file.close()
        self._file = None

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_rows(f, records: Sequence[dict[str, Any]]) -> None:
    """Appends JSON records to the open file `f` and makes them durable (a crash after this
    returns loses none of them; one during it leaves at most a torn last line)."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())
