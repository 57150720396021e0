"""Stop strings checked on a tail of tokens (engine/stop_strings.py) stop at the same token and cut
the same text as decoding the whole completion at every step, on a byte-level BPE tokenizer (the
embedded SmolLM2's) and a sentencepiece one with byte fallback, across multi-byte characters."""

from __future__ import annotations

import io

import numpy as np
import pytest

from engine.stop_strings import stop_cut, tail_tokens

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6 + "Café au lait, naïve façade ### end",
    "日本語のテキストと English words mixed together, again and again, " * 3 + "🙂 then STOP here 🙂 and more",
    "line one\nline two\n\nline three " * 8 + "Answer: 42\n\nQuestion: next",
]
STOPS = [("###",), ("STOP", "🙂"), ("\n\nQuestion:",), ("ï",), ("語の",), ("zzz-never",)]


def full_decode_cut(tok, tokens, stops):
    text = tok.decode(tokens)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else None


def assert_same_as_full_decode(tok, ids, stops):
    """Token by token up to the first stop, as the batcher calls it."""
    tail = tail_tokens(stops)
    for k in range(1, len(ids) + 1):
        want = full_decode_cut(tok, ids[:k], stops)
        assert stop_cut(tok, ids[:k], stops, tail) == want, (k, stops)
        if want is not None:
            return k
    return None


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    import sentencepiece as spm

    from engine.config import ModelSource
    from engine.model_files import resolve_model
    from engine.tokenizer import SentencePieceTokenizer
    buf = io.BytesIO()
    ascii_only = [TEXTS[0], "line one\nline two\nAnswer: 42 Question STOP"] * 20  # the rest: byte pieces
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ascii_only), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return {"smollm2": resolve_model(ModelSource())[2], "sentencepiece": SentencePieceTokenizer(str(path))}


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece"])
def test_tail_check_stops_where_a_full_decode_stops(tokenizers, name):
    tok = tokenizers[name]
    late = 0  # stops first met past the tail's length: found through the tail alone
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        for stops in STOPS:
            k = assert_same_as_full_decode(tok, ids, stops)
            late += k is not None and k > tail_tokens(stops)
    assert late >= 3
    # random ids: split UTF-8 sequences and byte pieces anywhere
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = [int(t) for t in rng.integers(3, tok.vocab_size, 160)]
        text = tok.decode(ids)
        stops = (text[-12:-9],) if len(text) > 12 and text[-12:-9].strip() else ("zzz-never",)
        assert_same_as_full_decode(tok, ids, stops)
