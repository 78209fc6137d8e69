"""Acceptance 1: grade every problem's own worked solution against its gold answer.

    PYTHONPATH=. python benchmarks/gold_self_consistency.py [--failures]

Prints the rate per benchmark (AMC23 ships no solutions) and, with --failures, each
failure as id / gold / extracted answer / extraction method, for triage into grader
mistakes (fixed in jaxrast.eval.judge / jaxrast.eval.extract) and data quirks.
"""

from __future__ import annotations

import argparse
import time

from jaxrast.data.rows import list_benchmarks, load_benchmark
from jaxrast.eval.pool import GraderPool


def solution_text(row: dict) -> str | None:
    solution = row.get("solution")
    return "\n".join(solution) if isinstance(solution, list) else solution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", action="store_true", help="list every failure")
    args = parser.parse_args()
    with GraderPool() as pool:
        for name in list_benchmarks():
            rows = [r for r in load_benchmark(name) if solution_text(r)]
            if not rows:
                print(f"{name:14} no worked solutions shipped")
                continue
            start = time.monotonic()
            verdicts = pool.grade_many([solution_text(r) for r in rows], [r["answer"] for r in rows])
            correct = sum(v.correct for v in verdicts)
            print(f"{name:14} {correct:4d}/{len(rows):<4d} = {100 * correct / len(rows):6.2f}%"
                  f"   ({time.monotonic() - start:.1f}s)")
            if args.failures:
                for row, v in zip(rows, verdicts):
                    if not v.correct:
                        print(f"    {row['id']}\tgold={row['answer']!r}\tgot={v.answer!r}\t{v.method}\t{v.status}")


if __name__ == "__main__":
    main()
