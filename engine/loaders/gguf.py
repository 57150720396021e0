"""GGUF checkpoints (llama.cpp's single-file format), Llama architecture.

`load_gguf(path)` reads the hyper-parameters and the tokenizer from the file's metadata and
returns a `Checkpoint` whose `tensors()` dequantizes one tensor at a time to float32
(any type `gguf.quants.dequantize` knows: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
the K-quants Q2_K..Q6_K, the IQ types ...).

Three things differ from a Hugging Face checkpoint and are undone here:

* GGUF lists dimensions fastest-first (ggml's `ne`), so a `[out, in]` torch matrix shows up
  in `GGUFReader` with `shape == [in, out]` while its numpy data is `[out, in]`. We read the
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
import os
from typing import Optional

import numpy as np

from engine.checkpoint import Checkpoint, CheckpointError
from engine.loaders.gguf_tokenizer import build_tokenizer
from engine.model_config import ModelConfig

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
    """Typed access to a GGUFReader's key/value fields."""

    def __init__(self, reader, path: str):
        self.reader = reader
        self.path = path

    def __contains__(self, key):
        return key in self.reader.fields

    def get(self, key, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = _contents(field)
        return default if value is None else value

    def require(self, key):
        if key not in self:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.get(key)


def _contents(field):
    """A field's Python value (`ReaderField.contents()`, spelled out for gguf versions without it)."""
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType
    if not field.types:
        return None
    kind = field.types[-1]

    def one(i):
        part = field.parts[i]
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


def _scalar(value, what: str, path: str) -> int:
    """Per-layer arrays (some archs) are accepted when uniform."""
    if isinstance(value, (list, tuple)):
        if not value or len(set(value)) != 1:
            raise CheckpointError(f"{path}: per-layer {what} {value!r} is not supported")
        value = value[0]
    return int(value)


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


# --------------------------------------------------------------------------- tokenizer

def load_gguf(path: str) -> Checkpoint:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    meta = _Meta(reader, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    for name in by_name:
        if _canonical(name) is None and not _ignored(name):
            raise CheckpointError(f"{path}: unsupported tensor {name!r} (biases and extra tensors of "
                                  "non-Llama variants are not supported)")

    def key(k):
        return f"{arch}.{k}"

    hidden = int(meta.require(key("embedding_length")))
    heads = _scalar(meta.require(key("attention.head_count")), "head_count", path)
    kv_heads = _scalar(meta.get(key("attention.head_count_kv"), heads), "head_count_kv", path)
    head_dim = int(meta.get(key("attention.key_length"), hidden // heads))
    if int(meta.get(key("attention.value_length"), head_dim)) != head_dim:
        raise CheckpointError(f"{path}: key_length != value_length is not supported")
    rope_dim = int(meta.get(key("rope.dimension_count"), head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial rotary (rope.dimension_count={rope_dim}, "
                              f"head_dim={head_dim}) is not supported")
    scaling_type = meta.get(key("rope.scaling.type"), "none")
    if scaling_type not in ("none", None, ""):
        raise CheckpointError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    embed_shape = [int(d) for d in reversed(list(by_name["token_embd.weight"].shape))]
    vocab = embed_shape[0]
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        raise CheckpointError(f"{path}: {len(tokens)} tokens in the vocabulary but token_embd.weight "
                              f"has {vocab} rows")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(k)
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_scalar(meta.require(key("feed_forward_length")), "feed_forward_length", path),
        num_layers=int(meta.require(key("block_count"))),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta.get(key("context_length"), 4096)),
        rope_theta=float(meta.get(key("rope.freq_base"), 10000.0)),
        rms_norm_eps=float(meta.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        tie_embeddings="output.weight" not in by_name,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        family="llama",
        name=str(meta.get("general.name") or os.path.splitext(os.path.basename(path))[0]),
    )
    if "rope_freqs.weight" in by_name:
        kwargs["rope_scaling"] = _llama3_scaling(_dequantize(by_name["rope_freqs.weight"], path), kwargs, path)
    try:
        cfg = ModelConfig(**kwargs).validate()
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None

    tokenizer = build_tokenizer(meta, cfg.bos_token_id, cfg.eos_token_ids)

    def tensors():
        for t in reader.tensors:
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

    types = {}
    for t in reader.tensors:
        n = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        types[n] = types.get(n, 0) + 1
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tokenizer, source=path, format="gguf",
                      extra={"tensor_types": types, "architecture": arch,
                             "pre_tokenizer": meta.get("tokenizer.ggml.pre")})
