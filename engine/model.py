"""The transformer, one definition for Llama-family and Gemma models (switches in ModelConfig).

Params are a plain pytree (see engine/loaders/__init__.py for names and layouts):
    {"embed", "layers": [ {attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down}, ... ],
     "final_norm", "lm_head"?, "embed_bits"?}
(or per layer "wqkv" and "w_gate_up" in place of the parts, see engine/weights.fuse_projections).
Any matrix may be a `QuantizedWeight` (int8 + per-column scale).

Two entry points: `prefill` runs right-padded prompts [N, S] (or prompts packed in one row,
engine/packed.py) from scratch and returns per-layer K/V; `decode_step` runs one token per slot
[B] against the KV cache.

Each layer is one jitted block (`_prefill_layer`, `_decode_layer`) called once per layer: JAX
traces and lowers a block once per shape instead of once per layer, which cuts the tracing of
every prefill shape and decode program several-fold (seconds of a short CPU job); XLA inlines
the calls, so the compiled program is the unrolled one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from engine.model_config import ModelConfig
from engine.kv_cache import (KVCache, cached_prefix_layer, decode_attention, prefill_attention,
                             prefill_attention_cached, write_token)
from engine.packed import packed_attention
from engine.quantize import linear


def rms_norm(x, w, cfg: ModelConfig):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    if cfg.norm_weight_offset:  # Gemma: computed in float32, then cast (as HF does)
        return (y * (cfg.norm_weight_offset + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * y.astype(x.dtype)  # Llama: cast, then scale


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs:  # Llama 3.1 "llama3" frequency scaling
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (Hugging Face layout). x: [..., H, D], positions: [...]."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [..., D/2]
    cos = jnp.cos(ang)[..., None, :]
    sin = jnp.sin(ang)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def embed(params, cfg: ModelConfig, tokens, dtype):
    if "embed_bits" in params:  # the table's 16-bit patterns (CPU; engine/weights.add_embed_bits)
        rows = jnp.take(params["embed_bits"], tokens, axis=0)
        x = jax.lax.bitcast_convert_type(rows, params["embed"].dtype).astype(dtype)
    else:
        x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    if cfg.embed_scale:  # Gemma: the normalizer is rounded to the activation dtype first
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    return x


def mlp(layer, x, cfg: ModelConfig):
    if "w_gate_up" in layer:  # fused at load (engine/weights.fuse_projections)
        gate, up = jnp.split(linear(x, layer["w_gate_up"]), 2, axis=-1)
    else:
        gate = linear(x, layer["w_gate"])
        up = linear(x, layer["w_up"])
    if cfg.activation == "gelu_tanh":
        act = jax.nn.gelu(gate, approximate=True)
    else:
        act = jax.nn.silu(gate)
    return linear(act * up, layer["w_down"])


def logits(params, cfg: ModelConfig, x):
    """Final norm and the output projection, in float32 (soft-capped for Gemma 2)."""
    x = rms_norm(x, params["final_norm"], cfg)
    if cfg.tie_embeddings:
        table = params["embed"]  # kept in the matrices' dtype: the dot runs in it, f32 accumulation
        out = jnp.einsum("...d,vd->...v", x.astype(table.dtype), table, preferred_element_type=jnp.float32)
    else:
        out = linear(x, params["lm_head"]).astype(jnp.float32)
    cap = cfg.final_logit_softcap
    return out if cap is None else cap * jnp.tanh(out / cap)


def attn_options(cfg: ModelConfig, layer_index: int) -> dict:
    """Per-layer attention switches: score scale, soft-cap, sliding window (Gemma 2)."""
    return dict(scale=(cfg.query_scale or cfg.head_dim) ** -0.5, softcap=cfg.attn_logit_softcap,
                sliding_window=cfg.sliding_window if layer_index in cfg.sliding_layers else None)


def _residual_attn(layer, x, a, cfg: ModelConfig):
    """x + o_proj(a), with Gemma 2's post-attention norm when configured."""
    out = linear(a, layer["wo"])
    if cfg.post_norms:
        out = rms_norm(out, layer["post_attn_norm"], cfg)
    return x + out


def _residual_mlp(layer, x, cfg: ModelConfig):
    out = mlp(layer, rms_norm(x, layer["mlp_norm"], cfg), cfg)
    if cfg.post_norms:
        out = rms_norm(out, layer["post_mlp_norm"], cfg)
    return x + out


def _qkv(layer, h, cfg: ModelConfig):
    shape = h.shape[:-1]
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if "wqkv" in layer:  # fused at load (engine/weights.fuse_projections)
        qkv = linear(h, layer["wqkv"])
        q, k, v = qkv[..., :hq], qkv[..., hq:hq + hkv], qkv[..., hq + hkv:]
    else:
        q, k, v = linear(h, layer["wq"]), linear(h, layer["wk"]), linear(h, layer["wv"])
    return (q.reshape(*shape, cfg.num_heads, cfg.head_dim), k.reshape(*shape, cfg.num_kv_heads, cfg.head_dim),
            v.reshape(*shape, cfg.num_kv_heads, cfg.head_dim))


def prefill(params, cfg: ModelConfig, tokens, dtype, all_logits: bool = False, last_index=None,
            attn_impl: str = "xla", context=None, segments=None, span=None):
    """Run right-padded prompts tokens [N, S].

    Returns (logits, ks, vs): logits [N, S, V] if all_logits else [N, V] at `last_index` [N]
    (each prompt's last real position); ks/vs are per-layer [N, S, Hkv, D] in `dtype`.
    `context` (prefix caching): (cache, pages [N, C / page], length [N]): each prompt continues
    length[n] positions already in the paged cache; tokens are the rest, at positions from there.
    `segments` (packed prefill, engine/packed.py): (positions [T], segment ids [T], starts [M],
    lengths [M]) of prompts packed in tokens [1, T], none longer than `span` (static); logits are
    then [M, V] at last_index [M], each segment's last token in the row.
    """
    n, s = tokens.shape
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    positions = jnp.broadcast_to(jnp.arange(s), (n, s))
    segs = None
    if segments is not None:
        positions, segs = segments[0][None], tuple(segments[1:])
    if context is not None:
        cache, pages, ctx_len = context
        positions = positions + ctx_len[:, None]
    x = embed(params, cfg, tokens, dtype)
    ks, vs = [], []
    for i, layer in enumerate(params["layers"]):
        ctx = None if context is None else (_layer_cache(cache, i), pages, ctx_len)
        x, k, v = _prefill_layer(layer, x, positions, inv_freq, ctx, segs, cfg=_ByValue(cfg),
                                 opts=_options_key(cfg, i), attn_impl=attn_impl, span=span)
        ks.append(k)
        vs.append(v)
    if segs is not None and not all_logits:
        x = x[0, last_index]
    elif not all_logits:
        x = jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]
    return logits(params, cfg, x), ks, vs


class _ByValue:
    """A static argument hashed by its repr: ModelConfig may hold a dict (rope_scaling)."""

    def __init__(self, value):
        self.value, self._key = value, repr(value)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _ByValue) and self._key == other._key


def _options_key(cfg: ModelConfig, layer_index: int) -> tuple:
    """attn_options of a layer as a hashable static argument."""
    return tuple(sorted(attn_options(cfg, layer_index).items()))


def _layer_cache(cache: KVCache, i: int) -> KVCache:
    """Layer i of the cache as a one-layer KVCache."""
    one = lambda xs: None if xs is None else [xs[i]]
    return KVCache([cache.k[i]], [cache.v[i]], one(cache.k_scale), one(cache.v_scale))


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "attn_impl", "span"))
def _prefill_layer(layer, x, positions, inv_freq, ctx, segs, *, cfg: _ByValue, opts: tuple, attn_impl: str,
                   span=None):
    """One layer over prompts x [N, S, hidden]: (x, k, v); ctx: (one-layer cache, pages,
    cached lengths) when the prompts continue cached positions; segs: (segment ids, starts,
    lengths) when x is one packed row (engine/packed.py)."""
    cfg = cfg.value
    n, s = x.shape[:2]
    h = rms_norm(x, layer["attn_norm"], cfg)
    q, k, v = _qkv(layer, h, cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if segs is not None:
        a = packed_attention(q, k, v, *segs, impl=attn_impl, span=span, **dict(opts))
    elif ctx is None:
        a = prefill_attention(q, k, v, impl=attn_impl, **dict(opts))
    else:
        layer_cache, pages, ctx_len = ctx
        ck, cv = cached_prefix_layer(layer_cache, 0, pages, k.dtype)
        a = prefill_attention_cached(q, k, v, ck, cv, ctx_len, **dict(opts))
    x = _residual_attn(layer, x, a.reshape(n, s, -1), cfg)
    return _residual_mlp(layer, x, cfg), k, v


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "attn_impl", "window", "kernel", "mesh"))
def _decode_layer(layer, x, pos, inv_freq, layer_cache: KVCache, page_table, *, cfg: _ByValue,
                  opts: tuple, attn_impl: str, window, kernel: tuple, mesh):
    """One layer for one token per slot x [B, hidden]: (x, the one-layer cache with the token's K/V)."""
    cfg = cfg.value
    b = x.shape[0]
    h = rms_norm(x, layer["attn_norm"], cfg)
    q, k, v = _qkv(layer, h, cfg)
    q = apply_rope(q, pos, inv_freq)
    k = apply_rope(k, pos, inv_freq)
    layer_cache = write_token(layer_cache, 0, k, v, pos, page_table, window)
    a = decode_attention(q, layer_cache, 0, pos, impl=attn_impl, window=window, page_table=page_table,
                         kernel=kernel, mesh=mesh, **dict(opts))
    x = _residual_attn(layer, x, a.reshape(b, -1), cfg)
    return _residual_mlp(layer, x, cfg), layer_cache


def decode_step(params, cfg: ModelConfig, tokens, pos, cache: KVCache, dtype, attn_impl: str = "xla",
                window=None, page_table=None, kernel: tuple = (), kernel_mesh=None):
    """One token per slot: tokens [B] at positions pos [B]; returns (logits [B, V], cache).

    `window` (static): attention reads at most the first `window` cache positions.
    `page_table` [B, W]: the cache is paged (engine/kv_cache.py).
    `kernel` (static): settings of the Pallas decode kernel, (key, value) pairs.
    `kernel_mesh` (static): under tensor parallelism, the mesh the Pallas kernel runs on per device.
    """
    cache = KVCache(list(cache.k), list(cache.v),
                    None if cache.k_scale is None else list(cache.k_scale),
                    None if cache.v_scale is None else list(cache.v_scale))
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    x = embed(params, cfg, tokens, dtype)
    for i, layer in enumerate(params["layers"]):
        x, one = _decode_layer(layer, x, pos, inv_freq, _layer_cache(cache, i), page_table, cfg=_ByValue(cfg),
                               opts=_options_key(cfg, i), attn_impl=attn_impl, window=window,
                               kernel=tuple(kernel), mesh=kernel_mesh)
        cache.k[i], cache.v[i] = one.k[0], one.v[0]
        if cache.quantized:
            cache.k_scale[i], cache.v_scale[i] = one.k_scale[0], one.v_scale[0]
    return logits(params, cfg, x), cache
