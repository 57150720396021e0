"""Model and engine configuration as plain dataclasses.

One `ModelConfig` describes every supported family (MaxText style): Llama 2/3,
SmolLM2 and Gemma differ only in the switches below, never in code copies.
`EngineConfig` carries the serving knobs and accepts the fields of the
`model.json` that JetStream's Triton backend used (booleans may arrive as the
strings "True"/"False").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
        """Map a Hugging Face `config.json` onto our switches."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        if model_type not in ("llama", "gemma", "gemma2", "mistral") and not any(
                a in ("LlamaForCausalLM", "GemmaForCausalLM", "MistralForCausalLM") for a in archs):
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                "supported: llama, gemma, gemma2, mistral (no sliding window)")
        if model_type == "mistral" and hf.get("sliding_window") not in (None, 0):
            if hf["sliding_window"] < hf.get("max_position_embeddings", 0):
                raise ValueError("mistral with a sliding window is not supported")
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
            **(_gemma2_fields(hf) if gemma2 else {}),
        ).validate()


def _gemma2_fields(hf: dict) -> dict:
    """Gemma 2: post-norms, soft-capped scores and logits, sliding-window layers alternating with global."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    window = hf.get("sliding_window")
    return dict(
        post_norms=True,
        query_scale=float(hf.get("query_pre_attn_scalar") or hf.get("head_dim") or 256),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        sliding_window=window,
        sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else (),
    )


def _check_fields(cls, d: dict, what: str) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "y", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "n", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass
class EngineConfig:
    """Serving knobs. Field names follow JetStream's model.json where one exists."""

    checkpoint_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    param_size: Optional[str] = None  # e.g. "7b": picks configs/models/llama2-7b.json when no checkpoint
    batch_size: int = 16  # decode slots
    max_cache_length: int = 1024  # tokens per slot, prompt + completion
    context_size: int = 512  # longest prompt accepted
    quantize_weights: bool = False
    quantize_kv_cache: bool = False
    platform: str = "auto"  # "tpu=8" | "gpu=1" | "cpu" | "auto"
    dtype: Optional[str] = None  # None: bfloat16 on accelerators, float32 on CPU
    model: Optional[str] = None  # a config name (configs/models/NAME.json)
    min_prefill_bucket: int = 16
    decode_steps: int = 8  # decode steps per host round-trip
    prefill_batch: int = 8  # prompts prefilled together per bucket
    # Refill a slot as soon as the decode calls already dispatched carry its request to
    # max_tokens, instead of after its tokens are read (saves a decode call per refill).
    early_refill: bool = True
    # Refill free slots only once this many are free (or nothing else decodes, or no requests
    # are left to wait for): fewer, fuller prefill calls for length mixes. 1: refill at once.
    min_refill: int = 1
    # Park free slots that no refill took (release_slots) so decode stops reading their
    # stale caches; off only to measure what parking saves.
    park_free_slots: bool = True
    # Order in which waiting requests take slots. "longest_first": each window of
    # `schedule_window` requests is served longest max_tokens first (then longest prompt), so
    # the long requests no longer run alone at the end of a job while most slots sit empty
    # (requests with equal max_tokens and prompt length keep arrival order, so fixed-length
    # jobs run as they arrive). "arrival": as they come.
    schedule: str = "longest_first"
    schedule_window: int = 4096
    # Paged KV cache: pages of this many tokens from one shared pool (0: one max_cache_length
    # region per slot). A slot then holds only the pages its request needs (prompt +
    # max_tokens), so a length mix fits several times the slots in the same memory.
    kv_page_size: int = 0
    # Tokens in the page pool (0: batch_size * max_cache_length, the contiguous cache's size;
    # "auto": what the device has free after the weights and the compiled programs' workspace,
    # engine/kv_budget.py). The engine replaces "auto" by the number it chose.
    kv_cache_tokens: Union[int, str] = 0
    attention: str = "auto"  # "auto" | "xla" | "cudnn" | "pallas"
    # One GEMM for q|k|v and one for gate|up (fewer, larger kernels). Single-device meshes only:
    # a tensor-parallel split keeps the separate matrices.
    fuse_projections: bool = True
    seed: int = 0
    warmup: Optional[bool] = None  # compile every prefill shape + decode at load; None: on accelerators only
    # Persistent XLA compilation cache, so a scheduled rerun with the same shapes skips compiling.
    # None: $JETBEAM_COMPILATION_CACHE, else ~/.cache/jetbeam/xla; "" turns it off.
    compilation_cache_dir: Optional[str] = None

    def __post_init__(self):
        for name in ("quantize_weights", "quantize_kv_cache", "fuse_projections", "early_refill",
                     "park_free_slots"):
            setattr(self, name, _as_bool(getattr(self, name)))
        if self.warmup is not None:
            self.warmup = _as_bool(self.warmup)
        for name in ("batch_size", "max_cache_length", "context_size", "min_prefill_bucket",
                     "decode_steps", "prefill_batch", "min_refill", "seed", "kv_page_size",
                     "kv_cache_tokens", "schedule_window"):
            if name == "kv_cache_tokens" and str(self.kv_cache_tokens).strip().lower() == "auto":
                self.kv_cache_tokens = "auto"
                continue
            setattr(self, name, int(getattr(self, name)))
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.context_size < 1 or self.max_cache_length < 2:
            raise ValueError("context_size must be >= 1 and max_cache_length >= 2")
        if self.context_size >= self.max_cache_length:
            raise ValueError(
                f"context_size ({self.context_size}) must be smaller than max_cache_length "
                f"({self.max_cache_length}) so at least one token can be generated")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.decode_steps < 1 or self.prefill_batch < 1 or self.min_refill < 1:
            raise ValueError("decode_steps, prefill_batch and min_refill must be >= 1")
        if self.schedule not in ("arrival", "longest_first"):
            raise ValueError(f"schedule must be 'arrival' or 'longest_first', got {self.schedule!r}")
        if self.schedule_window < 1:
            raise ValueError("schedule_window must be >= 1")
        if self.kv_cache_tokens == "auto":
            if not self.kv_page_size:
                raise ValueError("kv_cache_tokens=auto sizes a paged cache: set kv_page_size too")
        elif self.kv_cache_tokens < 0:
            raise ValueError("kv_cache_tokens must be >= 0 or 'auto'")
        if self.kv_page_size < 0:
            raise ValueError("kv_page_size must be >= 0")
        if self.kv_page_size and self.max_cache_length % self.kv_page_size:
            raise ValueError(f"kv_page_size ({self.kv_page_size}) must divide max_cache_length "
                             f"({self.max_cache_length})")
        if self.kv_page_size and self.kv_cache_tokens != "auto" and 0 < self.kv_cache_tokens < self.kv_page_size:
            raise ValueError("kv_cache_tokens must hold at least one page")

    @property
    def num_kv_pages(self) -> int:
        """Pages in the pool of a paged cache (without the trash page); 0 when not paged."""
        if not self.kv_page_size:
            return 0
        if self.kv_cache_tokens == "auto":
            raise ValueError("kv_cache_tokens=auto is sized from device memory by the engine "
                             "(JaxEngine.init_decode_state, after load_params)")
        return (self.kv_cache_tokens or self.batch_size * self.max_cache_length) // self.kv_page_size

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        _check_fields(cls, d, "engine")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str) -> "EngineConfig":
        with open(path) as f:
            d = json.load(f)
        base = os.path.dirname(os.path.abspath(path))
        for key in ("checkpoint_path", "tokenizer_path"):
            if d.get(key) and not os.path.isabs(d[key]) and "://" not in d[key]:
                d[key] = os.path.join(base, d[key])
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def compute_dtype(self):
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16

    def prefill_buckets(self) -> list[int]:
        """Power-of-two prompt lengths compiled for prefill, up to context_size."""
        top = next_power_of_two(self.context_size)
        b = min(next_power_of_two(self.min_prefill_bucket), top)
        out = []
        while b <= top:
            out.append(min(b, self.max_cache_length))
            b *= 2
        return sorted(set(out))
