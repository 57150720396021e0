"""The architecture of a decoder-only transformer: one `ModelConfig` for every supported family.

Llama 2/3, SmolLM2, Mistral, Gemma and Gemma 2 differ only in the switches
below, never in code copies (MaxText style). Shipped configs live in configs/models/*.json;
checkpoints bring their own (`from_hf`, and the GGUF and Meta loaders).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

from engine.settings import ConfigError

# Ceilings on a declared architecture, checked before anything is sized from it (layer name
# lists, cache shardings, tokenizer tables). Each is several times today's largest open model
# (Llama 3.1 405B: 126 layers, 128 heads, hidden 16384, FFN 53248; Gemma: 256k vocabulary;
# head_dim 256) so no real checkpoint meets one, while a crafted 10**9 is refused at once.
LIMITS = {
    "num_layers": 1024,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 2048,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 21,
    "max_position_embeddings": 1 << 24,
}
MAX_PARAMS = 1 << 42  # ~4.4T parameters, ten times Llama 3.1 405B
MAX_SPECIAL_IDS = 64  # eos ids a config may list


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # Llama-3.1 style rope scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-5
    # Family switches.
    activation: str = "silu"  # "silu" (SwiGLU, Llama) | "gelu_tanh" (GeGLU, Gemma)
    norm_weight_offset: float = 0.0  # Gemma stores RMSNorm weights as w, applies (1 + w)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    # Gemma 2 switches (all off for other families).
    post_norms: bool = False  # extra RMSNorm after attention and after the MLP (post_attn_norm, post_mlp_norm)
    query_scale: Optional[float] = None  # scores use query_scale**-0.5 instead of head_dim**-0.5
    attn_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap)
    sliding_window: Optional[int] = None  # local attention span of the layers in sliding_layers
    sliding_layers: tuple = ()
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple = (2,)
    family: str = "llama"  # informational: "llama" | "gemma"
    name: str = "custom"

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def validate(self) -> "ModelConfig":
        """Self (for chaining) if consistent and within `LIMITS`; ValueError naming the field otherwise."""
        check_limits(self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unsupported activation {self.activation!r}")
        return self

    def param_count(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.num_heads * self.head_dim * 2 + d * self.num_kv_heads * self.head_dim * 2
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        _check_fields(cls, d, "model")
        d = dict(d)
        if "sliding_layers" in d:
            d["sliding_layers"] = tuple(d["sliding_layers"])
        if "eos_token_ids" in d:
            eos = d["eos_token_ids"]
            d["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(**d).validate()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["sliding_layers"] = list(self.sliding_layers)
        return out

    @classmethod
    def from_hf(cls, hf: dict, name: str = "custom") -> "ModelConfig":
        """Map a Hugging Face `config.json` onto our switches.

        The sizes are bounded (`bounded_int`) before anything is built from them: a layer count
        of 10**9 is refused here, not after a 10**9-entry list exists."""
        for key, field, required in _HF_SIZES:
            if required or hf.get(key) is not None:
                bounded_int(field, hf[key], key)
        archs = hf.get("architectures") or []
        if not isinstance(archs, list):
            raise ValueError(f"architectures must be a list, got {type(archs).__name__}")
        model_type = hf.get("model_type", "")
        if model_type not in ("llama", "gemma", "gemma2", "mistral") and not any(
                a in ("LlamaForCausalLM", "GemmaForCausalLM", "MistralForCausalLM") for a in archs):
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                "supported: llama, gemma, gemma2, mistral")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        gemma2 = model_type == "gemma2"
        gemma = model_type == "gemma" or gemma2
        eos = hf.get("eos_token_id", 2)
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if gemma:
            act = "gelu_tanh"  # Gemma uses the tanh approximation in practice (HF does too)
        elif act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {act!r}")
        else:
            act = "silu"
        # Newer transformers (5.x) write `rope_parameters` (rope_theta + scaling in one dict)
        # instead of the older top-level `rope_theta` / `rope_scaling`; accept both.
        rope_params = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling") or rope_params or None
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"rope_scaling must be an object, got {type(rope_scaling).__name__}")
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind in (None, "default"):
                rope_scaling = None
            elif kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type {kind!r}")
            else:
                rope_scaling = {k: rope_scaling[k] for k in (
                    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("attention/MLP biases are not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            activation=act,
            norm_weight_offset=1.0 if gemma else 0.0,
            embed_scale=gemma,
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            family="gemma2" if gemma2 else ("gemma" if gemma else "llama"),
            name=name,
            **(_gemma2_fields(hf) if gemma2 else _mistral_fields(hf) if model_type == "mistral" else {}),
        ).validate()

    def within_cache(self, max_cache_length: int) -> "ModelConfig":
        """This config for an engine holding at most `max_cache_length` positions: a sliding window
        that spans them all never masks anything and is dropped, so the fused attention paths stay
        open (Mistral's 4096-token window under a cache of 4096 or less)."""
        if self.sliding_window is None or max_cache_length > self.sliding_window:
            return self
        return dataclasses.replace(self, sliding_window=None, sliding_layers=())


def _mistral_fields(hf: dict) -> dict:
    """Mistral: every layer attends to its last `sliding_window` positions (v0.1: 4096; later
    versions have none)."""
    window = hf.get("sliding_window")
    if not window:
        return {}
    return dict(sliding_window=window, sliding_layers=tuple(range(hf["num_hidden_layers"])))


def _gemma2_fields(hf: dict) -> dict:
    """Gemma 2: post-norms, soft-capped scores and logits, sliding-window layers alternating with global."""
    n = hf["num_hidden_layers"]  # bounded by from_hf
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise ValueError(f"layer_types must be a list of {n} entries (num_hidden_layers)")
    window = hf.get("sliding_window")
    return dict(
        post_norms=True,
        query_scale=float(hf.get("query_pre_attn_scalar") or hf.get("head_dim") or 256),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        sliding_window=window,
        sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else (),
    )


# (config.json key, ModelConfig field, required) of the sizes from_hf bounds first.
_HF_SIZES = (("num_hidden_layers", "num_layers", True), ("num_attention_heads", "num_heads", True),
             ("num_key_value_heads", "num_kv_heads", False), ("hidden_size", "hidden_size", True),
             ("intermediate_size", "intermediate_size", True), ("vocab_size", "vocab_size", True),
             ("head_dim", "head_dim", False), ("max_position_embeddings", "max_position_embeddings", False))


def bounded_int(field: str, value, key: Optional[str] = None) -> int:
    """`value` as an int in 1..LIMITS[field]; ValueError naming `key` (default: the field) otherwise."""
    key = key or field
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {_short(value)}")
    if not 1 <= value <= LIMITS[field]:
        raise ValueError(f"{key} = {value} is outside 1..{LIMITS[field]} (the engine's ceiling for {field})")
    return int(value)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _positive_float(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {_short(value)}")


def check_limits(cfg: "ModelConfig") -> None:
    """ValueError naming the first field of `cfg` that is not a sane size, id or constant.

    Every loader's config passes here (`validate`), so the engine never sizes a table, a cache
    or a name list from an unchecked number."""
    for field in LIMITS:
        bounded_int(field, getattr(cfg, field))
    if cfg.num_kv_heads > cfg.num_heads:
        raise ValueError(f"num_kv_heads ({cfg.num_kv_heads}) exceeds num_heads ({cfg.num_heads})")
    if cfg.param_count() > MAX_PARAMS:
        raise ValueError(f"{cfg.param_count():.3g} parameters exceed the engine's ceiling of {MAX_PARAMS:.3g}")
    for name in ("rope_theta", "rms_norm_eps"):
        _positive_float(name, getattr(cfg, name))
    for name in ("query_scale", "attn_logit_softcap", "final_logit_softcap"):
        _positive_float(name, getattr(cfg, name), optional=True)
    if cfg.rope_scaling is not None:
        if not isinstance(cfg.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object, got {_short(cfg.rope_scaling)}")
        for k, v in cfg.rope_scaling.items():
            _positive_float(f"rope_scaling.{k}", v)
    if cfg.sliding_window is not None:
        bounded_int("max_position_embeddings", cfg.sliding_window, "sliding_window")
    if not isinstance(cfg.sliding_layers, tuple) or len(cfg.sliding_layers) > cfg.num_layers or any(
            not isinstance(i, numbers.Integral) or not 0 <= i < cfg.num_layers for i in cfg.sliding_layers):
        raise ValueError(f"sliding_layers must be layer indices below {cfg.num_layers}, "
                         f"got {_short(cfg.sliding_layers)}")
    if not isinstance(cfg.eos_token_ids, tuple):
        raise ValueError(f"eos_token_ids must be a tuple, got {_short(cfg.eos_token_ids)}")
    ids = cfg.eos_token_ids + (() if cfg.bos_token_id is None else (cfg.bos_token_id,))
    if len(cfg.eos_token_ids) > MAX_SPECIAL_IDS or any(
            not isinstance(i, numbers.Integral) or isinstance(i, bool) or i < 0 for i in ids):
        raise ValueError(f"bos/eos token ids must be at most {MAX_SPECIAL_IDS} non-negative integers, "
                         f"got bos {_short(cfg.bos_token_id)}, eos {_short(cfg.eos_token_ids)}")


def _check_fields(cls, d: dict, what: str) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} config fields: {sorted(unknown)}")
