"""Meta's original Llama checkpoints: `params.json` + `consolidated.NN.pth` model-parallel shards.

Each shard is a zip-format torch archive read by `torch_zip` (no torch, no pickle code run).
Llama 2 7B has 1 shard, 13B 2, 70B 8; a tensor is merged from all shards along the axis
Meta's model-parallel layers split it on (ColumnParallelLinear splits the output rows,
RowParallelLinear the input columns, ParallelEmbedding the hidden dim; norms are replicated).
Q/K rows are permuted from Meta's interleaved rotary pairs to Hugging Face's rotate-half
layout exactly as transformers' convert_llama_weights_to_hf.py does.

params.json is bounded (`read_params`, ModelConfig's LIMITS) before a shard is opened, and every
piece's shape is checked against the config before a tensor is read.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np

from engine.model_config import ModelConfig, bounded_int
from engine.checkpoint import Checkpoint, CheckpointError, expected_shapes, layer_names, shown
from engine.settings import read_json_object
from engine.loaders.torch_zip import LazyTensor, load_torch_zip

# canonical suffix -> (Meta name, axis the shards are split on in Meta's [out, in] layout, or None)
_LAYER = {
    "attn_norm": ("attention_norm.weight", None),
    "wq": ("attention.wq.weight", 0), "wk": ("attention.wk.weight", 0),
    "wv": ("attention.wv.weight", 0), "wo": ("attention.wo.weight", 1),
    "mlp_norm": ("ffn_norm.weight", None),
    "w_gate": ("feed_forward.w1.weight", 0), "w_up": ("feed_forward.w3.weight", 0),
    "w_down": ("feed_forward.w2.weight", 1),
}
_GLOBAL = {"embed": ("tok_embeddings.weight", 1), "final_norm": ("norm.weight", None),
           "lm_head": ("output.weight", 0)}
_IGNORED = {"rope.freqs"}  # a buffer older exports saved; the model recomputes it
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
MAX_SHARDS = 64
MAX_PARAMS_BYTES = 1 << 20  # params.json is a few hundred bytes


def meta_name(name: str) -> tuple[str, object]:
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, i, suffix = name.split(".")
    meta, axis = _LAYER[suffix]
    return f"layers.{i}.{meta}", axis


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved Q/K rows [n_heads*head_dim, in] -> HF rotate-half rows (same shape).

    transformers' `permute`: w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).
    """
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """The FFN width Meta's `FeedForward` computes from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _find_tokenizer(path: str):
    """(tokenizer, directory it came from): tokenizer files next to the shards, else the
    parent's tokenizer.model (Meta's downloads keep one there for all sizes); (None, None) if none."""
    from engine.tokenizer import SentencePieceTokenizer, load_tokenizer
    parent = os.path.dirname(path)
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        where, load = path, lambda: load_tokenizer(path)
    elif os.path.exists(os.path.join(parent, "tokenizer.model")):
        where, load = parent, lambda: SentencePieceTokenizer(os.path.join(parent, "tokenizer.model"))
    else:
        return None, None
    try:
        return load(), where
    except Exception as e:  # e.g. Llama 3's tiktoken-format tokenizer.model
        warnings.warn(f"{where}: tokenizer not loaded ({type(e).__name__}: {e}); requests must carry token ids")
        return None, None


def _number(params: dict, key: str, default, params_path: str) -> float:
    value = params.get(key, default)
    if value is None:
        value = default
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise CheckpointError(f"{params_path}: {key} must be a positive number, got {shown(value)}")
    return value


def read_params(params_path: str) -> dict:
    """params.json's sizes as ints, each bounded (ModelConfig's LIMITS) and consistent; CheckpointError naming the file."""
    params = read_json_object(params_path, CheckpointError, MAX_PARAMS_BYTES)
    try:
        dim = bounded_int("hidden_size", params.get("dim"), "dim")
        n_layers = bounded_int("num_layers", params.get("n_layers"), "n_layers")
        n_heads = bounded_int("num_heads", params.get("n_heads"), "n_heads")
        n_kv = bounded_int("num_kv_heads", params.get("n_kv_heads") or n_heads, "n_kv_heads")
        vocab = params.get("vocab_size", -1)  # Llama 2 writes -1: the embedding's rows
        if not (type(vocab) is int and vocab <= 0):
            vocab = bounded_int("vocab_size", vocab, "vocab_size")
        max_seq = params.get("max_seq_len")
        if max_seq is not None:
            bounded_int("max_position_embeddings", max_seq, "max_seq_len")
    except ValueError as e:
        raise CheckpointError(f"{params_path}: {e}") from None
    if dim % n_heads or n_heads % n_kv:
        raise CheckpointError(f"{params_path}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} are inconsistent")
    multiple_of = _number(params, "multiple_of", 256, params_path)
    mult = params.get("ffn_dim_multiplier")
    if mult is not None:
        _number(params, "ffn_dim_multiplier", None, params_path)
    if type(multiple_of) is not int or multiple_of > 1 << 16 or (mult is not None and mult > 64):
        raise CheckpointError(f"{params_path}: multiple_of {shown(multiple_of)} / ffn_dim_multiplier "
                              f"{shown(mult)} are not a sane FFN width rule")
    ffn = intermediate_size(dim, multiple_of, mult)
    try:
        bounded_int("intermediate_size", ffn, "the FFN width from multiple_of/ffn_dim_multiplier")
    except ValueError as e:
        raise CheckpointError(f"{params_path}: {e}") from None
    return dict(params, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                ffn=ffn, max_seq_len=max_seq)


def _check_shapes(cfg: ModelConfig, names: list, piece, files: list) -> None:
    """Each tensor's pieces, merged along Meta's split axis, have the shape `cfg` implies."""
    shapes = expected_shapes(cfg)
    for name in names:
        mname, axis = meta_name(name)
        want = shapes[name] if name in ("embed", "final_norm") or name.endswith("_norm") else shapes[name][::-1]
        parts = [piece(i, mname) for i in (range(len(files)) if axis is not None else [0])]
        got = list(parts[0].shape)
        if axis is not None and len(got) == 2:
            for p in parts[1:]:
                if len(p.shape) != 2 or p.shape[1 - axis] != got[1 - axis]:
                    got = None
                    break
                got[axis] += p.shape[axis]
        if got is None or tuple(got) != want:
            raise CheckpointError(f"{files[0]}: tensor {mname!r} has shape "
                                  f"{' + '.join(str(p.shape) for p in parts)}, expected {want} for params.json")


def load_meta(path: str, tokenizer: bool = True) -> Checkpoint:
    """The Meta checkpoint in `path`: params.json bounded, every shard's pickle read (no code run,
    no tensor read) and every shape checked. `tokenizer=False` skips the tokenizer (preflight);
    bos/eos then follow the vocabulary size."""
    path = os.path.abspath(path)
    params_path = os.path.join(path, "params.json")
    params = read_params(params_path)
    shard_files = sorted((int(m.group(1)), f) for f in os.listdir(path) if (m := _SHARD_RE.fullmatch(f)))
    if not shard_files:
        raise CheckpointError(f"{path}: no consolidated.NN.pth shards")
    if len(shard_files) > MAX_SHARDS:
        raise CheckpointError(f"{path}: {len(shard_files)} shards, more than {MAX_SHARDS}")
    if [i for i, _ in shard_files] != list(range(len(shard_files))):
        raise CheckpointError(f"{path}: shard numbers {[i for i, _ in shard_files]} are not 00..{len(shard_files) - 1:02d}")
    files = [os.path.join(path, f) for _, f in shard_files]
    shards = []
    for file in files:
        sd = load_torch_zip(file)
        if not isinstance(sd, dict) or not all(isinstance(v, LazyTensor) for v in sd.values()):
            raise CheckpointError(f"{file}: expected a dict of tensors")
        shards.append(sd)

    def piece(shard_i: int, name: str) -> LazyTensor:
        try:
            return shards[shard_i][name]
        except KeyError:
            raise CheckpointError(f"{files[shard_i]}: tensor {name!r} missing") from None

    dim, n_layers, n_heads, n_kv = params["dim"], params["n_layers"], params["n_heads"], params["n_kv_heads"]
    vocab, ffn = params["vocab_size"], params["ffn"]
    emb = piece(0, "tok_embeddings.weight")
    if vocab <= 0:
        vocab = emb.shape[0] if len(emb.shape) == 2 else 0
    w1 = [piece(i, "layers.0.feed_forward.w1.weight") for i in range(len(files))]
    for file, p in zip(files, w1):
        if len(p.shape) != 2:
            raise CheckpointError(f"{file}: layers.0.feed_forward.w1.weight has shape {p.shape}, not a matrix")
    ffn_stored = sum(p.shape[0] for p in w1)
    if ffn != ffn_stored:
        raise CheckpointError(f"{params_path}: multiple_of/ffn_dim_multiplier give an FFN width of {ffn}, "
                              f"but layers.0.feed_forward.w1.weight has {ffn_stored} rows")
    rope_theta = float(_number(params, "rope_theta", 10000.0, params_path))
    scaled = bool(params.get("use_scaled_rope"))
    rope_scaling = ({"factor": float(_number(params, "rope_scale_factor", 8.0, params_path)),
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192} if scaled else None)
    max_pos = params["max_seq_len"] or (131072 if scaled else 8192 if rope_theta >= 500000 else 4096)

    tokenizer, tok_dir = _find_tokenizer(path) if tokenizer else (None, None)
    if tokenizer is not None:
        bos, eos = tokenizer.bos_id, tuple(tokenizer.eos_ids)
    elif vocab >= 128000:  # Llama 3 ids (base eos and instruct end-of-turn)
        bos, eos = 128000, (128001, 128009)
    else:
        bos, eos = 1, (2,)
    try:
        cfg = ModelConfig(
            vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_layers=n_layers,
            num_heads=n_heads, num_kv_heads=n_kv, head_dim=dim // n_heads,
            max_position_embeddings=max_pos, rope_theta=rope_theta, rope_scaling=rope_scaling,
            rms_norm_eps=float(_number(params, "norm_eps", 1e-5, params_path)), bos_token_id=bos, eos_token_ids=eos,
            family="llama", name=os.path.basename(path)).validate()
    except ValueError as e:
        raise CheckpointError(f"{params_path}: {e}") from None

    names = layer_names(n_layers) + ["lm_head"]
    known = {meta_name(n)[0] for n in names} | _IGNORED
    for file, sd in zip(files, shards):
        extra = sorted(set(sd) - known, key=str)
        if extra:
            raise CheckpointError(f"{file}: unrecognised tensor {shown(extra[0])}")
    _check_shapes(cfg, names, piece, files)

    def merged(name: str) -> np.ndarray:
        mname, axis = meta_name(name)
        parts = [piece(i, mname) for i in range(len(files))]
        if axis is None or len(parts) == 1:
            return parts[0].numpy()
        for i, p in enumerate(parts):
            if len(p.shape) != 2 or p.shape[1 - axis] != parts[0].shape[1 - axis]:
                raise CheckpointError(f"{files[i]}: tensor {mname!r} has shape {p.shape}, which does not "
                                      f"concatenate with {parts[0].shape} along axis {axis}")
        return np.concatenate([p.numpy() for p in parts], axis=axis)

    def tensors():
        for name in names:
            w = merged(name)
            suffix = name.split(".")[-1]
            if suffix in ("wq", "wk"):
                w = permute_rotary(w, n_heads if suffix == "wq" else n_kv)
            if suffix not in ("embed", "attn_norm", "mlp_norm", "final_norm"):
                w = w.T  # Meta's [out, in] -> [in, out]
            yield name, w

    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tokenizer, source=path, format="meta",
                      extra={"tokenizer_dir": tok_dir, "shards": len(files)})
