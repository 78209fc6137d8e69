"""The toy "chain" task: a start value and a chain of operations, applied left to right.

    prompt     Q 374 +05 -93 +41 -07\\nA:
    direct     #320\\n                                          (a guess: rarely right)
    stepwise   374+05=379 379-93=286 286+41=327 327-07=320 #320\\n   (careful: usually right)
    drill doc  F 374+05=379\\nF 512-48=464\\n...                 (single steps, packed)

All numbers are fixed-width, so every prompt has the same length. The pretraining corpus
makes the short, error-prone direct style the models' default while the careful stepwise
style exists in the data and is far more accurate; RL activates it (the paper's
hypothesis), and RAST transfers that activation from a small model to a larger one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

CHARS = "0123456789 +-*=#\nQAF:"
_ANSWER = re.compile(r"#(\d+)\s*$")
_STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


@dataclasses.dataclass(frozen=True)
class ChainTask:
    """Values modulo `modulus` (`value_digits` wide), `steps` operations drawn from `ops`.
    +/- operands are 1..`add_max`, * operands 2..`mul_max` (each `operand_digits` wide)."""

    modulus: int = 100
    steps: int = 4
    ops: str = "+-*"
    add_max: int = 99
    mul_max: int = 9
    value_digits: int = 2
    operand_digits: int = 2

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One problem: start value, [(op, operand)], the exact answer."""
        value = int(rng.integers(0, self.modulus))
        start, chain = value, []
        for _ in range(self.steps):
            op = self.ops[int(rng.integers(0, len(self.ops)))]
            operand = int(rng.integers(2, self.mul_max + 1)) if op == "*" else int(rng.integers(1, self.add_max + 1))
            value = self.apply(value, op, operand)
            chain.append((op, operand))
        return {"start": start, "chain": chain, "answer": value}

    def apply(self, value: int, op: str, operand: int) -> int:
        out = value + operand if op == "+" else value - operand if op == "-" else value * operand
        return out % self.modulus

    def v(self, x: int) -> str:
        return f"{x:0{self.value_digits}d}"

    def o(self, x: int) -> str:
        return f"{x:0{self.operand_digits}d}"

    def prompt(self, problem: dict[str, Any]) -> str:
        ops = " ".join(f"{op}{self.o(x)}" for op, x in problem["chain"])
        return f"Q {self.v(problem['start'])} {ops}\nA:"

    def steps_text(self, problem: dict[str, Any]) -> list[str]:
        value, out = problem["start"], []
        for op, x in problem["chain"]:
            new = self.apply(value, op, x)
            out.append(f"{self.v(value)}{op}{self.o(x)}={self.v(new)}")
            value = new
        return out

    def solution(self, problem: dict[str, Any], style: str) -> str:
        answer = f"#{self.v(problem['answer'])}\n"
        if style == "direct":
            return answer
        if style == "stepwise":
            return " ".join(self.steps_text(problem)) + " " + answer
        raise ValueError(f"unknown solution style {style!r}; use 'direct' or 'stepwise'.")

    def drill(self, rng: np.random.Generator) -> str:
        """One single-step fact line."""
        p = dataclasses.replace(self, steps=1).sample(rng)
        op, x = p["chain"][0]
        return f"F {self.v(p['start'])}{op}{self.o(x)}={self.v(p['answer'])}\n"

    # ---- reading model output ------------------------------------------------------------

    @staticmethod
    def extract(completion: str) -> int | None:
        m = _ANSWER.search(completion.strip("\n") + "\n")
        return int(m.group(1)) if m else None

    def is_correct(self, completion: str, answer: int | str) -> bool:
        got = self.extract(completion)
        return got is not None and got == int(answer)

    @staticmethod
    def style(completion: str) -> str:
        """'direct' (answer first), 'stepwise' (starts with a step) or 'other'."""
        text = completion.lstrip()
        if text.startswith("#"):
            return "direct"
        return "stepwise" if _STEP.match(text) else "other"

    def step_accuracy(self, completion: str) -> tuple[int, int]:
        """(correct, total) arithmetic of the written steps, judged on their own operands."""
        steps = _STEP.findall(completion)
        ok = sum(self.apply(int(a), op, int(b)) == int(c) for a, op, b, c in steps)
        return ok, len(steps)

    def rows(self, n: int, seed: int, id_prefix: str = "toy") -> list[dict[str, Any]]:
        """`n` problems as dataset rows (id, question = the prompt, answer) for decode/eval/GRPO."""
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            p = self.sample(rng)
            out.append({"id": f"{id_prefix}-{seed}-{i}", "question": self.prompt(p), "answer": str(p["answer"]),
                        "start": p["start"], "chain": [list(c) for c in p["chain"]]})
        return out


@dataclasses.dataclass(frozen=True)
class CorpusMix:
    """Document proportions of the pretraining corpus (sum to 1)."""

    drill: float = 0.30
    stepwise: float = 0.15
    direct: float = 0.55


def corpus_batch(task: ChainTask, tok, rng: np.random.Generator, batch: int, seq_len: int,
                 mix: CorpusMix = CorpusMix()) -> tuple[np.ndarray, np.ndarray]:
    """A batch of whole documents packed from position 0 (each row starts a document, so
    positions match inference), separated by <eos>, padded. Returns (tokens [batch,
    seq_len+1] int32, loss mask [batch, seq_len] bool over the targets tokens[:, 1:])."""
    kinds = np.array(["drill", "stepwise", "direct"])
    probs = np.array([mix.drill, mix.stepwise, mix.direct], np.float64)
    probs = probs / probs.sum()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    vocab = {c: tok(c, add_special_tokens=False)["input_ids"][0] for c in CHARS}
    tokens = np.full((batch, seq_len + 1), pad, np.int32)
    for b in range(batch):
        ids: list[int] = []
        while True:
            kind = kinds[rng.choice(3, p=probs)]
            if kind == "drill":
                text = "".join(task.drill(rng) for _ in range(max(1, seq_len // 14)))
            else:
                p = task.sample(rng)
                text = task.prompt(p) + task.solution(p, kind)
            doc = [vocab[c] for c in text] + [eos]
            room = seq_len + 1 - len(ids)
            if len(doc) > room:
                if not ids:  # a drill longer than the row: cut at a line end
                    doc = doc[:room]
                else:
                    break
            ids.extend(doc)
            if len(ids) >= seq_len + 1:
                break
        tokens[b, :len(ids)] = ids
    mask = tokens[:, 1:] != pad
    return tokens, mask


def reward_fn(task: ChainTask):
    """GRPO reward: 1.0 for the exact final answer, else 0.0."""
    def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] = (), **_) -> list[float]:
        return [float(task.is_correct(c, a)) for c, a in zip(completions, answer)]
    reward.__name__ = "toy_exact_answer"
    return reward


def chain_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] = (), **_) -> list[float]:
    """The default task's GRPO reward, by name: `rewards: {"jaxrast.toy.task:chain_reward": 1.0}`."""
    return reward_fn(ChainTask())(prompts, completions, answer)
