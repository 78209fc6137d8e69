"""Tiny tokenizers built offline (character level), saved in HuggingFace format.

Used by the toy model family and by tests, where no tokenizer can be downloaded.

The tokenizer is a byte-level BPE with no merges — Qwen2's own pipeline with one token
per character. That matters: transformers 5 rebuilds the tokenizer of a `qwen2`
checkpoint as `Qwen2Tokenizer` (byte-level BPE) whatever `tokenizer.json` says, so only a
byte-level vocabulary (space = 'Ġ', newline = 'Ċ') encodes identically both ways.
"""

from __future__ import annotations

from typing import Sequence

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")


def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2 / Qwen)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def char_tokenizer(chars: Sequence[str], special: Sequence[str] = SPECIAL_TOKENS):
    """A `PreTrainedTokenizerFast` mapping each (single-byte) character to one id, special
    tokens first. Characters outside `chars` cannot be encoded (closed vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_unicode = byte_to_unicode()
    chars = list(dict.fromkeys(chars))
    for c in chars:
        if len(c.encode()) != 1:
            raise ValueError(f"char_tokenizer: {c!r} is not a single-byte character.")
    symbols = [to_unicode[c.encode()[0]] for c in chars]
    vocab = {tok: i for i, tok in enumerate(list(special) + [s for s in symbols if s not in special])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    pad, eos, bos = special[0], special[1], special[2] if len(special) > 2 else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
                                   clean_up_tokenization_spaces=False)
