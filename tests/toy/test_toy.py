"""The toy chain task: generator, formats, checker, corpus batches, reward; the demo on the family."""

import json
import os

import numpy as np
import pytest
from hf_fixtures import REPO

from jaxrast.toy.task import ChainTask, CorpusMix, chain_reward, corpus_batch

FAMILY = os.path.join(REPO, "jaxrast", "toy", "family")


def test_problem_formats_and_checker():
    task = ChainTask()
    p = {"start": 74, "chain": [("+", 5), ("*", 3), ("+", 41), ("-", 7)], "answer": 71}
    assert task.prompt(p) == "Q 74 +05 *03 +41 -07\nA:"
    assert task.solution(p, "stepwise") == "74+05=79 79*03=37 37+41=78 78-07=71 #71\n"
    assert task.solution(p, "direct") == "#71\n"
    assert task.is_correct("74+05=79 79*03=37 37+41=78 78-07=71 #71\n", 71)
    assert task.is_correct("#71", "71") and not task.is_correct("#17\n", 71) and not task.is_correct("71", 71)
    assert not task.is_correct("#71 #72", 71)  # only the final answer counts
    assert task.style("#71\n") == "direct" and task.style("74+05=79 #79") == "stepwise" and task.style("x") == "other"
    assert task.step_accuracy("74+05=79 79*03=36 #36") == (1, 2)
    with pytest.raises(ValueError, match="unknown solution style"):
        task.solution(p, "verbose")


def test_generator_is_seeded_and_answers_are_exact():
    task = ChainTask()
    a, b = task.rows(50, seed=3), task.rows(50, seed=3)
    assert a == b and a != task.rows(50, seed=4)
    assert len({len(r["question"]) for r in a}) == 1  # fixed width: one prompt length
    for r in a:
        value = r["start"]
        for op, x in r["chain"]:
            value = task.apply(value, op, x)
        assert str(value) == r["answer"]
        p = {"start": r["start"], "chain": [tuple(c) for c in r["chain"]], "answer": value}
        assert task.is_correct(task.solution(p, "stepwise"), r["answer"])


def test_corpus_batch_packs_whole_documents():
    from jaxrast.toy.pretrain import toy_tokenizer
    tok = toy_tokenizer()
    tokens, mask = corpus_batch(ChainTask(), tok, np.random.default_rng(0), 16, 64, CorpusMix())
    assert tokens.shape == (16, 65) and mask.shape == (16, 64)
    text = tok.decode(tokens[0], skip_special_tokens=False)
    assert text.startswith(("Q ", "F "))  # every row starts a document at position 0
    assert mask.sum() > 0.7 * mask.size
    # the mix is respected: drills only
    only, _ = corpus_batch(ChainTask(), tok, np.random.default_rng(1), 8, 64, CorpusMix(1.0, 0.0, 0.0))
    assert all(tok.decode(r, skip_special_tokens=True).startswith("F ") for r in only)


def test_chain_reward():
    assert chain_reward(["p", "p"], ["12+03=15 #15\n", "#14\n"], answer=["15", "15"]) == [1.0, 0.0]


@pytest.mark.skipif(not os.path.exists(os.path.join(FAMILY, "m_rl", "config.json")), reason="toy family not built")
def test_demo_runs_on_the_shipped_family(tmp_path):
    from jaxrast.cli import main
    out = tmp_path / "demo.json"
    assert main(["demo", "--problems", "24", "--k", "2", "--sweep", "0", "1", "--sweep-problems", "8",
                 "--out-dir", str(tmp_path), "--json", str(out), "--no-progress"]) == 0
    result = json.load(open(out))
    assert [r["name"] for r in result["rows"]] == ["S_base", "S_RL", "M_base", "M_base + ΔR_S (RAST)", "M_RL"]
    assert {"avg", "pass@1", "pass@2"} <= set(result["rows"][0])
    assert os.path.exists(result["plots"]["pass_at_k"]) and os.path.exists(result["plots"]["lambda_sweep"])
