"""Answer extraction and judging: hand-checked cases, timeouts, the process pool."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from jaxrast.data.rows import load_benchmark
from jaxrast.eval.extract import answer_is, extract_answer, last_boxed, last_number
from jaxrast.eval.grading import grade, is_correct
from jaxrast.eval.judge import judge, normalise_answer
from jaxrast.eval.pool import GraderPool

# ---------------------------------------------------------------- extraction

EXTRACTION = [
    # (completion, expected answer, expected method)
    (r"So $x = \boxed{5}$.", "5", "boxed"),
    (r"\boxed{1} first, then \boxed{2}", "2", "boxed"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", "boxed"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", "boxed"),  # escaped braces do not close the box
    (r"\fbox{42} is it", "42", "boxed"),
    (r"$\framebox{204}$ minutes", "204", "boxed"),
    (r"thus \boxed 7.", "7", "boxed"),
    (r"\boxed{3} but then \boxed{4", "3", "boxed"),  # truncated last box: the last closed one
    (r"\boxed{ 12 }", "12", "boxed"),
    ("The answer is 18.", "18", "answer_is"),
    ("So the final answer is: $\\frac{3}{4}$.", r"\frac{3}{4}", "answer_is"),
    ("The answer is therefore $12$, since 3+9=12.", "12", "answer_is"),
    ("the answer is 3.5 dollars\nnext line 9", "3.5", "answer_is"),  # a unit after the number is dropped
    ("The answer is 20 miles per hour.", "20", "answer_is"),
    ("The answer is 1,000 people.", "1000", "answer_is"),
    ("The answer is 2 pi.", "2 pi", "answer_is"),  # mathematics, not a unit
    ("She pays 2 + 3 = 5 dollars, so 1,234 in total", "1234", "last_number"),
    ("temperature drops to -7 degrees", "-7", "last_number"),
    ("ratio is .5", ".5", "last_number"),
    ("the values are 1,2,5,8,9", "9", "last_number"),  # a list, not 12,589
    ("pays 12,3456 in all", "3456", "last_number"),  # not a thousands separator
    ("no numbers here", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text, answer, method", EXTRACTION)
def test_extract_answer(text, answer, method):
    found = extract_answer(text)
    assert (found.answer, found.method) == (answer, method)


def test_last_number_fallback_can_be_disabled():
    assert extract_answer("it is 5", last_number_fallback=False).answer is None


def test_extractors_return_none_without_a_match():
    assert last_boxed("no box") is None
    assert answer_is("no statement") is None
    assert last_number("none") is None


# ---------------------------------------------------------------- judging

EQUIVALENT = [
    # (model answer, gold): must be judged correct
    ("0.5", r"\frac{1}{2}"),
    ("1/2", r"\frac12"),
    (r"\dfrac{3}{4}", "0.75"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    ("84, 69", "69, 84"),
    (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
    ("[1,2)", "[1,2)"),
    (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\{2, 1\}", r"\{1,2\}"),
    ("50", r"50\%"),
    (r"50\%", r"50\%"),
    (r"12 \text{ km}", "12"),
    (r"\$18", "18"),
    ("18.00", "18"),
    ("1,000", "1000"),
    ("1 000 000", "1000000"),
    ("x=3", "3"),
    (r"\text{(C)}", "C"),
    ("4.5e33", r"4.5\times10^{33}"),
    ("4.5e33", "4.5e33"),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
    (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}"),
    (r"90^\circ", "90"),
    ("073", "73"),
    (r"\textbf{(073)}", "073"),
    (r"\mathbf{1 4 4 0 0}", "14400"),
    ("2x+1", "1+2x"),
    (r"x^2+2x+1", r"(x+1)^2"),
    (r"\pi", r"\pi"),
    (r"2\pi", r"2 \pi"),
    (r"-\frac{1}{3}", r"-\frac13"),
    (r"\$1.50", "1.5"),
    (r"1\,000", "1000"),  # LaTeX thousands spacing
    (r"1\;000", "1000"),
    ("1~000", "1000"),
    ("1{,}000", "1000"),
    (r"12.5\%", "12.5"),  # decimal percentages (math-verify alone matches whole ones only)
    ("17.5", r"17.5\%"),
    ("27", "27"),  # AMC23 stores 27.0; the loader gives "27"
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ("3+2i", "3+2i"),
    (r"y = 2x + 3", "y=2x+3"),
]

NEAR_MISS = [
    # (model answer, gold): close but wrong, must be judged incorrect
    ("0.51", r"\frac{1}{2}"),
    ("2", "3"),
    ("-5", "5"),
    ("(1,2]", "[1,2)"),
    ("(1,2)", "[1,2]"),
    (r"\{1,2,3\}", r"\{1,2\}"),
    ("69", "69, 84"),
    (r"\sqrt{3}", r"\sqrt{2}"),
    ("x+1", "x-1"),
    (r"2\pi", r"\pi"),
    ("4.5e32", "4.5e33"),
    ("1001", "1000"),
    ("(3, 1)", "(1, 3)"),  # tuples are ordered
    ("30", "30.5"),
    ("y=2x+4", "y=2x+3"),
    ("B", "C"),
    (r"\frac{1}{3}", "0.3"),
    ("10", "100"),
    ("3-2i", "3+2i"),
    (r"\infty", "0"),
    ("3{,}5", "35"),  # a decimal comma is not a thousands separator
    (r"12.5\%", "13.5"),
]


@pytest.mark.parametrize("answer, gold", EQUIVALENT)
def test_equivalent_forms_match(answer, gold):
    assert judge(answer, gold).correct, (answer, gold)


@pytest.mark.parametrize("answer, gold", NEAR_MISS)
def test_near_misses_do_not_match(answer, gold):
    assert not judge(answer, gold).correct, (answer, gold)


def test_hand_checked_case_count():
    assert len(EXTRACTION) + len(EQUIVALENT) + len(NEAR_MISS) >= 60


def test_is_correct_on_completions_and_gold_lists():
    assert is_correct(r"Hence the answer is $\boxed{\frac{2}{4}}$.", "0.5")
    assert is_correct(r"\boxed{7}", ["6", "7"])  # any acceptable answer
    assert not is_correct(r"\boxed{8}", ["6", "7"])
    assert not is_correct("no idea", "7")


def test_statuses():
    assert judge(None, "1").status == "no_answer"
    assert judge("x" * 5000, "1").status == "rejected"
    assert judge("(" * 30 + "1" + ")" * 30, "1").status == "rejected"
    assert judge("2", "2").status == "ok"


def test_vote_key_identifies_equivalent_spellings():
    assert judge(r"\frac{1}{2}", "7").vote_key == judge("1/2", "7").vote_key
    keys = {judge(a, "7").vote_key for a in ("18", "18.0", "36/2", "18.00")}
    assert len(keys) == 1, keys  # integers and decimals vote together
    assert judge("12.5", "7").vote_key == judge(r"\frac{25}{2}", "7").vote_key
    assert judge("0.1", "7").vote_key != judge("0.10001", "7").vote_key


def test_normalise_answer():
    assert normalise_answer(r"$\mathbf{1 2}$.") == "12"
    assert normalise_answer("6.02e23") == r"6.02\times10^{23}"
    assert normalise_answer("e^2") == "e^2"  # Euler's e is left alone


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"\\boxed{{__import__('os').system('touch {marker}')}}"
    assert not is_correct(payload, "0")
    assert not marker.exists()


def test_deadline_survives_a_swallowed_alarm():
    """Python swallows an exception raised in a weakref callback or __del__; the deadline must
    fire again rather than let the block run on without one."""
    from jaxrast.eval.judge import GradingTimeout, deadline

    swallowed = 0
    with pytest.raises(GradingTimeout):
        with deadline(0.05):
            for _ in range(100):  # 1 s at most
                try:
                    time.sleep(0.01)
                except GradingTimeout:
                    swallowed += 1
                    if swallowed > 1:
                        raise
    assert swallowed == 2


def test_judge_works_off_the_main_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(judge("0.5", r"\frac12").correct))
    thread.start()
    thread.join()
    assert out == [True]


# ---------------------------------------------------------------- bounded time

PATHOLOGICAL = {
    "100KB prose with numbers": ("lorem 12 ipsum {x} " * 6000)[:100_000],
    "100KB boxed expression": r"\boxed{" + "1+" * 50_000 + "1}",
    "100KB unclosed boxes": r"\boxed{" * 14_000,
    "100KB after answer is": "the answer is " + "x" * 100_000,
    "deeply nested fractions": r"\boxed{" + r"\frac{" * 300 + "1" + "}{2}" * 300 + "}",
    "deeply nested brackets": r"\boxed{" + "(" * 5000 + ")" * 5000 + "}",
    "power tower": r"\boxed{9^{9^{9^{9}}}}",
    "huge factorial": r"\boxed{(10^{100000})!}",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_output_is_incorrect_within_timeout(name):
    start = time.monotonic()
    verdict = grade(PATHOLOGICAL[name], "5", timeout=1.0)
    assert not verdict.correct
    assert time.monotonic() - start < 2.0, name


def test_pool_grades_pathological_outputs_within_deadline():
    texts = list(PATHOLOGICAL.values())
    with GraderPool(2, timeout=1.0, grace=1.0) as pool:
        start = time.monotonic()
        verdicts = pool.grade_many(texts, ["5"] * len(texts))
        assert time.monotonic() - start < 10
    assert not any(v.correct for v in verdicts)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_pool_kills_and_replaces_a_stuck_worker():
    with GraderPool(1, timeout=0.5, grace=0.5) as pool:
        assert pool.is_correct_many([r"\boxed{1}"], ["1"]) == [True]  # starts the worker
        stuck = pool._workers[0].process.pid
        os.kill(stuck, signal.SIGSTOP)  # a worker that ignores its own SIGALRM
        start = time.monotonic()
        verdict = pool.grade_many([r"\boxed{2}"], ["2"])[0]
        assert verdict.status == "timeout" and not verdict.correct
        assert time.monotonic() - start < 3
        assert pool._workers[0].process.pid != stuck
        assert pool.is_correct_many([r"\boxed{3}", r"\boxed{4}"], ["3", "5"]) == [True, False]


def test_worker_start_up_does_not_count_against_the_first_deadline():
    """A fresh worker takes seconds to import its parsers; a 0.4 s deadline still holds for
    its first item, because deadlines start once the worker reports ready."""
    with GraderPool(2, timeout=0.2, grace=0.2) as pool:
        assert pool.is_correct_many([r"\boxed{1}", r"\boxed{2}"], ["1", "3"]) == [True, False]


def test_pool_survives_a_dead_idle_worker_an_interrupt_and_two_threads(monkeypatch):
    from jaxrast.eval import pool as grading_pool

    with GraderPool(1, timeout=2.0) as pool:
        assert pool.is_correct_many([r"\boxed{1}"], ["1"]) == [True]
        pool._workers[0].process.kill()  # died while idle (OOM killer): replaced, not a crash
        pool._workers[0].process.wait()
        assert pool.is_correct_many([r"\boxed{2}"], ["2"]) == [True]
        # Ctrl-C while a worker is busy: its late reply must not land in the next batch
        real = grading_pool._Worker.receive
        def interrupted(self):
            monkeypatch.setattr(grading_pool._Worker, "receive", real)
            raise KeyboardInterrupt
        monkeypatch.setattr(grading_pool._Worker, "receive", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.judge_many(["7"], ["7"])
        assert [j.correct for j in pool.judge_many(["3", "4"], ["5", "4"])] == [False, True]
        # two threads share the pool: each gets its own verdicts
        out = {}
        def grade(name, golds):
            out[name] = [j.correct for j in pool.judge_many([str(i) for i in range(12)], golds)]
        threads = [threading.Thread(target=grade, args=("right", [str(i) for i in range(12)])),
                   threading.Thread(target=grade, args=("wrong", [str(i + 1) for i in range(12)]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == {"right": [True] * 12, "wrong": [False] * 12}
    for bad in (dict(processes=-1), dict(processes=1, timeout=-3)):
        with pytest.raises(ValueError, match="GraderPool needs"):
            GraderPool(**bad)


def test_pool_in_process_mode_and_dedup():
    with GraderPool(0) as pool:
        verdicts = pool.grade_many([r"\boxed{2}"] * 3 + ["nothing"], ["2", "2", "3", "1"])
    assert [v.correct for v in verdicts] == [True, True, False, False]
    assert verdicts[3].status == "no_answer"


# ---------------------------------------------------------------- gold self-consistency


@pytest.fixture(scope="module")
def gold_pool():
    """One pool for every benchmark below (its workers start once; the pool's own tests are above)."""
    with GraderPool() as pool:
        yield pool


def _solution_text(row: dict) -> str:
    solution = row["solution"]
    return "\n".join(solution) if isinstance(solution, list) else solution


@pytest.mark.parametrize("name, floor", [("math500", 0.99), ("gsm8k", 0.99), ("minerva", 0.99), ("aime24", 0.95)])
def test_gold_solutions_grade_correct(gold_pool, name, floor):
    """Each problem's own worked solution, graded against its gold answer."""
    rows = load_benchmark(name)
    verdicts = gold_pool.grade_many([_solution_text(r) for r in rows], [r["answer"] for r in rows])
    rate = sum(v.correct for v in verdicts) / len(rows)
    assert rate >= floor, f"{name}: {rate:.4f}"


@pytest.mark.parametrize("name", ["math500", "gsm8k", "aime24", "amc23", "minerva", "olympiadbench"])
def test_boxed_gold_answer_matches_itself(gold_pool, name):
    """Every gold answer format (tuples, multi-answers, units, e-notation) is judged equal
    to itself when a model boxes it verbatim."""
    rows = load_benchmark(name)
    golds = [r["answer"] for r in rows]
    texts = [rf"The final answer is $\boxed{{{g if isinstance(g, str) else g[0]}}}$." for g in golds]
    verdicts = gold_pool.grade_many(texts, golds)
    failures = [(r["id"], r["answer"]) for r, v in zip(rows, verdicts) if not v.correct]
    assert not failures
