"""A row's incremental text equals decoding all of its tokens, and its stop strings end it
where searching the whole text after every call does (the rule before the text was incremental)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from jaxrast.rast.detokenize import TextStream


@pytest.fixture(scope="module")
def byte_tokenizer():
    """One token per byte (multi-byte characters span tokens) plus an <eos> that decodes to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxrast.toy.tokenizer import byte_to_unicode

    symbols = ["<eos>"] + list(byte_to_unicode().values())
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)


def whole_text_stop(decode, ids, stops, after_tokens):
    """The stop rule on the whole text: the first stop string completed after `after_tokens`
    tokens, and the smallest prefix of tokens whose text holds it."""
    if not stops or len(ids) <= after_tokens:
        return None
    text = decode(ids)
    floor = len(decode(ids[:after_tokens])) if after_tokens else 0
    found = [i for s in stops for i in [text.find(s, max(0, floor - len(s) + 1))] if i >= 0]
    if not found:
        return None
    first = min(found)
    count = next(k for k in range(max(1, after_tokens + 1), len(ids) + 1)
                 if any(0 <= decode(ids[:k]).find(s, max(0, floor - len(s) + 1)) <= first for s in stops))
    return count, text[:first]


@pytest.mark.parametrize("seed", range(12))
def test_incremental_text_and_stops_match_the_whole_text(byte_tokenizer, seed):
    decode = functools.partial(byte_tokenizer.decode, skip_special_tokens=True)
    rng = np.random.default_rng(seed)
    words = ["ab", "é", "中文", "Question:", "\n", " ", "<eos>", "stop"]
    text_ids = [byte_tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    ids = [t for w in rng.integers(0, len(words), 60) for t in text_ids[w]]
    stops = [("\nQuestion:",), ("中",), ("stop", "op", "é"), ()][seed % 4]
    after = int(rng.integers(0, 20)) if seed % 2 else 0
    stream, sent, shown = TextStream(decode, stops), 0, ""
    while sent < len(ids):
        call = ids[sent:sent + int(rng.integers(1, 9))]
        sent += len(call)
        stream.extend(call)
        assert stream.text() == decode(ids[:sent])
        hit = stream.stop_in_call(after_tokens=after)
        assert hit == whole_text_stop(decode, ids[:sent], stops, after)
        if hit is not None:
            break
        shown = stream.text()[:stream.safe_end()]
        assert "\ufffd" not in shown  # never a partial character
    final = hit[1] if hit is not None else decode(ids)
    assert final.startswith(shown)  # nor the start of a stop string that then completed
