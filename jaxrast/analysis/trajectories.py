"""Decoded trajectories as analyses read them: from `jaxrast decode` JSONL, and row selectors."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from jaxrast.data.prompts import adds_special_tokens, encode_prompts


@dataclasses.dataclass
class Trajectory:
    """One decoded row: prompt ids and generated ids (up to and including the stop token)."""

    prompt_ids: list[int]
    token_ids: list[int]
    id: str = ""
    sample: int = 0

    @property
    def name(self) -> str:
        return f"{self.id}#{self.sample}"


def _row_ids(row: Mapping[str, Any], ids_key: str, text_key: str, tokenizer, where: str,
             special_tokens: bool = False) -> list[int]:
    if ids_key in row:
        return [int(t) for t in row[ids_key]]
    if text_key not in row:
        raise ValueError(f"{where} has neither {ids_key!r} nor {text_key!r}; analyses read `jaxrast decode` "
                         "output (prompt + completion, or prompt_ids + token_ids).")
    if tokenizer is None:
        raise ValueError(f"{where} holds text only; pass a tokenizer to re-tokenize it.")
    return encode_prompts(tokenizer, [row[text_key]], special_tokens=special_tokens)[0]


def read_trajectories(path: str, tokenizer=None, *, limit: int | None = None) -> list[Trajectory]:
    """Trajectories of a `jaxrast decode` JSONL file (first `limit` rows).

    Ids are taken from `prompt_ids` / `token_ids` when present (`--save-token-ids`), else the
    `prompt` / `completion` text is re-tokenized: exact for character tokenizers, but a BPE
    tokenizer may split re-encoded text differently from the generated ids, and the text
    lacks the stop token (eos or the stop string)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"trajectory file {path} does not exist; write one with "
                                f"`jaxrast decode ... --save-token-ids --out {path}`.")
    out: list[Trajectory] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno} is not valid JSON; repair or remove the line.") from None
            where = f"{path}:{lineno}"
            # the prompt's ids as decoding made them: special tokens as the tokenizer adds them,
            # unless a chat template wrote its own
            prompt = _row_ids(row, "prompt_ids", "prompt", tokenizer, where,
                              special_tokens=adds_special_tokens(row.get("prompt_template", "")))
            if not prompt:
                raise ValueError(f"{where} has an empty prompt; its first token has no prefix to predict it from.")
            out.append(Trajectory(prompt, _row_ids(row, "token_ids", "completion", tokenizer, where),
                                  str(row.get("id", lineno)), int(row.get("sample", 0))))
    return out


def parse_row_selector(specs: Sequence[str]) -> Callable[[str, int], bool]:
    """'ID' (every sample of a row) or 'ID:SAMPLE' -> predicate (id, sample) -> selected."""
    whole, single = set(), set()
    for spec in specs:
        head, sep, tail = str(spec).rpartition(":")
        if sep and tail.isdigit():
            single.add((head, int(tail)))
        else:
            whole.add(str(spec))
    return lambda row_id, sample: str(row_id) in whole or (str(row_id), int(sample)) in single
