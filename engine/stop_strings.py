"""Stop strings, checked as each token arrives without decoding the whole completion every time.

Decoding a request's tokens from the start at every step costs host time quadratic in its
length, and the batcher's host loop does it for every slot (BENCHMARKS.md, CPU: stop strings).
A stop string that first appears at the newest token lies within the text of the last few
tokens, so only a tail of tokens is decoded each step; the whole completion is decoded once,
when that tail holds a stop string, to cut it exactly as a full decode would.
"""

from __future__ import annotations

from typing import Optional, Sequence


def tail_tokens(stops: Sequence[str]) -> int:
    """How many of the newest tokens to decode: enough to hold the longest stop string even
    when every character takes 4 byte tokens (UTF-8), plus a margin for the tail's first
    characters, which may decode differently without the tokens before them (a split UTF-8
    sequence, a leading space a sentencepiece decoder drops)."""
    return 4 * (max(map(len, stops)) + 4) + 8


def stop_cut(tokenizer, tokens: Sequence[int], stops: Sequence[str], tail: int) -> Optional[str]:
    """The completion's text cut before its first stop string, or None if none has appeared.
    Called after each new token, it gives what cutting the full decode would, at the same token."""
    if len(tokens) > tail and not any(s in tokenizer.decode(tokens[-tail:]) for s in stops):
        return None
    text = tokenizer.decode(tokens)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else None
