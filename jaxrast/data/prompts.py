"""Prompt templates for math evaluation (used by `jaxrast decode` and GRPO) and prompt encoding.

A template is a Python `str.format` string over a normalised row's fields
(`{question}`, plus any extra field such as `{subject}`); literal braces are doubled
(`\\boxed{{}}`). `chat` is the tokenizer's own chat template, the row's question as the
user turn (after an optional system text).

Every command encodes prompts through `encode_prompts`, so decoding, serving, analysis and
GRPO feed the models the same ids: the tokenizer's default special tokens (a BOS where the
tokenizer adds one, as Llama 3's does; none for Qwen), except for text a chat template
rendered (it writes its own, as transformers' `apply_chat_template` tokenizes it) and for
text that continues a sequence (a forced continuation, a completion).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

CHAT = "chat"  # the tokenizer's chat template (`render` needs the tokenizer)

# The RAST paper's default few-word CoT prompt, for base and RL models alike.
PAPER_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"

# Qwen2.5(-Math) chat format asking for a boxed final answer.
QWEN_BOXED_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within "
    "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)

TEMPLATES: dict[str, str] = {"paper": PAPER_TEMPLATE, "qwen_boxed": QWEN_BOXED_TEMPLATE}


def get_template(name_or_text: str) -> str:
    """A named template ("paper", "qwen_boxed", "chat") or, if the text has a `{field}`, itself.

    User templates come from config as literal text, e.g.
    `"Problem: {question}\\nSolution:"`.
    """
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    if name_or_text == CHAT:
        return CHAT
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(name_or_text)
                  if field is not None]
    except ValueError as err:
        raise ValueError(f"prompt template {name_or_text!r} is not a format string ({err}); write literal "
                         "braces doubled, e.g. '\\boxed{{}}'.") from None
    for field, spec, conversion in fields:
        # a width or a conversion is no part of a prompt, and `{question:>100000000}` would
        # make a 100 MB prompt before any limit could look at it
        if spec or conversion or not field.isidentifier():
            written = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"prompt template {name_or_text[:80]!r}: {{{written[:40]}}} is not a plain field; a "
                             "template's fields are row field names such as {question}, and literal braces are "
                             "doubled: '\\\\boxed{{}}'.")
    if fields:  # "\\boxed{{}}" alone has braces but no field: every prompt would be the same
        return name_or_text
    raise ValueError(
        f"unknown prompt template {name_or_text!r}: use one of {sorted([*TEMPLATES, CHAT])} "
        "or a format string with a field such as {question}"
    )


def render(template: str, row: Mapping[str, Any], tokenizer=None, system: str | None = None) -> str:
    """Fill `template` with the row's fields (`chat`: the tokenizer's chat template over
    `system` and the row's question); a missing field is named in the error."""
    if system is not None and template != CHAT:
        raise ValueError("a system text is the chat template's system turn; it needs the prompt template 'chat'.")
    if template == CHAT:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": str(row["question"])}]
        return chat_text(tokenizer, messages)
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


def adds_special_tokens(template: str) -> bool:
    """Whether a template's prompts are encoded with the tokenizer's special tokens: all but
    the chat template's, which writes its own (a BOS twice would be text the model never saw)."""
    return template != CHAT


def chat_text(tokenizer, messages: list[dict[str, str]], template: str | None = None) -> str:
    """The prompt text of a conversation, the assistant's turn opened: the tokenizer's chat
    template (or `template`). Encode it with `special_tokens=False`."""
    import jinja2

    template = template or getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not template:
        raise ValueError("prompt template 'chat' needs the tokenizer's chat template, and this checkpoint's "
                         "tokenizer has none; use 'paper', 'qwen_boxed' or a format string such as '{question}'.")
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except jinja2.TemplateError as err:  # the template refuses these messages (e.g. roles must alternate)
        raise ValueError(f"the chat template refuses these messages: {err}") from None


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token spells (a token's text in the vocabulary is at least
    as long): a prompt of more than context × this many bytes cannot fit the context."""
    try:
        return max(len(t.encode("utf-8")) for t in tokenizer.get_vocab())
    except (AttributeError, TypeError, ValueError):  # no tokenizer, or no vocabulary to read
        return 64


def encode_prompts(tokenizer, prompts: Sequence[str], *, special_tokens: bool = True,
                   max_bytes: int | None = None) -> list[list[int]]:
    """Token ids of each prompt as every command feeds them: with the tokenizer's default
    special tokens, or none (`special_tokens=False`: chat-rendered text, continuations).

    Refuses, before tokenizing, a prompt over `max_bytes` (it cannot fit the context, and a
    tokenizer may take seconds or panic on it), and after, prompts with characters the
    tokenizer drops (a closed character vocabulary such as the toy family's): the models would
    silently see other text than the prompt."""
    for prompt in prompts:
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"the prompt {prompt[:40]!r}... is {size} bytes, over the limit of {max_bytes} bytes "
                             "(--max-prompt-bytes; by default more than the context's tokens can spell): shorten it.")
    encoded = [tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"] for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        lost = {c for c in set(prompt) - set(tokenizer.decode(ids)) if not c.isspace()}
        if lost:
            raise ValueError(f"the tokenizer cannot encode {''.join(sorted(lost))!r} of the prompt {prompt[:60]!r}; "
                             "use a prompt template and data within its vocabulary (the toy family's "
                             "template is '{question}').")
    return encoded
