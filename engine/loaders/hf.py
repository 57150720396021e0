"""Hugging Face model directories: `config.json` + `*.safetensors` (one file or sharded with an index).

We parse the safetensors header ourselves (engine/loaders/st_header.py, every declared size
checked against the file) and `np.memmap` each tensor's bytes instead of using
`safe_open(framework="numpy")`, because numpy has no bfloat16 and most checkpoints are
stored in bf16; ml_dtypes (shipped with jax) gives the dtype, so bf16 arrives bit-exact.
All headers are read, and every tensor's shape checked against config.json, before any
tensor is yielded, so a truncated, incomplete or mis-shaped checkpoint fails at open time
with the file and tensor named, not halfway through placing a 70B model on device.
"""

from __future__ import annotations

import os
import re

import numpy as np

from engine.model_config import ModelConfig
from engine.checkpoint import Checkpoint, CheckpointError, expected_shapes, layer_names, shown
from engine.loaders.st_header import ST_DTYPES, read_header
from engine.settings import read_json_object

DTYPES = {k: v for k, v in ST_DTYPES.items() if k != "BOOL"}
MAX_CONFIG_BYTES = 16 << 20  # config.json and the shard index: a real one is a few kB

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


def _read_tensor(path: str, info: dict, base: int) -> np.ndarray:
    """One tensor, copied out of the memory map (so nothing keeps the file mapped afterwards)."""
    dtype = DTYPES[info["dtype"]]
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
        weight_map = read_json_object(index, CheckpointError, MAX_CONFIG_BYTES).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: unreadable index (no weight_map of tensor -> file name)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard file name {shown(name)} is not a plain file name")
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{os.path.join(path, name)}: shard file listed in {index} is missing")
        return [os.path.join(path, name) for name in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def read_config(config_path: str, name: str) -> ModelConfig:
    """The ModelConfig of a config.json, its sizes bounded (ModelConfig.from_hf); CheckpointError naming it."""
    hf = read_json_object(config_path, CheckpointError, MAX_CONFIG_BYTES)
    try:
        return ModelConfig.from_hf(hf, name=name)
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as e:
        raise CheckpointError(f"{config_path}: {type(e).__name__}: {e}") from None


def load_hf(path: str, tokenizer: bool = True) -> Checkpoint:
    """The checkpoint in Hugging Face directory `path`: every header and shape checked, no tensor read.

    `tokenizer=False` skips loading the tokenizer (a preflight check reads headers only)."""
    path = os.path.abspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing (a Hugging Face model directory needs config.json)")
    cfg = read_config(config_path, os.path.basename(path))
    shapes = expected_shapes(cfg)

    # canonical name -> (file, header entry, data offset), built from the headers alone.
    where = {}
    for file in _shard_files(path):
        header, base, _ = read_header(file, DTYPES)
        for hf_name, info in header.items():
            name = canonical_name(hf_name, cfg.post_norms)
            if name is None:
                if _IGNORED.fullmatch(hf_name):
                    continue
                raise CheckpointError(f"{file}: unrecognised tensor {shown(hf_name)} (not a "
                                      f"{cfg.family} weight this engine knows)")
            if name == "lm_head" and cfg.tie_embeddings:
                continue  # some exports store the tied head too; the engine uses embed
            if name not in shapes:
                raise CheckpointError(f"{file}: tensor {shown(hf_name)} is beyond this config "
                                      f"({cfg.num_layers} layers)")
            want = shapes[name][::-1] if name.split(".")[-1] in _TRANSPOSED else shapes[name]
            if tuple(info["shape"]) != want:
                raise CheckpointError(f"{file}: tensor {shown(hf_name)} has shape {tuple(info['shape'])}, "
                                      f"expected {want} for config.json")
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

    tok = None
    if tokenizer:
        from engine.tokenizer import load_tokenizer
        try:
            tok = load_tokenizer(path)
        except Exception as e:  # one error type for callers, naming the directory
            raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from None
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tok, source=path, format="hf")
