"""Evaluation data: the six shipped math test sets and any JSONL / `datasets` source.

Every loader returns *normalised rows*: dicts with

- ``id`` (str): the key predictions are joined on (never line order);
- ``question`` (str): the problem text that prompt templates render as ``{question}``;
- ``answer`` (str, or list[str] of acceptable answers): the gold final answer;

plus every other field of the source row ("extra fields": ``subject``, ``level``,
``solution``...). A worked solution the gold was read from (GSM8K's ``answer``) is kept
as ``solution``; a source ``answer`` field that is not the gold becomes ``source_answer``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jaxrast.eval.extract import last_boxed

Row = dict[str, Any]
Gold = str | list[str]

ANSWER_FORMATS = ("plain", "gsm8k", "boxed", "list")


@dataclass(frozen=True)
class FieldMap:
    """Which source fields hold the id, question and answer, and how to read the answer.

    `id=None` numbers rows by position (0, 1, ...) — only for sources without an id
    column; the position is the row's id and predictions must carry it.
    `answer_format`: "plain" (the field is the answer), "gsm8k" (the number after
    "####"), "boxed" (the last \\boxed{} of the field), "list" (a list of acceptable
    answers).
    """

    id: str | None = "id"
    question: str = "question"
    answer: str = "answer"
    answer_format: str = "plain"

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"answer_format {self.answer_format!r} is not one of {ANSWER_FORMATS}"
            )


@dataclass(frozen=True)
class BenchmarkSpec:
    """A shipped test set: its file, field map, and the fields metrics are grouped by."""

    file: str
    fields: FieldMap
    group_by: tuple[str, ...] = ()
    # Extraction falls back to the last number in the text (numeric-answer sets).
    last_number_fallback: bool = True
    description: str = ""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec(
        "math500.jsonl",
        FieldMap(id="unique_id", question="problem", answer="answer"),
        group_by=("subject", "level"),
        description="MATH500 (Lightman et al. 2023 subset of MATH)",
    ),
    "gsm8k": BenchmarkSpec(
        "gsm8k.jsonl",
        FieldMap(id="idx", question="question", answer="answer", answer_format="gsm8k"),
        description="GSM8K test split",
    ),
    "aime24": BenchmarkSpec(
        "aime24.jsonl",
        FieldMap(id="id", question="problem", answer="answer"),
        description="AIME 2024 I and II",
    ),
    "amc23": BenchmarkSpec(
        "amc23.jsonl",
        FieldMap(id="id", question="problem", answer="answer"),
        description="AMC 2023 (12A/12B)",
    ),
    "minerva": BenchmarkSpec(
        "minerva_math.jsonl",
        FieldMap(id="idx", question="problem", answer="solution", answer_format="boxed"),
        group_by=("type",),
        description="Minerva math (OCW courses)",
    ),
    "olympiadbench": BenchmarkSpec(
        "olympiadbench.jsonl",
        FieldMap(id="id", question="question", answer="final_answer", answer_format="list"),
        group_by=("subfield",),
        description="OlympiadBench, English text-only math (OE_TO_maths_en_COMP)",
    ),
}
ALIASES = {"minerva_math": "minerva", "olympiad": "olympiadbench", "math": "math500"}


def list_benchmarks() -> list[str]:
    """Names accepted by `load_benchmark`."""
    return sorted(BENCHMARKS)


def is_benchmark(name: str) -> bool:
    """Whether `name` is a shipped benchmark (or one of its aliases), not a path or hub name."""
    return str(name).lower() in (*BENCHMARKS, *ALIASES)


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec of a shipped benchmark (case-insensitive, a few aliases)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(list_benchmarks())}")
    return BENCHMARKS[key]


def canonical_name(name: str) -> str:
    """`"minerva_math"` -> `"minerva"`; raises ValueError for unknown names."""
    benchmark_spec(name)
    return ALIASES.get(name.lower(), name.lower())


def load_benchmark(name: str) -> list[Row]:
    """The normalised rows of a shipped test set, in file order."""
    spec = benchmark_spec(name)
    text = resources.files("jaxrast").joinpath("data", "benchmarks", spec.file).read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return normalise_rows(rows, spec.fields, source=name)


def read_jsonl(path: str | Path) -> list[Row]:
    """Rows of a JSONL file; the error names the file and line of a malformed row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):  # noqa: B007 - the error below names the line
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
                rows.append(row)
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text; a JSONL file is one JSON object per line") from None
    return rows


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' (the HuggingFace hub's dataset ids), not a path: one slash, no file
    extension, not starting with '.', '/' or '~'."""
    parts = name.split("/")
    return (len(parts) == 2 and all(p and p not in (".", "..") for p in parts) and not name.startswith(("~", "."))
            and not name.endswith((".jsonl", ".json", ".csv", ".parquet", ".txt")) and " " not in name)


def load_rows(
    source: str | Path | Iterable[Mapping[str, Any]],
    fields: FieldMap | Mapping[str, str] | None = None,
    *,
    split: str = "test",
    require_answer: bool = True,
) -> list[Row]:
    """Normalised rows from a benchmark name, a JSONL file, a `datasets` dataset or rows.

    `source` may be a shipped benchmark name (then `fields` must be None), a `.jsonl`
    path, a directory written by `datasets.Dataset.save_to_disk`, a `datasets` hub name
    (loaded with `split`, needs network or a local cache), or any iterable of dicts such
    as a `datasets.Dataset`. `fields` is a `FieldMap` or a dict of its fields, e.g.
    `{"id": "uid", "question": "prompt", "answer": "target", "answer_format": "gsm8k"}`.
    `require_answer=False` accepts rows without an answer (decoding needs only questions).
    """
    if isinstance(source, (str, Path)) and fields is None and is_benchmark(str(source)):
        return load_benchmark(str(source))
    fmap = _as_field_map(fields)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            return normalise_rows(read_jsonl(path), fmap, source=str(path), require_answer=require_answer)
        if path.is_dir():
            data = _load_from_disk(path, split)
        elif not looks_like_hub_id(str(source)):
            raise FileNotFoundError(
                f"no such file: {source}; it is neither a shipped benchmark ({', '.join(list_benchmarks())}) nor "
                "an existing file or directory (nor a HuggingFace hub dataset id, which looks like OWNER/NAME)")
        else:
            data = _load_from_hub(str(source), split)
        return normalise_rows(data, fmap, source=str(source), require_answer=require_answer)
    return normalise_rows(source, fmap, source=type(source).__name__, require_answer=require_answer)


def _load_from_disk(path: Path, split: str):
    """A directory written by `datasets.Dataset.save_to_disk` (its `split` if it holds several)."""
    import datasets  # heavy; only for dataset sources

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ValueError(f"{path} is a directory but not a saved datasets dataset ({type(err).__name__}); "
                         "pass a JSONL file or a datasets.save_to_disk directory") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path} has splits {sorted(data)}, not {split!r}; choose one with the split setting")
        data = data[split]
    return data


def _load_from_hub(name: str, split: str):
    """`datasets.load_dataset(name, split=split)`; any failure is a FileNotFoundError that
    says the name was tried on the hub because it looks like a hub id."""
    import datasets  # heavy; only for dataset sources

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - connection, not found, bad split: all mean "cannot use it"
        detail = next((line.strip()[:200] for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise FileNotFoundError(
            f"{name} is not a shipped benchmark ({', '.join(list_benchmarks())}) or a local file, and loading it "
            f"as a HuggingFace hub dataset id (split {split!r}) failed: {detail}. Check the name, the network "
            "(or HF_HUB_OFFLINE) and the split, or pass a local JSONL file") from None


def normalise_rows(rows: Iterable[Mapping[str, Any]], fields: FieldMap, *, source: str,
                   require_answer: bool = True) -> list[Row]:
    """Apply a field map to raw rows; errors name the source, row and missing field."""
    read_answer = _ANSWER_READERS[fields.answer_format]
    out: list[Row] = []
    seen: set[str] = set()
    for index, raw in enumerate(rows):
        needed = (fields.question,) + ((fields.answer,) if require_answer else ()) + ((fields.id,) if fields.id else ())
        for key in needed:
            if key not in raw:
                raise ValueError(
                    f"{source}: row {index} has no field {key!r} (fields: {sorted(raw)}); "
                    "fix the field mapping"
                )
        row_id = str(raw[fields.id]) if fields.id else str(index)
        if row_id in seen:
            raise ValueError(f"{source}: duplicate id {row_id!r}; ids must be unique")
        seen.add(row_id)
        row: Row = {k: v for k, v in raw.items() if k not in ("id", "question", "answer")}
        if "answer" in raw and fields.answer != "answer":
            row["source_answer"] = raw["answer"]  # a source "answer" that is not the gold
        if fields.answer_format in ("gsm8k", "boxed") and "solution" not in row and fields.answer in raw:
            row["solution"] = raw[fields.answer]  # the worked solution the answer came from
        row.update(id=row_id, question=str(raw[fields.question]))
        if fields.answer in raw:
            try:
                row["answer"] = _checked_gold(read_answer, raw[fields.answer])
            except ValueError as err:
                if require_answer:  # grading needs it; decoding a malformed row does not
                    raise ValueError(f"{source}: row {index} (id {row_id!r}): {err}; fix or drop the row") from None
        out.append(row)
    return out


def _as_field_map(fields: FieldMap | Mapping[str, str] | None) -> FieldMap:
    if fields is None:
        return FieldMap()
    if isinstance(fields, FieldMap):
        return fields
    unknown = set(fields) - {"id", "question", "answer", "answer_format"}
    if unknown:
        raise ValueError(f"unknown field-map keys {sorted(unknown)}; use id, question, answer, answer_format")
    return FieldMap(**fields)


def gold_answer(value: Any) -> Gold:
    """A gold answer as the grader takes it: text, or a list of acceptable texts (27.0 ->
    "27", 42 -> "42"); ValueError when null or empty."""
    return _checked_gold(_plain_answer, value)


def _checked_gold(read: Callable[[Any], Gold], value: Any) -> Gold:
    """The gold read from `value`, refusing a null or empty one (\\boxed{None} would match
    "None"; anything would miss "")."""
    gold = None if value is None else read(value)
    golds = [gold] if isinstance(gold, str) else list(gold or [])
    if gold is None or not golds or any(not g.strip() for g in golds):
        raise ValueError(f"empty or null gold answer {value!r}")
    return gold


def _plain_answer(value: Any) -> Gold:
    if isinstance(value, (list, tuple)):  # a list in a plain field: acceptable answers, not "['1', '2']"
        return _list_answer(value)
    # AMC23 stores answers as JSON floats (27.0); "27" is what a model writes.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _gsm8k_answer(value: Any) -> str:
    text = str(value)
    if "####" not in text:
        raise ValueError(f"GSM8K-style answer without '####': {text[:80]!r}")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def _boxed_answer(value: Any) -> str:
    boxed = last_boxed(str(value))
    if boxed is None:
        raise ValueError(f"no \\boxed{{}} answer in {str(value)[:80]!r}...")
    return boxed


def _list_answer(value: Any) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(_plain_answer(v)) for v in values]


_ANSWER_READERS: dict[str, Callable[[Any], Gold]] = {
    "plain": _plain_answer,
    "gsm8k": _gsm8k_answer,
    "boxed": _boxed_answer,
    "list": _list_answer,
}
