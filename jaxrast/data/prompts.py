"""Prompt templates for math evaluation (used by `jaxrast decode` and GRPO) and prompt encoding.

A template is a Python `str.format` string over a normalised row's fields
(`{question}`, plus any extra field such as `{subject}`); literal braces are doubled
(`\\boxed{{}}`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

# The RAST paper's default few-word CoT prompt, for base and RL models alike.
PAPER_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"

# Qwen2.5(-Math) chat format asking for a boxed final answer.
QWEN_BOXED_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within "
    "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)

TEMPLATES: dict[str, str] = {"paper": PAPER_TEMPLATE, "qwen_boxed": QWEN_BOXED_TEMPLATE}


def get_template(name_or_text: str) -> str:
    """A named template ("paper", "qwen_boxed") or, if the text has a `{field}`, itself.

    User templates come from config as literal text, e.g.
    `"Problem: {question}\\nSolution:"`.
    """
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(name_or_text) if field]
    except ValueError as err:
        raise ValueError(f"prompt template {name_or_text!r} is not a format string ({err}); write literal "
                         "braces doubled, e.g. '\\boxed{{}}'.") from None
    if fields:  # "\\boxed{{}}" alone has braces but no field: every prompt would be the same
        return name_or_text
    raise ValueError(
        f"unknown prompt template {name_or_text!r}: use one of {sorted(TEMPLATES)} "
        "or a format string with a field such as {question}"
    )


def render(template: str, row: Mapping[str, Any]) -> str:
    """Fill `template` with the row's fields; a missing field is named in the error."""
    try:
        return template.format(**row)
    except KeyError as err:
        field = err.args[0]
        raise ValueError(
            f"prompt template needs field {{{field}}} but the row has only {sorted(row)}; "
            "fix the template or the data's field mapping"
        ) from None
    except (IndexError, ValueError) as err:
        raise ValueError(
            f"prompt template is not a valid format string ({err}); "
            "write literal braces as {{ and }}"
        ) from None


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, without special tokens (as decoding and GRPO feed them). Refuses prompts with
    characters the tokenizer drops (a closed character vocabulary such as the toy family's):
    the models would silently see other text than the prompt."""
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        lost = {c for c in set(prompt) - set(tokenizer.decode(ids)) if not c.isspace()}
        if lost:
            raise ValueError(f"the tokenizer cannot encode {''.join(sorted(lost))!r} of the prompt {prompt[:60]!r}; "
                             "use a prompt template and data within its vocabulary (the toy family's "
                             "template is '{question}').")
    return encoded
