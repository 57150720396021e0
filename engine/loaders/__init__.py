"""Checkpoint loaders. Each format module returns one `Checkpoint`; `open_checkpoint` picks the format.

The contract every loader meets (the engine relies on nothing else):

* `Checkpoint.config` is a `ModelConfig`.
* `Checkpoint.tensors()` yields `(name, array)` pairs, one tensor at a time (so a 70B
  checkpoint never sits in host memory twice), with canonical names and layouts:

      embed                 [vocab, hidden]
      layers.{i}.attn_norm  [hidden]            raw stored weight (Gemma's (1 + w) is applied by the model)
      layers.{i}.wq         [hidden, heads*head_dim]      all matrices are [in, out]
      layers.{i}.wk         [hidden, kv_heads*head_dim]   Q/K rows in Hugging Face's rotary layout
      layers.{i}.wv         [hidden, kv_heads*head_dim]   (rotate-half, not Meta's interleaved pairs)
      layers.{i}.wo         [heads*head_dim, hidden]
      layers.{i}.mlp_norm   [hidden]
      layers.{i}.w_gate     [hidden, intermediate]
      layers.{i}.w_up       [hidden, intermediate]
      layers.{i}.w_down     [intermediate, hidden]
      final_norm            [hidden]
      lm_head               [hidden, vocab]     absent when config.tie_embeddings

  Arrays are numpy (any float dtype, incl. ml_dtypes.bfloat16). A matrix that is already
  int8-quantized comes as a `QuantizedWeight` (int8 [in, out] + float32 scale [out]).
* `Checkpoint.tokenizer` is an `engine.tokenizer.Tokenizer` or None.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from engine.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and the tensor."""


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: Callable[[], Iterator[tuple]]
    tokenizer: Optional[object] = None
    source: str = ""
    format: str = ""
    extra: dict = field(default_factory=dict)


LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
POST_NORMS = ("post_attn_norm", "post_mlp_norm")  # Gemma 2


def layer_names(num_layers: int, post_norms: bool = False) -> list[str]:
    """Every canonical tensor name a full checkpoint holds (lm_head excluded).

    Gemma 2 (`post_norms`) adds layers.{i}.post_attn_norm and layers.{i}.post_mlp_norm.
    """
    per = LAYER_KEYS + (POST_NORMS if post_norms else ())
    names = ["embed", "final_norm"]
    for i in range(num_layers):
        names += [f"layers.{i}.{n}" for n in per]
    return names


def detect_format(path: str) -> str:
    """'hf' | 'meta' | 'gguf' | 'jetbeam' for a checkpoint path; raises CheckpointError otherwise."""
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise CheckpointError(f"{path}: not a recognised checkpoint file (expected a .gguf file or a directory)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    files = os.listdir(path)
    if "jetbeam_config.json" in files:
        return "jetbeam"
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return "hf"
    if "params.json" in files and any(f.startswith("consolidated.") and f.endswith(".pth") for f in files):
        return "meta"
    ggufs = [f for f in files if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"{path}: not a recognised checkpoint directory (need config.json + *.safetensors, "
        "params.json + consolidated.*.pth, a .gguf file, or a jetbeam-converted directory)")


def open_checkpoint(path: str) -> Checkpoint:
    fmt = detect_format(path)
    if fmt == "hf":
        from engine.loaders.hf import load_hf
        return load_hf(path)
    if fmt == "meta":
        from engine.loaders.meta import load_meta
        return load_meta(path)
    if fmt == "gguf":
        from engine.loaders.gguf import load_gguf
        if os.path.isdir(path):
            path = os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".gguf")))
        return load_gguf(path)
    from engine.loaders.converted import load_converted
    return load_converted(path)
