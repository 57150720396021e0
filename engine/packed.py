"""Packed prefill: a refill's prompts back to back in one row of T tokens, no padding between.

Bucketed prefill pads every prompt to a power of two and splits a length mix into one call per
bucket; a refill of 16 prompts then costs several small calls, each well below the GEMM rate of
a large one. Packed, the same prompts are one call: the matrix work sees each token once, and
only the attention knows where one prompt (a segment) ends. Segment i holds tokens
[starts[i], starts[i] + lengths[i]) at positions 0.. of its own sequence; rows of length 0 are
unused, and tokens past the last segment are padding.

Attention is causal within each segment: cuDNN's packed (variable-length) flash attention on
NVIDIA GPUs, else XLA over query blocks against the key window a segment can reach (bounded by
the longest prompt), so memory stays Bq x (Bq + longest) scores per head, not T x T.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from engine.kv_cache import NEG_INF, KVCache, _set_rows, _softcap, _write_layers

QUERY_BLOCK = 256  # queries per block of the XLA path


def segment_layout(lengths, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host side: (starts [M], segment id [T], position [T]) of segments of `lengths` [M] packed
    from token 0 in a row of `total` tokens. Padding tokens get segment id M and position 0."""
    lengths = np.asarray(lengths, np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    seg = np.full(total, len(lengths), np.int32)
    pos = np.zeros(total, np.int32)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        seg[s:s + n] = i
        pos[s:s + n] = np.arange(n)
    return starts, seg, pos


def _cudnn_packed():
    """cuDNN's attention entry with sequence packing (JAX-internal), or None where it is absent."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    except ImportError:
        return None
    return dot_product_attention, MaskType


def packed_attention_impl(prefill_impl: str, model_config) -> str:
    """Which path packed_attention takes for a model under the engine's prefill attention:
    "cudnn" where cuDNN serves the prefill and its packed entry exists, else "xla"."""
    plain = model_config.attn_logit_softcap is None and not model_config.sliding_layers
    return "cudnn" if prefill_impl == "cudnn" and plain and _cudnn_packed() is not None else "xla"


def packed_attention(q, k, v, seg, starts, lengths, scale: float, impl: str = "xla", span: Optional[int] = None,
                     softcap: Optional[float] = None, sliding_window: Optional[int] = None,
                     block: int = QUERY_BLOCK):
    """Causal attention within segments: q [1, T, H, D], k/v [1, T, Hkv, D], seg [T] segment ids,
    starts/lengths [M]. `span` (static): the longest segment (None: T); `block`: queries per
    block of the XLA path."""
    if impl == "cudnn" and softcap is None and sliding_window is None:
        entry = _cudnn_packed()
        if entry is not None:
            attend, mask_type = entry
            used = lengths > 0
            seqlen = jnp.where(used, lengths, -1)[None]
            offsets = jnp.concatenate([jnp.where(used, starts, -1), jnp.full((1,), -1, starts.dtype)])[None]
            return attend(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
                          scale=scale, mask_type=mask_type.PADDING_CAUSAL)
    return _xla_packed(q[0], k[0], v[0], seg, scale, span, softcap, sliding_window, block)[None]


def _xla_packed(q, k, v, seg, scale, span, softcap, sliding_window, block):
    """q [T, H, D], k/v [T, Hkv, D]: each block of queries against the keys a segment starting
    up to `span` tokens earlier can hold."""
    t, h, d = q.shape
    hkv = k.shape[1]
    bq = min(block, t)
    if t % bq:
        bq = t
    reach = t if span is None else min(t, span)
    w = min(t, bq + reach)  # keys each block reads
    pad = w - bq  # keys before the first query block
    kp = jnp.pad(k, ((pad, 0), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((pad, 0), (0, 0), (0, 0)))
    segp = jnp.pad(seg, (pad, 0), constant_values=-1)
    idx = jnp.arange(t)
    idxp = jnp.pad(idx, (pad, 0), constant_values=-1)

    def block(b):
        q0 = b * bq
        qb = jax.lax.dynamic_slice_in_dim(q, q0, bq).reshape(bq, hkv, h // hkv, d)
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, q0, w) for x in (kp, vp))  # keys [q0 - pad, q0 + bq)
        sq, sk = jax.lax.dynamic_slice_in_dim(seg, q0, bq), jax.lax.dynamic_slice_in_dim(segp, q0, w)
        iq, ik = jax.lax.dynamic_slice_in_dim(idx, q0, bq), jax.lax.dynamic_slice_in_dim(idxp, q0, w)
        sc = _softcap(jnp.einsum("shgd,thd->hgst", qb, kb, preferred_element_type=jnp.float32) * scale, softcap)
        mask = (sq[:, None] == sk[None]) & (ik[None] <= iq[:, None])
        if sliding_window is not None:
            mask &= ik[None] > iq[:, None] - sliding_window
        p = jax.nn.softmax(jnp.where(mask, sc, NEG_INF), axis=-1)
        return jnp.einsum("hgst,thd->shgd", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)

    out = jax.lax.map(block, jnp.arange(t // bq))  # [blocks, bq, hkv, g, d]
    return out.reshape(t, h, d).astype(q.dtype)


def insert_packed(cache: KVCache, prefix: KVCache, seg, pos, slots=None, page_rows=None) -> KVCache:
    """Write a packed prefix ([1, T, ...] per layer; scales [1, Hkv, T]) token by token: token t
    of segment seg[t] at position pos[t] goes to slot slots[seg[t]] (unpaged) or to page
    page_rows[seg[t], pos[t] // page] (paged). Padding tokens (seg = M) and skipped rows are
    dropped (unpaged) or land on the trash page (paged: page_rows' padding)."""
    if page_rows is not None:
        page = cache.k[0].shape[1]
        trash = cache.k[0].shape[0] - 1  # the pool's last page
        rows = jnp.concatenate([page_rows, jnp.full((1, page_rows.shape[1]), trash, page_rows.dtype)])
        first, second = rows[seg, pos // page], pos % page
    else:
        rows = jnp.concatenate([slots, jnp.full((1,), cache.k[0].shape[0], slots.dtype)])
        first, second = rows[seg], pos

    def put(dst, src):  # [1, T, Hkv, D]
        return _set_rows(dst, (first, second), src[0], mode="drop")

    def put_scale(dst, src):  # [1, Hkv, T]
        return dst.at[first, :, second].set(src[0].T, mode="drop")

    return _write_layers(cache, prefix, put, put_scale)
