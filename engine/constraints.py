"""Structured output: a request's `json_schema`, `regex` or `choice` as a grammar, enforced
token by token with llguidance (no torch; its Rust matcher computes a vocabulary bitmask in
well under a millisecond for most steps).

The batcher keeps one `Matcher` per constrained request: its bitmask for the next token goes to
the engine with the decode call (engine.sampling.apply_token_mask), and each sampled token is
fed back. A completion whose finish_reason is "stop" is then complete under its grammar.
"""

from __future__ import annotations

import json
import threading
from typing import Optional

import numpy as np

from engine.request import RequestError, SamplingParams

_LOCK = threading.Lock()
_TOKENIZERS: dict = {}  # id(tokenizer), vocab -> (tokenizer, llguidance.LLTokenizer)


def grammar_for(sp: SamplingParams) -> Optional[str]:
    """The llguidance grammar of a request's constraint, or None when it has none."""
    import llguidance as llg
    if sp.json_schema is not None:
        return llg.LLMatcher.grammar_from_json_schema(sp.json_schema)
    if sp.regex is not None:
        return llg.LLMatcher.grammar_from_regex(sp.regex)
    if sp.choice:
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in sp.choice))
    return None


class _SentencePieceTokens:
    """What llguidance.TokenizerWrapper reads of a tokenizer, from a sentencepiece model."""

    def __init__(self, tok):
        sp = tok.sp
        self.eos_token_id = tok.eos_ids[0] if tok.eos_ids else None
        self.bos_token_id = tok.bos_id
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self._sp = sp

    def __call__(self, text):
        return self._sp.encode(text.decode() if isinstance(text, bytes) else text)


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's tokenizer for ours (built once per process and vocabulary: ~0.3 s)."""
    import llguidance as llg
    key = (id(tokenizer), vocab_size)
    with _LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        eos = list(tokenizer.eos_ids) or None
        inner = getattr(tokenizer, "tok", None)
        if inner is not None and hasattr(inner, "to_str"):  # a `tokenizers.Tokenizer`
            built = llg.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=eos)
        elif hasattr(tokenizer, "sp"):
            built = llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceTokens(tokenizer)), n_vocab=vocab_size,
                                    eos_token=eos)
        else:
            raise RequestError(f"structured output needs a Hugging Face or sentencepiece tokenizer, "
                               f"not {type(tokenizer).__name__}")
        _TOKENIZERS[key] = (tokenizer, built)
        return built


def _kind(sp: SamplingParams) -> str:
    return "json_schema" if sp.json_schema is not None else "regex" if sp.regex is not None else "choice"


def check(sp: SamplingParams, tokenizer, vocab_size: int) -> None:
    """Raise RequestError (one line) if the request's constraint does not compile."""
    import llguidance as llg
    if not sp.constrained:
        return
    if tokenizer is None:
        raise RequestError(f"{_kind(sp)} needs the model's tokenizer")
    try:
        grammar = grammar_for(sp)
    except ValueError as e:
        raise RequestError(f"invalid {_kind(sp)}: {' '.join(str(e).split())}") from None
    msg = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer, vocab_size))
    if msg and not msg.startswith("WARNING"):
        raise RequestError(f"invalid {_kind(sp)}: {' '.join(msg.split())[:300]}")


class Matcher:
    """One request's grammar state: the mask of allowed next tokens, fed each sampled token."""

    def __init__(self, sp: SamplingParams, tokenizer, vocab_size: int):
        import llguidance as llg
        self._m = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar_for(sp), log_level=0)
        if self._m.is_error():
            raise RequestError(f"invalid {_kind(sp)}: {' '.join(self._m.get_error().split())[:300]}")

    def fill_mask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, bit t % 32 of word t // 32)."""
        from llguidance.numpy import fill_next_token_bitmask
        fill_next_token_bitmask(self._m, bitmask, row)

    def consume(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise RequestError(f"constraint: token {token} rejected: {' '.join(self._m.get_error().split())[:200]}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes no further token (only EOS)."""
        return self._m.is_stopped()


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def open_mask(rows: int, vocab_size: int) -> np.ndarray:
    """A bitmask allowing every token, [rows, mask_words] int32."""
    return np.full((rows, mask_words(vocab_size)), -1, np.int32)
