"""Pull the final answer out of a model completion (pure string code, no sympy).

Order of preference, as in the paper's evaluation:

1. the content of the last complete `\\boxed{...}` (also `\\fbox{...}` / `\\framebox{...}`),
   with nested braces;
2. the text after the last "the answer is";
3. the last number in the text (GSM8K style), when `last_number=True`.

Every function here runs in time linear in the input, whatever the input: a 100 KB
completion of unbalanced braces is scanned once, so extraction needs no timeout. The
judging of the extracted string (sympy) is what needs one; see `jaxrast.eval.judge`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Method = Literal["boxed", "answer_is", "last_number"]

# Commands whose braced argument is a final answer. `\boxed 5` (no braces) is legal TeX too.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox|framebox)\b\s*")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # \{ \} \\ are not braces
_WORD = re.compile(r"\S+")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
# A signed number: "1,234.5" (separators only between groups of three, so the list
# "1,2,5" is three numbers), "42", "3.14", ".5".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# "18 dollars", "20 miles per hour": a number then plain words, which are a unit unless
# they are mathematics ("2 pi", "3 square root of 2").
_NUMBER_THEN_WORDS = re.compile(rf"(?P<number>{_NUMBER.pattern})\s+(?P<words>[A-Za-z][A-Za-z\s/-]*)")
_MATH_WORDS = frozenset("pi i e sqrt root roots square squared cube cubed over times plus minus divided "
                        "power infinity and or to".split())
# Ends the "the answer is ..." span: a newline, or a full stop followed by space / end.
_SENTENCE_END = re.compile(r"\n|\.(?=\s|$)")
# A math span at most a few plain words after "answer is": "therefore $x=2$".
_LEADING_MATH = re.compile(
    r"(?:[A-Za-z,]+\s+){0,3}?(?:\$\$?(?P<dollar>[^$]+)\$|\\\((?P<paren>.+?)\\\))"
)


@dataclass(frozen=True)
class Extraction:
    """The answer string found in a completion and how it was found (None: nothing found)."""

    answer: str | None
    method: Method | None


def last_boxed(text: str) -> str | None:
    """Content of the last *complete* `\\boxed{...}` / `\\fbox{...}` / `\\framebox{...}`.

    Braces nest; escaped braces (`\\{`, `\\}`) do not count. A box left open by a
    truncated completion is skipped in favour of the last one that closed. `\\boxed 5`
    (no braces) yields the token after the command.
    """
    box_starts = {m.end(): m for m in _BOX_COMMAND.finditer(text)}
    if not box_starts:
        return None
    best: tuple[int, str] | None = None  # (end position, content) of the latest closed box
    # One pass over the braces (and escapes) after the first box, with a stack of open-brace
    # positions, so many unterminated boxes stay linear.
    stack: list[int] = []
    for token in _BRACE_OR_ESCAPE.finditer(text, min(box_starts)):
        ch = token.group(0)
        if ch == "{":
            stack.append(token.start())
        elif ch == "}" and stack:
            start = stack.pop()
            if start in box_starts:
                best = (token.start(), text[start + 1 : token.start()])
    for pos, match in box_starts.items():
        # Unbraced form `\boxed 42`: the command ends in whitespace and no brace follows.
        if match.group(0)[-1:].isspace() and not text.startswith("{", pos):
            word = _WORD.match(text, pos)
            token = word.group(0).rstrip("$.,") if word else ""
            if token and (best is None or pos > best[0]):
                best = (pos, token)
    return best[1].strip() if best else None


def answer_is(text: str) -> str | None:
    """The answer stated after the last "the answer is".

    When a math span (`$...$` or `\\(...\\)`) follows within a few words ("the answer
    is therefore $12$, since..."), that span; otherwise the text up to the end of the
    sentence or line.
    """
    matches = list(_ANSWER_IS.finditer(text))
    last = matches[-1] if matches else None
    if last is None:
        return None
    rest = text[last.end() : last.end() + 500].strip()  # answers are short; bound the work
    math = _LEADING_MATH.match(rest)
    if math:
        span = math.group("dollar") or math.group("paren") or ""
    else:
        end = _SENTENCE_END.search(rest)
        span = rest[: end.start()] if end else rest
    span = span.strip().strip("$").strip().rstrip(".").strip()
    unit = _NUMBER_THEN_WORDS.fullmatch(span)
    if unit and not _MATH_WORDS.intersection(unit.group("words").lower().replace("-", " ").split()):
        return unit.group("number").replace(",", "")
    return span or None


def last_number(text: str) -> str | None:
    """The last number in the text with thousands separators removed ("1,234.5" -> "1234.5")."""
    matches = list(_NUMBER.finditer(text))
    last = matches[-1] if matches else None
    if last is None:
        return None
    number = last.group(0).replace(",", "")
    return number if any(c.isdigit() for c in number) else None


def extract_answer(text: str, *, last_number_fallback: bool = True) -> Extraction:
    """Find the final answer in `text`: last box, else "the answer is", else the last number."""
    boxed = last_boxed(text)
    if boxed:
        return Extraction(boxed, "boxed")
    stated = answer_is(text)
    if stated:
        return Extraction(stated, "answer_is")
    if last_number_fallback:
        number = last_number(text)
        if number:
            return Extraction(number, "last_number")
    return Extraction(None, None)
