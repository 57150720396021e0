"""Grammar libraries for structured output, measured on the embedded model's tokenizer: how long
each takes to build its tokenizer and compile a constraint, and to produce one token mask.

    python3 benchmarks/grammar_libs.py [--json out.json]

llguidance is what the engine uses (engine/constraints.py). outlines-core is measured when it is
importable (`pip install outlines-core`; no torch). xgrammar is not measured: its wheel requires
torch, transformers and triton at run time, which this project keeps out of its dependencies.
Each constraint walks the same completion token by token; "mask ms" is the mean time to compute
the allowed-token mask at a step (llguidance: the packed bitmask the engine sends to the device;
outlines-core: the same bitmask through Guide.write_mask_into).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.structured_output import SCHEMA  # noqa: E402

CASES = {  # constraint -> a completion valid under it, walked token by token
    "json_schema": ({"json_schema": SCHEMA}, '{"name":"Paris","country":"France","population":2100000}'),
    "json_schema_recursive": ({"json_schema": {
        "type": "object", "properties": {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["value", "children"], "additionalProperties": False}},
        '{"value":1,"children":[{"value":2,"children":[]}]}'),
    "regex": ({"regex": r"[0-9]{3}-[a-z]{4,8}"}, "042-lighthouse"[:12]),
    "choice": ({"choice": ("positive", "negative", "neutral")}, "negative"),
}


def byte_tokens(tokenizer, vocab: int) -> list:
    """Each token id's bytes (byte-level BPE: the GPT-2 byte alphabet mapped back)."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    to_byte = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in keep:
            to_byte[chr(256 + n)] = b
            n += 1
    assert set(alphabet) <= set(to_byte)
    out = []
    for i in range(vocab):
        piece = tokenizer.tok.id_to_token(i) or ""
        out.append(bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else piece.encode())
    return out


def run_llguidance(tokenizer, vocab, sp, text) -> dict:
    from engine.constraints import Matcher, _TOKENIZERS, ll_tokenizer, open_mask
    _TOKENIZERS.clear()
    t0 = time.perf_counter()
    ll_tokenizer(tokenizer, vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = Matcher(sp, tokenizer, vocab)
    t_compile = time.perf_counter() - t0
    mask = open_mask(1, vocab)
    times = []
    for tok in tokenizer.encode(text)[1 if tokenizer.add_bos else 0:]:
        t0 = time.perf_counter()
        m.fill_mask(mask, 0)
        times.append(time.perf_counter() - t0)
        assert (mask[0, tok // 32] >> (tok % 32)) & 1, "the walked completion was refused"
        m.consume(tok)
    return {"tokenizer_s": round(t_tok, 3), "compile_s": round(t_compile, 4),
            "mask_ms_mean": round(1000 * float(np.mean(times)), 3), "mask_ms_max": round(1000 * max(times), 3),
            "steps": len(times)}


def run_outlines(tokenizer, vocab, sp, text, tokens_cache: dict) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    if "vocab" not in tokens_cache:
        pieces: dict = {}
        eos = tokenizer.eos_ids[0]
        for i, b in enumerate(byte_tokens(tokenizer, vocab)):
            if i != eos and b:
                pieces.setdefault(b, []).append(i)
        tokens_cache["vocab"] = Vocabulary(eos, pieces)
    t_tok = time.perf_counter() - t0
    if sp.json_schema is not None:
        regex = build_regex_from_schema(sp.json_schema)
    elif sp.regex is not None:
        regex = sp.regex
    else:
        import re
        regex = "(" + "|".join(re.escape(c) for c in sp.choice) + ")"
    t0 = time.perf_counter()
    guide = Guide(Index(regex, tokens_cache["vocab"]))
    t_compile = time.perf_counter() - t0
    mask = np.zeros(-(-vocab // 32), np.int32)
    times = []
    for tok in tokenizer.encode(text)[1 if tokenizer.add_bos else 0:]:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        times.append(time.perf_counter() - t0)
        guide.advance(tok)
    return {"tokenizer_s": round(t_tok, 3), "compile_s": round(t_compile, 4),
            "mask_ms_mean": round(1000 * float(np.mean(times)), 3), "mask_ms_max": round(1000 * max(times), 3),
            "steps": len(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from engine.default_model import default_model_path
    from engine.loaders.gguf import load_gguf
    from engine.request import SamplingParams
    ckpt = load_gguf(default_model_path())
    tok, vocab = ckpt.tokenizer, ckpt.config.vocab_size
    try:
        import outlines_core  # noqa: F401
        libs = ("llguidance", "outlines-core")
    except ImportError:
        libs = ("llguidance",)
    report, cache = {"vocab": vocab, "results": {}}, {}
    for name, (kw, text) in CASES.items():
        sp = SamplingParams(**kw)
        for lib in libs:
            try:
                r = run_llguidance(tok, vocab, sp, text) if lib == "llguidance" else run_outlines(tok, vocab, sp, text, cache)
            except Exception as e:  # a library that cannot take the constraint: say so
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            report["results"][f"{lib} {name}"] = r
            print(lib, name, json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
