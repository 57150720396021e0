"""The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata.

"gpt2" -> byte-level BPE with the pre-tokenizer split that `tokenizer.ggml.pre` names (as
llama.cpp's llama-vocab.cpp does); "llama" -> a sentencepiece-style BPE over the stored pieces,
merges ordered by score, with byte fallback and sentencepiece's dummy-prefix space (as llama.cpp
applies it). `meta` is engine/loaders/gguf.py's typed view of the file's fields (`get`, `path`).
"""

from __future__ import annotations

import warnings

from engine.checkpoint import CheckpointError

# ggml token types (llama.h, `llama_token_type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits, keyed by `tokenizer.ggml.pre` (regexes as in llama.cpp's llama-vocab.cpp,
# written in the original tokenizer.json spelling, which the `tokenizers` regex engine reads).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre name -> (list of isolated splits applied in order, ignore_merges)
_PRE_SPLITS = {}
for _n in ("gpt2", "mpt", "olmo", "jais", "trillion", "granite-docling", "default", ""):
    # "default"/missing: llama.cpp falls back to a generic split and warns that quality degrades;
    # like transformers we use GPT-2's own byte-level split, which such vocabularies were built with.
    _PRE_SPLITS[_n] = ([_GPT2_SPLIT], False)
for _n in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"):
    _PRE_SPLITS[_n] = ([r"\p{N}", _GPT2_SPLIT], False)  # single digits, then GPT-2's split
for _n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"):
    _PRE_SPLITS[_n] = ([_LLAMA3_SPLIT], True)
for _n in ("dbrx", "smaug-bpe"):
    _PRE_SPLITS[_n] = ([_LLAMA3_SPLIT], False)
for _n in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"):
    _PRE_SPLITS[_n] = ([_QWEN2_SPLIT], False)
_PRE_SPLITS["tekken"] = ([_TEKKEN_SPLIT], False)
for _n in ("gpt-4o", "llama4"):
    _PRE_SPLITS[_n] = ([_GPT4O_SPLIT], False)
del _n


def _added_tokens(tokens, types):
    from tokenizers import AddedToken
    special, plain = [], []
    for tok, typ in zip(tokens, types or ()):
        if typ in (_CONTROL, _UNKNOWN):
            special.append(AddedToken(tok, normalized=False, special=True))
        elif typ == _USER_DEFINED:
            plain.append(AddedToken(tok, normalized=False, special=False))
    return special, plain


def _byte_level_tokenizer(meta, tokens, types):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = meta.get("tokenizer.ggml.merges") or []
    pre = meta.get("tokenizer.ggml.pre", "default") or "default"
    if pre not in _PRE_SPLITS:
        warnings.warn(f"{meta.path}: unknown tokenizer.ggml.pre {pre!r}; using GPT-2's byte-level split")
        pre = "default"
    splits, ignore_merges = _PRE_SPLITS[pre]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{meta.path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens, scores, types):
    """Merges a sentencepiece BPE vocabulary implies: every split of a piece into two pieces,
    best merged-piece score first (sentencepiece merges the highest-scoring pair)."""
    normal = set(i for i, t in enumerate(types) if t in (_NORMAL, _USER_DEFINED)) if types else None
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, piece in enumerate(tokens):
        if normal is not None and i not in normal:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = ids.get(left), ids.get(right)
            if li is None or ri is None:
                continue
            if normal is not None and (li not in normal or ri not in normal):
                continue
            found.append((-float(scores[i]), -len(left), li, ri, left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _sentencepiece_tokenizer(meta, tokens, types):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # As sentencepiece and llama.cpp: spaces become U+2581 and every run of text gets one
    # prepended -- also a text that already starts with a space (sentencepiece's dummy prefix),
    # and the text after a special token (llama.cpp tokenizes each fragment with a prefix, as
    # Meta's reference code encodes each segment separately). transformers' GGUF converter uses
    # Metaspace(prepend_scheme="first") instead, which differs on exactly those two cases.
    steps = [normalizers.Replace(" ", "\u2581")]
    if prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def build_tokenizer(meta, bos_id, eos_ids):
    from engine.tokenizer import HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not kind or kind == "none" or not tokens:
        return None
    tokens = list(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else None
    if kind == "gpt2":
        tok = _byte_level_tokenizer(meta, tokens, types)
        default_bos = False
    elif kind == "llama":
        tok = _sentencepiece_tokenizer(meta, tokens, types)
        default_bos = True  # llama.cpp's default for sentencepiece vocabularies
    else:
        warnings.warn(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported; no tokenizer loaded")
        return None
    special, plain = _added_tokens(tokens, types)
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"{meta.path}: rebuilt tokenizer has {tok.get_vocab_size(True)} tokens, "
                              f"the file lists {len(tokens)}")
    template = meta.get("tokenizer.chat_template")
    return HFTokenizer(tok, bos_id=bos_id, eos_ids=eos_ids,
                       add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos_id is not None,
                       chat_template=template)


# --------------------------------------------------------------------------- entry point
