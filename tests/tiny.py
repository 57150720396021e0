"""Shared helpers for tests: a byte-level tokenizer for the tiny 256-token configs."""

from __future__ import annotations

from engine.tokenizer import HFTokenizer


def byte_tokenizer() -> HFTokenizer:
    """Every byte is one token (ids 0..255), so any text round-trips through a vocab-256 model."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tok, bos_id=1, eos_ids=(2,), add_bos=True)
