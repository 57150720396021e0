"""Per-token logprobs as results carry them: read from the engine's ResultTokens, shaped as
OpenAI's `logprobs.content` entries plus token ids.

The engine computes them on device (engine.sampling.token_logprobs: the float32 log-softmax of
the raw logits, before temperature, top-k/top-p and constraints) only in calls that serve a
request asking for them; the batcher keeps each token's values until the request finishes.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def logprob_at(res, row: int, step: int) -> Optional[tuple]:
    """(logprob, top ids, top logprobs) of one token of a ResultTokens, or None if it has none."""
    if res.logprobs is None:
        return None
    return (float(np.asarray(res.logprobs)[row, step]), np.asarray(res.top_ids)[row, step],
            np.asarray(res.top_logprobs)[row, step])


def logprob_entries(tokens: list, items: list, k: int, tokenizer=None, request_id: Any = None) -> list:
    """One entry per completion token: {"token_id", "token", "logprob", "top_logprobs": the k
    most likely [{"token_id", "token", "logprob"}]}; "token" is the token decoded alone (None
    without a tokenizer)."""
    text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else (lambda t: None)
    out = []
    for tok, item in zip(tokens, items):
        if item is None:
            raise RuntimeError(f"request {request_id!r}: the engine returned no logprobs for a token")
        lp, ids, lps = item
        out.append({"token_id": int(tok), "token": text(int(tok)), "logprob": lp,
                    "top_logprobs": [{"token_id": int(i), "token": text(int(i)), "logprob": float(p)}
                                     for i, p in zip(ids[:k], lps[:k])]})
    return out
