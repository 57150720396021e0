"""The chunked KV cache: on one CPU device (EngineConfig.kv_layout), each layer's K and V are a
tuple of blocks of CHUNK positions, [slots, kv_heads, CHUNK, head_dim] (int8 scales [slots,
kv_heads, CHUNK]), instead of one [slots, T, kv_heads, head_dim] array.

Why: XLA's CPU dots batch over (slot, head) only when those lead the operand's layout, so the
token-major layout makes every decode step copy its cache window heads-major, and slicing a
window off one heads-major array copies too; whole blocks are read in place. Blocks are
allocated as the longest sequence reaches them (split_layers), and each program is
handed only the blocks below its window, so memory follows the sequences served, not
max_cache_length (JaxEngine._blocks). These are the per-layer block operations; engine/kv_cache.py
dispatches to them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

CHUNK = 128  # positions per block: the smallest decode window


def chunk_sizes(length: int) -> list:
    """Block lengths of a chunked cache of `length` positions (the last one may be shorter)."""
    return [min(CHUNK, length - start) for start in range(0, length, CHUNK)]


def new_blocks(slots: int, kv_heads: int, sizes: list, tail: tuple, dtype, fill: float = 0.0,
               sharding=None) -> tuple:
    """Blocks of the given position counts, [slots, kv_heads, size, *tail], all `fill` (placed
    with `sharding` when given)."""
    return tuple(jnp.full((slots, kv_heads, c) + tail, fill, dtype, device=sharding) for c in sizes)


def block_like(like, size: int, fill: float):
    """A block shaped and placed like `like` with `size` positions, all `fill` (an abstract one
    for an abstract `like`, as lowering passes). The same sharding as the blocks before it:
    an unplaced block would make the next program a second compile of the same shapes."""
    if isinstance(like, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(like.shape[:2] + (size,) + like.shape[3:], like.dtype)
    return new_blocks(like.shape[0], like.shape[1], [size], like.shape[3:], like.dtype, fill,
                      sharding=like.sharding)[0]


def split_layers(layers: Optional[list], n: int, length: int, fill: float = 0.0):
    """(each layer's first n blocks, the blocks after them) of one field of a chunked cache of
    `length` positions (K, V or a scale; None stays None). Blocks not allocated yet (a cache
    starts with one) are added, all `fill`: memory grows with the longest sequence served, and a
    program gets only the blocks it reads or writes, so its shapes do not depend on how many exist."""
    if layers is None:
        return None, None
    sizes, head, tail = chunk_sizes(length), [], []
    for blocks in layers:
        blocks = tuple(blocks) + tuple(block_like(blocks[0], sizes[i], fill) for i in range(len(blocks), n))
        head.append(blocks[:n])
        tail.append(blocks[n:])
    return head, tail


def join_layers(head: Optional[list], tail: Optional[list]) -> Optional[list]:
    """split_layers undone."""
    return None if head is None else [a + b for a, b in zip(head, tail)]


def put_chunks(blocks: tuple, src, slots) -> tuple:
    """Positions [0, S) of src [N, Hkv, S, ...] into rows `slots` of a chunked layer's blocks."""
    out, start = [], 0
    for block in blocks:
        part = src[:, :, start:start + block.shape[2]]
        if part.shape[2]:
            block = block.at[slots, :, :part.shape[2]].set(part.astype(block.dtype), mode="drop")
        out.append(block)
        start += block.shape[2]
    return tuple(out)


def write_chunks(blocks: tuple, val, pos, window: Optional[int]) -> tuple:
    """val [B, Hkv, ...] at position pos [B] of each slot in a chunked layer's blocks; blocks at
    or past `window` (which covers every live slot's position) are left alone."""
    out, start, rows = [], 0, jnp.arange(val.shape[0])
    for block in blocks:
        size = block.shape[2]
        if window is None or start < window:
            off = jnp.where((pos >= start) & (pos < start + size), pos - start, size)  # size: dropped
            block = block.at[rows, :, off].set(val.astype(block.dtype), mode="drop")
        out.append(block)
        start += size
    return tuple(out)


def blocks_below(blocks: tuple, window: Optional[int]) -> int:
    """How many of a layer's blocks hold positions below `window` (None: all)."""
    return len(blocks) if window is None else min(len(blocks), -(-window // CHUNK))


def block_scores(qg, ks: tuple, k_scales: Optional[tuple]):
    """Raw scores [B, Hkv, G, T] of grouped queries qg [B, Hkv, G, D] against blocks ks (int8
    blocks times their scales), each block read in place by its own dot."""
    parts = []
    for i, k in enumerate(ks):
        s = jnp.einsum("bhgd,bhtd->bhgt", qg, k.astype(qg.dtype), preferred_element_type=jnp.float32)
        parts.append(s if k_scales is None else s * k_scales[i][:, :, None, :])
    return jnp.concatenate(parts, axis=-1)


def block_values(p, vs: tuple, v_scales: Optional[tuple], dtype):
    """Probabilities p [B, Hkv, G, T] times the value blocks vs: [B, Hkv, G, D] in float32."""
    out, start = 0, 0
    for i, v in enumerate(vs):
        size = v.shape[2]
        pi = p[..., start:start + size]
        if v_scales is not None:
            pi = pi * v_scales[i][:, :, None, :]
        out = out + jnp.einsum("bhgt,bhtd->bhgd", pi.astype(dtype), v.astype(dtype),
                               preferred_element_type=jnp.float32)
        start += size
    return out
