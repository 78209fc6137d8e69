"""Array widths rounded to a few compiled shapes: a program compiles once per bucket."""

from __future__ import annotations


def bucket_length(n: int, minimum: int = 16) -> int:
    """`n` rounded up to a power of two (at least `minimum`): a handful of widths, each
    padded at most 2x."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))
