"""Meta's original Llama checkpoints: `params.json` + `consolidated.NN.pth` model-parallel shards.

Each shard is a zip-format torch archive read by `torch_zip` (no torch, no pickle code run).
Llama 2 7B has 1 shard, 13B 2, 70B 8; a tensor is merged from all shards along the axis
Meta's model-parallel layers split it on (ColumnParallelLinear splits the output rows,
RowParallelLinear the input columns, ParallelEmbedding the hidden dim; norms are replicated).
Q/K rows are permuted from Meta's interleaved rotary pairs to Hugging Face's rotate-half
layout exactly as transformers' convert_llama_weights_to_hf.py does.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

from engine.model_config import ModelConfig
from engine.checkpoint import Checkpoint, CheckpointError, layer_names
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


def load_meta(path: str) -> Checkpoint:
    path = os.path.abspath(path)
    params_path = os.path.join(path, "params.json")
    params = read_json_object(params_path, CheckpointError)
    shard_files = sorted((int(m.group(1)), f) for f in os.listdir(path) if (m := _SHARD_RE.fullmatch(f)))
    if not shard_files:
        raise CheckpointError(f"{path}: no consolidated.NN.pth shards")
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

    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path}: missing or bad field {e}") from None
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise CheckpointError(f"{params_path}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} are inconsistent")
    vocab = int(params.get("vocab_size", -1))
    emb = piece(0, "tok_embeddings.weight")
    if vocab <= 0:
        vocab = emb.shape[0]
    ffn = intermediate_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    ffn_stored = sum(piece(i, "layers.0.feed_forward.w1.weight").shape[0] for i in range(len(files)))
    if ffn != ffn_stored:
        raise CheckpointError(f"{params_path}: multiple_of/ffn_dim_multiplier give an FFN width of {ffn}, "
                              f"but layers.0.feed_forward.w1.weight has {ffn_stored} rows")
    rope_theta = float(params.get("rope_theta", 10000.0))
    scaled = bool(params.get("use_scaled_rope"))
    rope_scaling = ({"factor": float(params.get("rope_scale_factor", 8.0)), "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} if scaled else None)
    max_pos = int(params.get("max_seq_len") or (131072 if scaled else 8192 if rope_theta >= 500000 else 4096))

    tokenizer, tok_dir = _find_tokenizer(path)
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
            rms_norm_eps=float(params.get("norm_eps", 1e-5)), bos_token_id=bos, eos_token_ids=eos,
            family="llama", name=os.path.basename(path)).validate()
    except ValueError as e:
        raise CheckpointError(f"{params_path}: {e}") from None

    names = layer_names(n_layers) + ["lm_head"]
    known = {meta_name(n)[0] for n in names} | _IGNORED
    for file, sd in zip(files, shards):
        extra = sorted(set(sd) - known)
        if extra:
            raise CheckpointError(f"{file}: unrecognised tensor {extra[0]!r}")

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
