"""Shipped benchmarks, JSONL / datasets loading with field maps, prompt templates."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from jaxrast.data.prompts import PAPER_TEMPLATE, QWEN_BOXED_TEMPLATE, get_template, render
from jaxrast.data.rows import FieldMap, list_benchmarks, load_benchmark, load_rows

SIZES = {"aime24": 30, "amc23": 40, "gsm8k": 1319, "math500": 500, "minerva": 272, "olympiadbench": 675}


def test_list_benchmarks():
    assert list_benchmarks() == sorted(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_benchmark_rows_are_normalised(name):
    rows = load_benchmark(name)
    assert len(rows) == SIZES[name]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids)
    for r in rows:
        assert isinstance(r["question"], str) and r["question"].strip()
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        assert answers and all(isinstance(a, str) and a.strip() for a in answers)


def test_license_ships_with_the_data():
    text = resources.files("jaxrast").joinpath("data", "benchmarks", "LICENSE-evaluation-data.txt").read_text()
    assert "MIT License" in text


def test_answer_fields():
    math500 = {r["id"]: r for r in load_benchmark("math500")}
    first = math500["test/precalculus/807.json"]
    assert first["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert first["subject"] == "Precalculus" and first["level"] == 2

    gsm8k = load_benchmark("gsm8k")
    assert gsm8k[0]["answer"] == "18" and "####" in gsm8k[0]["solution"]
    assert all("," not in r["answer"] for r in gsm8k)

    assert load_benchmark("amc23")[0]["answer"] == "27"  # JSON 27.0
    assert load_benchmark("aime24")[0]["answer"] == "204"
    assert load_benchmark("minerva")[0]["answer"] == "1.6"  # last \boxed{} of the solution
    olympiad = load_benchmark("olympiadbench")
    assert olympiad[0]["answer"] == ["2"] and olympiad[0]["subfield"] == "Combinatorics"


def test_aliases_and_unknown_names():
    assert len(load_benchmark("minerva_math")) == 272
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu")


def test_load_rows_from_jsonl_with_a_field_map(tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text(
        json.dumps({"uid": 7, "prompt": "1+1?", "target": "work... #### 2"}) + "\n\n"
        + json.dumps({"uid": 8, "prompt": "2+2?", "target": "so #### 1,004"}) + "\n"
    )
    rows = load_rows(path, {"id": "uid", "question": "prompt", "answer": "target", "answer_format": "gsm8k"})
    assert [(r["id"], r["question"], r["answer"]) for r in rows] == [("7", "1+1?", "2"), ("8", "2+2?", "1004")]
    assert rows[0]["target"] == "work... #### 2"  # extra fields kept


def test_load_rows_without_ids_numbers_rows(tmp_path):
    fields = FieldMap(id=None, question="q", answer="a", answer_format="boxed")
    rows = load_rows([{"q": "a", "a": r"so \boxed{3}"}], fields)
    assert rows[0]["id"] == "0" and rows[0]["answer"] == "3"


def test_load_rows_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list([{"idx": 1, "problem": "p", "answer": "5"}])
    rows = load_rows(data, {"id": "idx", "question": "problem"})
    assert rows == [{"idx": 1, "problem": "p", "id": "1", "question": "p", "answer": "5"}]


def test_load_rows_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_rows(tmp_path / "missing.jsonl", {"id": "id"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_rows(bad, {})
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"id": 1, "problem": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match="no field 'question'"):
        load_rows(ok, {})
    with pytest.raises(ValueError, match="unknown field-map keys"):
        load_rows(ok, {"prompt": "problem"})
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "question": "q", "answer": "1"}\n' * 2)
    with pytest.raises(ValueError, match="duplicate id"):
        load_rows(dup, {})
    for answer in ("null", '""', '"  "', "[]", '["1", ""]'):  # \boxed{None} must not match a null gold
        empty = tmp_path / "empty.jsonl"
        empty.write_text(f'{{"id": 1, "question": "q", "answer": {answer}}}\n')
        with pytest.raises(ValueError, match=r"row 0 \(id '1'\): empty or null gold"):
            load_rows(empty, {})
        assert "answer" not in load_rows(empty, {}, require_answer=False)[0]  # decoding needs no gold
    listed = tmp_path / "listed.jsonl"
    listed.write_text('{"id": 1, "question": "q", "answer": ["1", 2.0]}\n')
    assert load_rows(listed, {})[0]["answer"] == ["1", "2"]  # acceptable answers, not "['1', 2.0]"


def test_templates_render():
    row = {"id": "1", "question": "What is 1+1?", "answer": "2"}
    assert render(PAPER_TEMPLATE, row) == "Question:\nWhat is 1+1?\nAnswer:\nLet's think step by step.\n"
    qwen = render(QWEN_BOXED_TEMPLATE, row)
    assert "\\boxed{}" in qwen and qwen.endswith("<|im_start|>assistant\n") and "What is 1+1?" in qwen
    assert get_template("paper") is PAPER_TEMPLATE
    assert render(get_template("Q: {question} ({subject})"), {**row, "subject": "x"}) == "Q: What is 1+1? (x)"


def test_template_errors():
    with pytest.raises(ValueError, match=r"\{subject\}"):
        render("{question} {subject}", {"question": "q"})
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nonexistent")
    with pytest.raises(ValueError, match="literal braces"):
        render(r"\boxed{} {question}", {"question": "q"})
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template(r"\boxed{{}}")  # braces but no field: every prompt would be the same text
    with pytest.raises(ValueError, match="not a format string"):
        get_template("Q {question} }")
    for hostile in ("{question:>100000000}", "{question!r}", "{question.__class__}", "{question[0]}", "{0}"):
        with pytest.raises(ValueError, match="not a plain field"):  # a 100 MB prompt is never made
            get_template(hostile)
    assert get_template("chat") == "chat"
    with pytest.raises(ValueError, match="needs the prompt template 'chat'"):
        render("{question}", {"question": "q"}, system="be brief")
