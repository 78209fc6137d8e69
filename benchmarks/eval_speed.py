"""Acceptance 5: time `jaxrast eval` on N synthetic predictions (default 5,000).

    PYTHONPATH=. python benchmarks/eval_speed.py [--samples 10] [--chars 3000]

MATH500 x `samples` completions of about `chars` characters, ending in a correct box,
a random wrong fraction, or a stated perturbed answer (so most (answer, gold) pairs are
distinct and the grader cannot lean on its de-duplication).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from jaxrast.cli import main as cli_main
from jaxrast.data.rows import load_benchmark


def synthetic_predictions(samples: int, chars: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    filler = ("We expand the product and collect terms: $x^2 + 2x + 1 = (x+1)^2$, so " * 200)[:chars]
    rows = []
    for gold in load_benchmark("math500"):
        for s in range(samples):
            roll = rng.random()
            if roll < 0.4:
                end = f"\\boxed{{{gold['answer']}}}"
            elif roll < 0.8:
                end = f"\\boxed{{\\frac{{{rng.randint(-500, 5000)}}}{{{rng.randint(1, 9)}}}}}"
            else:
                end = f"the answer is ${gold['answer']} + {rng.randint(1, 99)}$."
            rows.append({"id": gold["id"], "sample": s, "completion": filler + end, "benchmark": "math500"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="samples per MATH500 problem")
    parser.add_argument("--chars", type=int, default=3000, help="characters per completion")
    args = parser.parse_args()
    rows = synthetic_predictions(args.samples, args.chars)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preds.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        start = time.monotonic()
        cli_main(["eval", "--pred", str(path), "--json", str(Path(tmp) / "report.json"), "--no-progress"])
        print(f"{len(rows)} predictions evaluated in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    main()
