"""Host time of stop-string checks over one completion: the tail check the batcher uses
(engine/stop_strings.py) against decoding the whole completion at every token, on the embedded
SmolLM2 tokenizer, for completions of several lengths (random token ids).

    python3 benchmarks/stop_strings.py --lengths 256 1024 2048
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import at_least  # noqa: E402
from engine.stop_strings import stop_cut, tail_tokens  # noqa: E402


def full_decode(tok, tokens, stops):
    text = tok.decode(tokens)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else None


def per_completion_ms(check, tok, ids, stops) -> float:
    """Milliseconds of checks over one completion, token by token (the list grows in place, as
    the batcher's does)."""
    tokens, start = [], time.perf_counter()
    for t in ids:
        tokens.append(t)
        check(tok, tokens, stops)
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=at_least(1), nargs="+", default=[256, 1024, 2048])
    p.add_argument("--stop", nargs="+", default=["###", "\n\nUser:"])
    args = p.parse_args(argv)
    from engine.config import ModelSource
    from engine.model_files import resolve_model
    tok = resolve_model(ModelSource())[2]
    stops = tuple(args.stop)
    tail = tail_tokens(stops)
    print("| completion tokens | full decode every token, ms (baseline) | tail check, ms | speed-up |")
    print("|---|---|---|---|")
    for n in args.lengths:
        ids = [int(t) for t in np.random.default_rng(n).integers(100, tok.vocab_size - 100, n)]
        full = per_completion_ms(full_decode, tok, ids, stops)
        fast = per_completion_ms(lambda k, t, s: stop_cut(k, t, s, tail), tok, ids, stops)
        print(f"| {n:,} | {full:.1f} | {fast:.1f} | {full / fast:.1f}x |")


if __name__ == "__main__":
    main()
