"""Tiny tokenizers built offline (character level), saved in HuggingFace format.

Used by the toy model family and by tests, where no tokenizer can be downloaded.
"""

from __future__ import annotations

from typing import Sequence

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")


def char_tokenizer(chars: Sequence[str], special: Sequence[str] = SPECIAL_TOKENS):
    """A `PreTrainedTokenizerFast` mapping each character to one id (special tokens first).

    Unknown characters raise at encode time rather than silently mapping to <unk>: the toy
    corpora are closed-vocabulary.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(chars))
    vocab = {tok: i for i, tok in enumerate(list(special) + [c for c in chars if c not in special])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    pad, eos, bos = special[0], special[1], special[2] if len(special) > 2 else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
                                   clean_up_tokenization_spaces=False)
