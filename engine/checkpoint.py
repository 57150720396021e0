"""The checkpoint contract: what every loader returns and the engine relies on.

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

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from engine.model_config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: one line, `<path>: <what is wrong>`.

    Line breaks in the message (a crafted tensor name, a parser's multi-line error) are escaped
    so that a log or a CLI shows one line per refusal."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def shown(value, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters: names and values from a crafted file can be
    megabytes long, and an error message quotes them."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


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


def expected_shapes(cfg: ModelConfig) -> dict:
    """{canonical name: shape} of every tensor a full checkpoint of `cfg` holds."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per = {"attn_norm": (d,), "wq": (d, hq), "wk": (d, hkv), "wv": (d, hkv), "wo": (hq, d),
           "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    if cfg.post_norms:
        per.update(post_attn_norm=(d,), post_mlp_norm=(d,))
    out = {"embed": (v, d), "final_norm": (d,)}
    for i in range(cfg.num_layers):
        out.update({f"layers.{i}.{k}": s for k, s in per.items()})
    if not cfg.tie_embeddings:
        out["lm_head"] = (d, v)
    return out
