"""GGUF checkpoints (llama.cpp's single-file format), Llama architecture.

`load_gguf(path)` reads the header with engine/loaders/gguf_file.py (every declared count,
length and offset bounded before anything is allocated), the hyper-parameters (bounded by
ModelConfig's LIMITS) and the tokenizer from the metadata, checks every tensor's shape, and
returns a `Checkpoint` whose `tensors()` dequantizes one tensor at a time to float32
(any type `gguf.quants.dequantize` knows: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
the K-quants Q2_K..Q6_K, the IQ types ...).

Three things differ from a Hugging Face checkpoint and are undone here:

* GGUF lists dimensions fastest-first (ggml's `ne`), so a `[out, in]` torch matrix shows up
  in the tensor header with `shape == [in, out]` while its numpy data is `[out, in]`. We read the
  numpy layout and transpose to our `[in, out]`.
* llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of
  the Q and K projections from Hugging Face's rotate-half rotary layout into Meta's
  interleaved-pairs layout. `_unpermute` inverts it, per head (K uses the KV head count).
* Llama 3.1-style rope scaling is stored as a `rope_freqs.weight` tensor of per-frequency
  divisors rather than as parameters; `_llama3_scaling` recovers parameters that reproduce
  those divisors exactly (and checks it does) for `ModelConfig.rope_scaling`.

The tokenizer is rebuilt from `tokenizer.ggml.*` by engine/loaders/gguf_tokenizer.py.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Optional

import numpy as np

from engine.checkpoint import Checkpoint, CheckpointError, expected_shapes, shown
from engine.loaders.gguf_tokenizer import build_tokenizer
from engine.model_config import ModelConfig, bounded_int

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> canonical name. "{i}" is the block index.
_GLOBAL_NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "final_norm",
    "output.weight": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}
# Tensors llama.cpp may write that carry nothing we need (rope_freqs is read into the config).
_IGNORED = {"rope_freqs.weight"}
_IGNORED_BLOCK = {"attn_rot_embd"}

# --------------------------------------------------------------------------- metadata

class _Meta:
    """Typed access to a GGUF file's key/value fields (`GGUFFile.fields`): arrays come back as lists."""

    def __init__(self, fields: dict, path: str):
        self.fields = fields
        self.path = path

    def __contains__(self, key):
        return key in self.fields

    def get(self, key, default=None):
        value = self.fields.get(key)
        if value is None:
            return default
        return value.tolist() if isinstance(value, np.ndarray) else value

    def require(self, key):
        if key not in self:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.get(key)


def _scalar(value, what: str, path: str):
    """Per-layer arrays (some archs) are accepted when uniform."""
    if isinstance(value, (list, tuple)):
        if not value or len(set(value)) != 1:
            raise CheckpointError(f"{path}: per-layer {what} {shown(value)} is not supported")
        value = value[0]
    return value


# --------------------------------------------------------------------------- tensors

def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: Meta interleaved pairs -> HF rotate-half.

    w is [out, in] with out = n_head * head_dim. The converter did
    reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2); we undo exactly that.
    """
    out = w.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"{out} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: str) -> np.ndarray:
    """One ReaderTensor -> float32 numpy array in numpy (row-major) order."""
    from gguf import GGMLQuantizationType
    try:
        from gguf.quants import dequantize
    except ImportError:
        raise CheckpointError(f"{path}: tensor {tensor.name!r}: this gguf package has no gguf.quants."
                              "dequantize; upgrade it (pip install -U gguf)") from None

    qtype = GGMLQuantizationType(int(tensor.tensor_type))
    shape = tuple(int(d) for d in reversed(list(tensor.shape)))  # ggml ne is fastest-first
    try:
        data = dequantize(np.asarray(tensor.data), qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has GGML type {qtype.name}, which this gguf package "
            "cannot dequantize") from None
    data = np.asarray(data, dtype=np.float32)
    if not data.flags.writeable:  # F32 comes back as a view of the read-only file mapping
        data = data.copy()
    if data.size != math.prod(shape):
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({qtype.name}) holds {data.size} values, "
                              f"expected {shape}")
    return data.reshape(shape)


def _canonical(name: str) -> Optional[str]:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    return None


def _ignored(name: str) -> bool:
    if name in _IGNORED:
        return True
    parts = name.split(".")
    return len(parts) >= 3 and parts[0] == "blk" and parts[2] in _IGNORED_BLOCK


# --------------------------------------------------------------------------- rope scaling

def _llama3_scaling(factors: np.ndarray, cfg_kwargs: dict, path: str) -> Optional[dict]:
    """`rope_freqs.weight` (per-frequency divisors, Llama 3.1 style) -> ModelConfig.rope_scaling.

    In the "llama3" rule the divisor is 1 for high frequencies, `factor` for low ones and
    1 / ((1 - s) / factor + s) in between, with s linear in 1 / wavelength. Only that line and
    `factor` matter, so we fit them and pick low_freq_factor = 1; the result is then checked
    against the stored divisors.
    """
    from engine.model import rope_inv_freq

    f = np.asarray(factors, np.float64).reshape(-1)
    d = cfg_kwargs["head_dim"]
    inv = 1.0 / (cfg_kwargs["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if f.shape != inv.shape:
        raise CheckpointError(f"{path}: rope_freqs.weight has {f.size} entries, expected {inv.size}")
    if np.allclose(f, 1.0):
        return None
    factor = float(f.max())
    x = inv / (2 * math.pi)  # 1 / wavelength
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(x[mid], s, 1)  # s = a x + b, a = old_len/(hi-lo), b = -lo/(hi-lo)
        if b >= 0 or a <= 0:
            raise CheckpointError(f"{path}: rope_freqs.weight does not follow Llama 3 rope scaling")
        lo = 1.0
        hi = lo - 1.0 / b
        old_len = a * (hi - lo)
    else:  # no transition band: put both edges between the two groups
        low = x[f >= factor * (1 - 1e-6)]
        high = x[f <= 1 + 1e-6]
        if not len(low) or not len(high) or low.max() >= high.min():
            raise CheckpointError(f"{path}: rope_freqs.weight does not follow Llama 3 rope scaling")
        lo = 1.0
        old_len = lo / low.max()
        hi = high.min() * old_len
    scaling = {"factor": factor, "low_freq_factor": float(lo), "high_freq_factor": float(hi),
               "original_max_position_embeddings": float(old_len)}
    cfg = ModelConfig(**{**cfg_kwargs, "rope_scaling": scaling})
    if not np.allclose(rope_inv_freq(cfg), (inv / f).astype(np.float32), rtol=1e-4, atol=0):
        raise CheckpointError(f"{path}: rope_freqs.weight does not follow Llama 3 rope scaling")
    return scaling


# --------------------------------------------------------------------------- the loader

def _config_kwargs(meta: _Meta, arch: str, by_name: dict, path: str) -> dict:
    """ModelConfig fields from the metadata, every size bounded (ModelConfig's LIMITS) as it is read."""

    def key(k):
        return f"{arch}.{k}"

    def size(k, field, default=None):
        value = meta.require(key(k)) if default is None else meta.get(key(k), default)
        return bounded_int(field, _scalar(value, k, path), key(k))

    def number(k, default):
        value = _scalar(meta.get(key(k), default), k, path)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{key(k)} must be a number, got {shown(value)}")
        return float(value)

    hidden = size("embedding_length", "hidden_size")
    heads = size("attention.head_count", "num_heads")
    head_dim = size("attention.key_length", "head_dim", max(1, hidden // heads))
    if size("attention.value_length", "head_dim", head_dim) != head_dim:
        raise CheckpointError(f"{path}: key_length != value_length is not supported")
    rope_dim = size("rope.dimension_count", "head_dim", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial rotary (rope.dimension_count={rope_dim}, "
                              f"head_dim={head_dim}) is not supported")
    scaling_type = meta.get(key("rope.scaling.type"), "none")
    if scaling_type not in ("none", None, ""):
        raise CheckpointError(f"{path}: rope scaling type {shown(scaling_type)} is not supported")
    embed_shape = [int(d) for d in reversed(by_name["token_embd.weight"].shape.tolist())]
    if len(embed_shape) != 2:
        raise CheckpointError(f"{path}: token_embd.weight has shape {embed_shape}, not a matrix")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(k)
        if v is not None and v not in eos:
            eos.append(v)
    return dict(
        vocab_size=bounded_int("vocab_size", embed_shape[0], "token_embd.weight rows"),
        hidden_size=hidden,
        intermediate_size=size("feed_forward_length", "intermediate_size"),
        num_layers=size("block_count", "num_layers"),
        num_heads=heads,
        num_kv_heads=size("attention.head_count_kv", "num_kv_heads", heads),
        head_dim=head_dim,
        max_position_embeddings=size("context_length", "max_position_embeddings", 4096),
        rope_theta=number("rope.freq_base", 10000.0),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in by_name,
        bos_token_id=bos,
        eos_token_ids=tuple(eos),
        family="llama",
        name=str(meta.get("general.name") or os.path.splitext(os.path.basename(path))[0]),
    )


def _check_tensors(cfg: ModelConfig, by_name: dict, path: str) -> None:
    """Every tensor `cfg` needs is present with the shape it implies (ggml ne reversed = numpy order)."""
    shapes = expected_shapes(cfg)
    found = set()
    for gname, t in by_name.items():
        name = _canonical(gname)
        if name is None:
            continue
        if name not in shapes:
            raise CheckpointError(f"{path}: tensor {shown(gname)} is beyond this config ({cfg.num_layers} blocks)")
        want = shapes[name] if name == "embed" or len(shapes[name]) == 1 else shapes[name][::-1]
        got = tuple(int(d) for d in reversed(t.shape.tolist()))
        if got != want:
            raise CheckpointError(f"{path}: tensor {shown(gname)} has shape {got} (numpy order), expected "
                                  f"{want} for the metadata")
        found.add(name)
    missing = [n for n in shapes if n not in found]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")


MAX_TOKEN_CHARS = 1024  # real tokens are under ~256; rebuilding merges is quadratic in a token's length


def _check_vocab(meta: _Meta, vocab: int, path: str) -> None:
    """The tokenizer arrays, if present, are lists of the right kind and length, tokens of sane length."""
    for k, kind in (("tokens", str), ("token_type", int), ("scores", float), ("merges", str)):
        value = meta.fields.get(f"tokenizer.ggml.{k}")
        if value is None:
            continue
        ok = (isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is str else
              isinstance(value, np.ndarray) and value.dtype.kind in ("iu" if kind is int else "iuf"))
        if not ok:
            raise CheckpointError(f"{path}: tokenizer.ggml.{k} is not an array of {kind.__name__}")
        if k != "merges" and len(value) != vocab:
            raise CheckpointError(f"{path}: {len(value)} entries in tokenizer.ggml.{k} but token_embd.weight "
                                  f"has {vocab} rows")
        if k == "tokens":
            longest = max(range(len(value)), key=lambda i: len(value[i]), default=None)
            if longest is not None and len(value[longest]) > MAX_TOKEN_CHARS:
                raise CheckpointError(f"{path}: token {longest} is {len(value[longest])} characters long "
                                      f"(at most {MAX_TOKEN_CHARS})")


def load_gguf(path: str, tokenizer: bool = True) -> Checkpoint:
    """The GGUF checkpoint at `path`: header read with every size bounded (gguf_file.GGUFFile), the
    config and every tensor shape checked, no weight read. `tokenizer=False` skips building the
    tokenizer (a preflight check)."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from None
    from engine.loaders.gguf_file import GGUFFile
    file = GGUFFile(path)
    meta = _Meta(file.fields, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {shown(arch)} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    by_name = {t.name: t for t in file.tensors}
    if "token_embd.weight" not in by_name:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    for name in by_name:
        if _canonical(name) is None and not _ignored(name):
            raise CheckpointError(f"{path}: unsupported tensor {shown(name)} (biases and extra tensors of "
                                  "non-Llama variants are not supported)")
    try:
        kwargs = _config_kwargs(meta, arch, by_name, path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_vocab(meta, kwargs["vocab_size"], path)
    if "rope_freqs.weight" in by_name:
        freqs = by_name["rope_freqs.weight"]
        if freqs.n_elements != kwargs["head_dim"] // 2:
            raise CheckpointError(f"{path}: rope_freqs.weight has {freqs.n_elements} entries, "
                                  f"expected {kwargs['head_dim'] // 2}")
        kwargs["rope_scaling"] = _llama3_scaling(_dequantize(freqs, path), kwargs, path)
    try:
        cfg = ModelConfig(**kwargs).validate()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_tensors(cfg, by_name, path)

    tok = build_tokenizer(meta, cfg.bos_token_id, cfg.eos_token_ids) if tokenizer else None

    def tensors():
        for t in file.tensors:
            name = _canonical(t.name)
            if name is None:
                continue
            w = _dequantize(t, path)
            leaf = name.split(".")[-1]
            try:
                if leaf == "wq":
                    w = _unpermute(w, cfg.num_heads)
                elif leaf == "wk":
                    w = _unpermute(w, cfg.num_kv_heads)
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {t.name!r}: {e}") from None
            if w.ndim == 2 and name != "embed":
                w = np.ascontiguousarray(w.T)  # [out, in] -> [in, out]
            yield name, w
        # The mapped file's pages were read once; drop them from this process's resident memory
        # (they stay in the page cache, and a later read maps them again).
        if hasattr(mmap, "MADV_DONTNEED"):
            file.mm.madvise(mmap.MADV_DONTNEED)

    types = {}
    for t in file.tensors:
        n = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        types[n] = types.get(n, 0) + 1
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tok, source=path, format="gguf",
                      extra={"tensor_types": types, "architecture": arch,
                             "pre_tokenizer": meta.get("tokenizer.ggml.pre")})
