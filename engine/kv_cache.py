"""The preallocated KV cache and decode attention over it.

Paged (EngineConfig.kv_page_size > 0): the same arrays hold pages instead of slots,
[pages, page, kv_heads, head_dim] (scales [pages, kv_heads, page]), and a page table
[slots, max_cache_length / page] in the decode state names each slot's pages. Slots then
share one pool of cache tokens, so a length mix fits many more slots than one
max_cache_length region per slot allows.

Layout per layer: K and V as [slots, max_cache_length, kv_heads, head_dim] (the BTNH
layout cuDNN's attention reads directly), in the compute dtype or 8 bits (int8 or fp8 e4m3,
kv_cache_dtype) with one float32 scale per (slot, kv_head, token). The scales are stored
[slots, kv_heads, T], not [slots, T, kv_heads]: a decode kernel walking one head's tokens then
reads them contiguously instead of one 4-byte value per 32-byte memory sector. Layers are separate arrays (a Python list), not one
stacked array: a scan over stacked layers copies each layer's slice, several times slower on a
GPU than unrolled layers.

Chunked (EngineConfig.kv_layout, the default on one CPU device): engine/kv_chunks.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

from engine.kv_chunks import block_scores, block_values, blocks_below, chunk_sizes, new_blocks, put_chunks, write_chunks
from engine.quantize import quantize_kv

NEG_INF = -1e30


@dataclass
class KVCache:
    k: list  # per layer [B, T, Hkv, D] (dtype or int8)
    v: list
    k_scale: Optional[list] = None  # per layer [B, Hkv, T] float32 when quantized
    v_scale: Optional[list] = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def chunked(self) -> bool:
        """Each layer a tuple of [slots, kv_heads, CHUNK, head_dim] blocks (engine/kv_chunks.py)."""
        return isinstance(self.k[0], tuple)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "k_scale", "v_scale"], meta_fields=[])


def _quant_dtype(quantized):
    """The 8-bit element type `quantized` names (True: int8), or None (False/None: unquantized)."""
    if quantized is None or quantized is False:
        return None
    return jnp.int8 if quantized is True else jnp.dtype(quantized)


def init_cache(num_layers: int, slots: int, length: int, kv_heads: int, head_dim: int,
               dtype, quantized, chunked: bool = False) -> KVCache:
    """An empty cache; `quantized`: None/False (K/V in `dtype`), True (int8) or an 8-bit dtype
    (int8 or fp8 e4m3), with float32 scales of 1."""
    qdt = _quant_dtype(quantized)
    quantized = qdt is not None
    if chunked:  # engine/kv_chunks.py
        sizes = chunk_sizes(length)
        kv = lambda: new_blocks(slots, kv_heads, sizes, (head_dim,), qdt if quantized else dtype)  # noqa: E731
        sc = lambda: new_blocks(slots, kv_heads, sizes, (), jnp.float32, 1.0)  # noqa: E731
        k, v = [kv() for _ in range(num_layers)], [kv() for _ in range(num_layers)]
        if not quantized:
            return KVCache(k, v)
        return KVCache(k, v, [sc() for _ in range(num_layers)], [sc() for _ in range(num_layers)])
    shape = (slots, length, kv_heads, head_dim)
    if quantized:
        z = lambda: jnp.zeros(shape, qdt)
        s = lambda: jnp.ones((slots, kv_heads, length), jnp.float32)
        return KVCache([z() for _ in range(num_layers)], [z() for _ in range(num_layers)],
                       [s() for _ in range(num_layers)], [s() for _ in range(num_layers)])
    z = lambda: jnp.zeros(shape, dtype)
    return KVCache([z() for _ in range(num_layers)], [z() for _ in range(num_layers)])


def pack_prefix(ks: list, vs: list, quantized) -> KVCache:
    """A prefill's K/V ([N, S, Hkv, D] per layer) in the cache's storage format (`quantized` as
    init_cache takes it; scales [N, Hkv, S])."""
    qdt = _quant_dtype(quantized)
    if qdt is None:
        return KVCache(list(ks), list(vs))
    kq, ksc = zip(*[quantize_kv(k, qdt) for k in ks])
    vq, vsc = zip(*[quantize_kv(v, qdt) for v in vs])
    heads_first = lambda scales: [jnp.swapaxes(x, 1, 2) for x in scales]
    return KVCache(list(kq), list(vq), heads_first(ksc), heads_first(vsc))


def _words(x):
    """(x viewed as 32-bit words along its last axis, x's dtype), or (x, None) where elements
    are already 4 bytes or a row is not a whole number of words."""
    size = x.dtype.itemsize
    if size >= 4 or (x.shape[-1] * size) % 4:
        return x, None
    per = 4 // size
    return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // per, per), jnp.uint32), x.dtype


def _unwords(w, dtype):
    """The inverse of _words: words back to `dtype` elements (None: w as is)."""
    if dtype is None:
        return w
    x = jax.lax.bitcast_convert_type(w, dtype)  # [..., words, per]
    return x.reshape(*x.shape[:-2], -1)


def _set_rows(dst, where, src, words: Optional[bool] = None, **kw):
    """dst.at[where].set(src) over whole last-axis rows.

    With `words` (default: on GPUs) the rows are scattered as 32-bit words. XLA's GPU scatter
    stores one element per thread, and for int8 K/V one byte per thread is a small fraction of
    the memory bandwidth. There the view is a free bitcast and the donated
    cache is still updated in place; XLA's CPU backend instead copies the whole cache to undo
    the view, so elsewhere the plain scatter stays."""
    if words is None:
        words = jax.default_backend() == "gpu"
    if not words:
        return dst.at[where].set(src.astype(dst.dtype), **kw)
    view, dtype = _words(dst)
    return _unwords(view.at[where].set(_words(src.astype(dst.dtype))[0], **kw), dtype)


def _write_layers(cache: KVCache, prefix: KVCache, put, put_scale) -> KVCache:
    """put(dst, src) for every layer's K and V, put_scale for their scales (int8 caches)."""
    k = [put(d, x) for d, x in zip(cache.k, prefix.k)]
    v = [put(d, x) for d, x in zip(cache.v, prefix.v)]
    if not cache.quantized:
        return KVCache(k, v)
    return KVCache(k, v, [put_scale(d, x) for d, x in zip(cache.k_scale, prefix.k_scale)],
                   [put_scale(d, x) for d, x in zip(cache.v_scale, prefix.v_scale)])


def insert_prefix(cache: KVCache, prefix: KVCache, slots) -> KVCache:
    """Write N prefixes ([N, S, ...]) into rows `slots` [N] at positions [0, S).

    Slots outside [0, B) are dropped, so a padded prefill batch can carry dummy rows.
    """
    if cache.chunked:
        return _write_layers(cache, prefix, lambda dst, src: put_chunks(dst, jnp.swapaxes(src, 1, 2), slots),
                             lambda dst, src: put_chunks(dst, src, slots))

    def put(dst, src):  # K/V [N, S, Hkv, D]
        return _set_rows(dst, (slots, slice(0, src.shape[1])), src, mode="drop")

    def put_scale(dst, src):  # scales [N, Hkv, S]
        s = src.shape[2]
        return dst.at[slots, :, :s].set(src, mode="drop")

    return _write_layers(cache, prefix, put, put_scale)


def insert_prefix_paged(cache: KVCache, prefix: KVCache, page_rows) -> KVCache:
    """Write N prefixes ([N, S, ...]) into a paged cache through their page-table rows
    page_rows [N, W]: positions [j*page, (j+1)*page) go to page page_rows[n, j].

    S is padded up to whole pages. Rows of dummy prompts, and a prompt's padding pages past
    its allocation, point at the trash page (duplicate writes there are harmless)."""
    page = cache.k[0].shape[1]
    n, s = prefix.k[0].shape[:2]
    n_pg = -(-s // page)
    pad = n_pg * page - s
    pages = page_rows[:, :n_pg].reshape(-1)

    def put(dst, src):  # K/V [N, S, Hkv, D] -> [N * n_pg, page, Hkv, D]
        src = jnp.pad(src, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return _set_rows(dst, pages, src.reshape(n * n_pg, page, *src.shape[2:]))

    def put_scale(dst, src):  # scales [N, Hkv, S] -> [N * n_pg, Hkv, page]
        hkv = src.shape[1]
        src = jnp.pad(src, ((0, 0), (0, 0), (0, pad)), constant_values=1.0)
        src = src.reshape(n, hkv, n_pg, page).transpose(0, 2, 1, 3).reshape(n * n_pg, hkv, page)
        return dst.at[pages].set(src)

    return _write_layers(cache, prefix, put, put_scale)


def write_token(cache: KVCache, layer: int, k, v, pos, page_table=None, window: Optional[int] = None) -> KVCache:
    """Write one new token's K/V ([B, Hkv, D]) for every slot at its position pos [B]
    (paged: at offset pos % page of page page_table[b, pos // page]). `window`: a chunked
    cache writes only its blocks below it."""
    if cache.quantized:
        stored = cache.k[layer][0] if cache.chunked else cache.k[layer]
        (k, ks), (v, vs) = quantize_kv(k, stored.dtype), quantize_kv(v, stored.dtype)
    if cache.chunked:
        put = put_scale = lambda dst, x: write_chunks(dst, x, pos, window)  # noqa: E731
    else:
        if page_table is None:
            where = (jnp.arange(k.shape[0]), pos)  # (slot, position)
        else:
            page = cache.k[layer].shape[1]
            where = (page_table[jnp.arange(k.shape[0]), pos // page], pos % page)  # (page, offset)
        put = lambda dst, x: _set_rows(dst, where, x)  # noqa: E731
        # scales [B or P, Hkv, T or page]: (row, :, col) selects [B, Hkv]
        put_scale = lambda dst, x: dst.at[where[0], :, where[1]].set(x)  # noqa: E731
    cache.k[layer], cache.v[layer] = put(cache.k[layer], k), put(cache.v[layer], v)
    if cache.quantized:
        cache.k_scale[layer] = put_scale(cache.k_scale[layer], ks)
        cache.v_scale[layer] = put_scale(cache.v_scale[layer], vs)
    return cache


def gather_pages(cache: KVCache, layer: int, page_table, window: Optional[int] = None):
    """A paged layer as the contiguous per-slot layout ([B, T, Hkv, D], scales [B, Hkv, T]),
    copied through page_table [B, W]; only the first `window` positions' pages if given.
    For the XLA and cuDNN paths, which read dense arrays (the Pallas kernel reads pages)."""
    page = cache.k[layer].shape[1]
    w = page_table.shape[1] if window is None else min(-(-window // page), page_table.shape[1])
    pt = page_table[:, :w]
    b = pt.shape[0]
    dense = lambda x: x[pt].reshape(b, w * page, *x.shape[2:])
    k, v = dense(cache.k[layer]), dense(cache.v[layer])
    if not cache.quantized:
        return KVCache([k], [v])
    scales = lambda x: x[pt].transpose(0, 2, 1, 3).reshape(b, x.shape[1], w * page)
    return KVCache([k], [v], [scales(cache.k_scale[layer])], [scales(cache.v_scale[layer])])


def cached_prefix_layer(cache: KVCache, layer: int, pages, dtype):
    """One layer's cached prompt positions (prefix caching) as dense K/V [N, C, Hkv, D] in
    `dtype`, read through pages [N, C / page] (dequantized from an int8 cache)."""
    g = gather_pages(cache, layer, pages)
    k, v = g.k[0], g.v[0]
    if g.quantized:  # scales [N, Hkv, C] -> [N, C, Hkv, 1]
        k = k.astype(jnp.float32) * jnp.swapaxes(g.k_scale[0], 1, 2)[..., None]
        v = v.astype(jnp.float32) * jnp.swapaxes(g.v_scale[0], 1, 2)[..., None]
    return k.astype(dtype), v.astype(dtype)


def _softcap(s, cap):
    return s if cap is None else cap * jnp.tanh(s / cap)


def decode_attention(q, cache: KVCache, layer: int, pos, scale: float, impl: str = "xla",
                     window: Optional[int] = None, softcap: Optional[float] = None,
                     sliding_window: Optional[int] = None, page_table=None, kernel: tuple = (),
                     mesh=None):
    """One query per slot (q: [B, H, D]) against that slot's cache positions [0, pos].

    `window` (static) bounds what the XLA path reads: only cache[:, :window], which the caller
    guarantees covers every live slot's positions (the masked einsum cannot skip unfilled blocks).
    `page_table` [B, W]: the cache is paged (see insert_prefix_paged).
    `kernel`: (key, value) settings of the Pallas kernel (EngineConfig.decode_kernel).
    `mesh`: the tensor-parallel mesh the Pallas kernel runs on per device (None: one call).
    """
    if impl != "xla" and (softcap is not None or sliding_window is not None):
        raise ValueError(f"{impl} decode attention has no soft-cap or sliding window; use 'xla'")
    if impl == "pallas":  # reads only each slot's filled blocks; int8 or unquantized cache
        return _pallas_decode(q, cache, layer, pos, scale, page_table, dict(kernel), mesh)
    if cache.chunked:  # engine/kv_chunks.py: the blocks below the window, each read in place
        ks, vs = cache.k[layer], cache.v[layer]
        n = blocks_below(ks, window)
        b, hkv, _, d = ks[0].shape
        scales = lambda xs: None if xs is None else xs[layer][:n]  # noqa: E731
        s = block_scores(q.reshape(b, hkv, -1, d), ks[:n], scales(cache.k_scale))
        p = masked_probabilities(s, pos, scale, softcap, sliding_window)
        return block_values(p, vs[:n], scales(cache.v_scale), q.dtype).reshape(q.shape).astype(q.dtype)
    if page_table is not None:
        cache, layer = gather_pages(cache, layer, page_table, window), 0
    k, v = cache.k[layer], cache.v[layer]
    b, t, hkv, d = k.shape
    h = q.shape[1]
    if impl == "cudnn" and not cache.quantized:
        out = jax.nn.dot_product_attention(
            q[:, None], k, v, scale=scale, implementation="cudnn",
            query_seq_lengths=jnp.ones((b,), jnp.int32), key_value_seq_lengths=pos + 1)
        return out[:, 0]
    if window is not None and window < t:
        t = window
        k, v = k[:, :t], v[:, :t]
    qg = q.reshape(b, hkv, h // hkv, d)
    s = jnp.einsum("bhgd,bthd->bhgt", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    if cache.quantized:
        s = s * cache.k_scale[layer][:, :, None, :t]
    p = masked_probabilities(s, pos, scale, softcap, sliding_window)
    if cache.quantized:
        p = p * cache.v_scale[layer][:, :, None, :t]
    out = jnp.einsum("bhgt,bthd->bhgd", p.astype(q.dtype), v.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, h, d).astype(q.dtype)


def masked_probabilities(s, pos, scale: float, softcap, sliding_window):
    """Softmax over positions of raw scores s [B, Hkv, G, T], masked to each slot's [0, pos]
    (Gemma 2 local layers: its last sliding_window positions)."""
    t = s.shape[-1]
    s = _softcap(s * scale, softcap)
    mask = jnp.arange(t)[None, :] <= pos[:, None]  # [B, T]
    if sliding_window is not None:
        mask &= jnp.arange(t)[None, :] > pos[:, None] - sliding_window
    return jax.nn.softmax(jnp.where(mask[:, None, None, :], s, NEG_INF), axis=-1)


def _pallas_decode(q, cache: KVCache, layer: int, pos, scale: float, page_table, kernel: dict, mesh=None):
    """Our ragged Pallas kernel on one layer. Under tensor parallelism (`mesh`, given by the
    engine) XLA cannot split a custom kernel, so each device runs it on its own query and KV
    heads through shard_map: the cache never moves between devices."""
    from engine.kernels.ragged_decode import ragged_decode_attention
    quantized = cache.quantized
    paged = page_table is not None
    # The Triton kernel compiles only for GPUs; elsewhere Pallas interprets it (tests).
    interpret = jax.default_backend() != "gpu"

    def attend(q, k, v, lengths, *rest):
        ks, vs = rest[:2] if quantized else (None, None)
        pt = rest[-1] if paged else None
        return ragged_decode_attention(q, k, v, ks, vs, lengths, scale, page_table=pt, **kernel,
                                       interpret=interpret)

    args = [q, cache.k[layer], cache.v[layer], pos + 1]
    if quantized:
        args += [cache.k_scale[layer], cache.v_scale[layer]]
    if paged:
        args.append(page_table)
    if mesh is None:
        return attend(*args)
    from jax.sharding import PartitionSpec as P
    axis = mesh.axis_names[0]  # the heads axis (engine/sharding.py)
    heads, kv = P(None, axis, None), P(None, None, axis, None)
    specs = [heads, kv, kv, P()] + ([P(None, axis, None)] * 2 if quantized else []) + ([P()] if paged else [])
    return _shard_map(attend, mesh, tuple(specs), heads)(*args)


def _shard_map(f, mesh, in_specs, out_specs):
    """jax.shard_map (JAX >= 0.7), or its experimental home on older versions."""
    try:
        from jax import shard_map
        return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except ImportError:
        from jax.experimental.shard_map import shard_map
        return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def prefill_attention_cached(q, k, v, ck, cv, ctx_len, scale: float, softcap: Optional[float] = None,
                             sliding_window: Optional[int] = None):
    """Causal attention of prompt suffixes that follow cached positions (prefix caching):
    q [N,S,H,D], k/v [N,S,Hkv,D] at positions ctx_len[n] + i, after cached ck/cv [N,C,Hkv,D]
    whose first ctx_len[n] positions are real."""
    n, s, h, d = q.shape
    c, hkv = ck.shape[1], k.shape[2]
    keys, vals = jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1)
    qg = q.reshape(n, s, hkv, h // hkv, d)
    sc = _softcap(jnp.einsum("nshgd,nthd->nhgst", qg, keys, preferred_element_type=jnp.float32) * scale, softcap)
    qpos = ctx_len[:, None] + jnp.arange(s)[None]  # [N, S]
    kpos = jnp.concatenate([jnp.broadcast_to(jnp.arange(c), (n, c)), qpos], 1)  # [N, C + S]
    real = jnp.concatenate([jnp.arange(c)[None] < ctx_len[:, None], jnp.ones((n, s), bool)], 1)
    mask = real[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])  # [N, S, C + S]
    if sliding_window is not None:
        mask &= kpos[:, None, :] > qpos[:, :, None] - sliding_window
    sc = jnp.where(mask[:, None, None], sc, NEG_INF)
    p = jax.nn.softmax(sc, axis=-1)
    out = jnp.einsum("nhgst,nthd->nshgd", p.astype(q.dtype), vals, preferred_element_type=jnp.float32)
    return out.reshape(n, s, h, d).astype(q.dtype)


def prefill_attention(q, k, v, scale: float, impl: str = "xla", softcap: Optional[float] = None,
                      sliding_window: Optional[int] = None):
    """Causal self-attention over a right-padded prompt batch: q [N,S,H,D], k/v [N,S,Hkv,D]."""
    if impl == "cudnn" and softcap is None and sliding_window is None:
        # flash attention; padding sits after the real tokens, so causal suffices
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
    n, s, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(n, s, hkv, h // hkv, d)
    sc = _softcap(jnp.einsum("nshgd,nthd->nhgst", qg, k, preferred_element_type=jnp.float32) * scale, softcap)
    causal = jnp.tril(jnp.ones((s, s), bool))
    if sliding_window is not None:
        causal &= ~jnp.tril(jnp.ones((s, s), bool), -sliding_window)
    sc = jnp.where(causal, sc, NEG_INF)
    p = jax.nn.softmax(sc, axis=-1)
    out = jnp.einsum("nhgst,nthd->nshgd", p.astype(q.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(n, s, h, d).astype(q.dtype)
