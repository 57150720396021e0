"""Hugging Face model directories: `config.json` + `*.safetensors` (one file or sharded with an index).

We parse the safetensors header ourselves and `np.memmap` each tensor's bytes instead of
using `safe_open(framework="numpy")`, because numpy has no bfloat16 and most checkpoints are
stored in bf16; ml_dtypes (shipped with jax) gives the dtype, so bf16 arrives bit-exact.
All headers are read (and checked against the file sizes) before any tensor is yielded,
so a truncated or incomplete checkpoint fails at open time with the file and tensor named,
not halfway through placing a 70B model on device.
"""

from __future__ import annotations

import json
import os
import re
import struct

import ml_dtypes
import numpy as np

from engine.model_config import ModelConfig
from engine.checkpoint import Checkpoint, CheckpointError, layer_names
from engine.settings import read_json_object

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
          "self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv",
          "self_attn.o_proj": "wo", "mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up",
          "mlp.down_proj": "w_down"}
_GLOBAL = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
           "lm_head.weight": "lm_head"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
# Buffers some older exports saved alongside the weights; the model recomputes them.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# HF stores nn.Linear weights as [out, in]; the engine wants [in, out].
_TRANSPOSED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"}


# Gemma 2 has four norms per layer; its post_attention_layernorm is a post-norm, not the MLP's pre-norm.
_LAYER_GEMMA2 = dict(_LAYER, post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="mlp_norm",
                     post_feedforward_layernorm="post_mlp_norm")


def canonical_name(hf_name: str, post_norms: bool = False):
    """Our name for a HF tensor name, or None when it is not a weight we know."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    layer_map = _LAYER_GEMMA2 if post_norms else _LAYER
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in layer_map:
        return f"layers.{m.group(1)}.{layer_map[m.group(2)]}"
    return None


def read_header(path: str) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data region) of one file.

    Checks that every tensor's bytes lie inside the file, so truncation is caught here.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and 8 + n <= size else None
        header = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if header is None:
        raise CheckpointError(f"{path}: truncated safetensors file (file is {size} bytes, "
                              f"shorter than its header{'' if n is None else f' of {n} bytes'})")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        end = info["data_offsets"][1]
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                                  f"{8 + n + end} but the file has {size} bytes")
    return header, 8 + n


def _read_tensor(path: str, info: dict, base: int) -> np.ndarray:
    """One tensor, copied out of the memory map (so nothing keeps the file mapped afterwards)."""
    dtype = np.dtype(DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:
        return np.zeros(shape, dtype)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=base + begin, shape=shape)
    out = np.array(mm)
    del mm
    return out


def _shard_files(path: str) -> list[str]:
    """The safetensors files that make up the checkpoint (those the index lists, else all)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{os.path.join(path, name)}: shard file listed in {index} is missing")
        return [os.path.join(path, name) for name in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def load_hf(path: str) -> Checkpoint:
    path = os.path.abspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing (a Hugging Face model directory needs config.json)")
    hf = read_json_object(config_path, CheckpointError)
    try:
        cfg = ModelConfig.from_hf(hf, name=os.path.basename(path))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {type(e).__name__}: {e}") from None

    # canonical name -> (file, header entry, data offset), built from the headers alone.
    where = {}
    for file in _shard_files(path):
        header, base = read_header(file)
        for hf_name, info in header.items():
            name = canonical_name(hf_name, cfg.post_norms)
            if name is None:
                if _IGNORED.fullmatch(hf_name):
                    continue
                raise CheckpointError(f"{file}: unrecognised tensor {hf_name!r} (not a "
                                      f"{cfg.family} weight this engine knows)")
            if name == "lm_head" and cfg.tie_embeddings:
                continue  # some exports store the tied head too; the engine uses embed
            where[name] = (file, info, base)
    wanted = layer_names(cfg.num_layers, cfg.post_norms) + ([] if cfg.tie_embeddings else ["lm_head"])
    missing = [n for n in wanted if n not in where]
    if missing:
        hf_names = {v: k for k, v in _GLOBAL.items()} | {
            f"layers.{i}.{v}": f"model.layers.{i}.{k}.weight" for i in range(cfg.num_layers)
            for k, v in (_LAYER_GEMMA2 if cfg.post_norms else _LAYER).items()}
        raise CheckpointError(f"{path}: tensor {hf_names[missing[0]]!r} ({missing[0]}) is in none of "
                              f"the safetensors files ({len(missing)} missing in all)")

    def tensors():
        for name in wanted:
            file, info, base = where[name]
            arr = _read_tensor(file, info, base)
            if name.split(".")[-1] in _TRANSPOSED:
                arr = np.ascontiguousarray(arr.T)
            yield name, arr

    from engine.tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # one error type for callers, naming the directory
        raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from None
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tokenizer, source=path, format="hf")
