"""Ragged decode attention in Pallas (Triton backend): reads only each slot's filled cache blocks.

One query token per slot. q [B, H, D]; the cache of one layer K, V [B, T, Hkv, D] (int8 or fp8
e4m3 with float32 scales [B, Hkv, T], real value = element * scale; or a 16/32-bit cache without
scales);
lengths [B] int32: slot b attends to positions [0, lengths[b]). GQA: H = Hkv * G and query head
h reads kv head h // G.

Grid (Hkv / heads, B, S). Each program owns one slot and `heads` kv heads (default 1; more only
for the "fma" method with G=1) with their query heads, and loops over block_t-token blocks of
its chunk of T (S = num_splits chunks, flash-decoding; default S=1, the whole T) with a trip
count that depends on lengths[b]: blocks past the filled length are never loaded. K/V keep the
engine's [B, T, Hkv, D] layout: the BlockSpec (None, Tc, None, D) hands the kernel a strided
[Tc, D] view of (b, chunk, hkv) and the loop loads [block_t, D] rows from it with a dynamic
start (one contiguous D-element row per token, rows Hkv*D apart; heads*D elements with
`heads` > 1).
The scales are read as a contiguous [Tc] run per (slot, kv head). (A [B, T, Hkv] layout made
each 4-byte scale load pull its own 32-byte sector.) The kv-head axis is grid axis 0 (the
fastest-varying CUDA program id), so programs running together read neighbouring rows of the
same slot.

Paged caches (page_table given): K/V are a pool of pages [P, page, Hkv, D] (scales
[P, Hkv, page]) shared by all slots, and page_table [B, W] names slot b's page for positions
[j*page, (j+1)*page). The kernel takes the whole pool as one block and loads each block's rows
from page page_table[b, j] (block_t divides page, so a block never straddles pages). The next
block's page index is loaded one loop iteration ahead. Paged and contiguous caches give
bit-identical outputs.

Two ways to compute the G query rows against a block (`method`):
- "fma": each query row separately, scores = sum(k * q_g, axis=1) and out += sum(p[:, None] * v,
  axis=0), in float32 on the CUDA cores. No tensor-core shape rules: any G, the G rows unrolled
  in Python; "auto" uses it for G=1 (MHA: Llama-2-7B, Gemma-7B).
- "dot": tensor-core dots, q padded with zero rows to Gp = max(16, next power of 2 >= G)
  (Triton's dot needs M >= 16), int8 converted to q's dtype (exact for bf16), probabilities
  cast to q's dtype for p @ v like the XLA path.
- "mma8" (8-bit caches only): tensor-core dots in the cache's own 8-bit type, int8 x int8 ->
  int32 or fp8 x fp8 -> float32, so no K/V element is converted at all; q and the probabilities
  are quantized per row instead, as two 8-bit terms each (`terms`, engine/kernels/mma8.py).
- "mma8k" (8-bit caches only): the score dot as "mma8", the output dot as "fma"
  (engine/kernels/mma8.py).
- "dp4a" (int8 caches only): scores by 4-way int8 dot-product instructions against the query
  quantized once, the output dot as "fma" (engine/kernels/dp4a.py).
"auto" picks "fma" for G=1 and "dot" for G >= 2, where the tensor cores win (BENCHMARKS.md).

Settings (engine/kernels/settings.py) come as keyword arguments; the engine passes its
`decode_kernel` setting, e.g. "block_t=32,method=dot,num_splits=2,num_warps=8,num_stages=3,
mask_loads=1,convert=cvt". `convert` picks how the "fma" method turns int8 into float32:
"prmt" (the default: the float bits of 2**23 + 128 + x built by one byte-permute per element in
inline PTX), "magic" (the same bits by an integer add) or "cvt" (a plain convert, the slowest).
All three are exact. An fp8 cache is always converted plainly (Hopper and Ada convert e4m3 in
hardware). Block size and warps by shape (settings.warps_for) are the fastest of the sweeps
in BENCHMARKS.md.

Works with jax 0.10 (CPU: interpret=True only) and 0.11 (GPU: Triton). The Triton backend is
chosen explicitly via triton CompilerParams: newer jax lowers pallas_call on GPU to Mosaic GPU
by default, which this kernel is not written for.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from engine.kernels.dp4a import MAX_DOT, dp4a_attend
from engine.kernels.int8_convert import int8_to_f32
from engine.kernels.fma_heads import fma_heads_attend
from engine.kernels.mma8 import mma8_attend, mma8k_attend
from engine.kernels.online_softmax import NEG_INF, row_update, run_and_store, run_rows_and_store
from engine.kernels.settings import TENSOR_CORE_METHODS, block_for, resolve, warps_for

try:  # pallas.triton in current jax; pallas.gpu in older releases
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    from jax.experimental.pallas import gpu as plgpu

# A squeezed block dimension: pl.squeezed in newer jax, None (its older spelling) otherwise.
_SQ = getattr(pl, "squeezed", None)


def _compiler_params(num_warps: int, num_stages: int):
    for name in ("CompilerParams", "TritonCompilerParams"):
        cls = getattr(plgpu, name, None)
        if cls is not None:
            return cls(num_warps=num_warps, num_stages=num_stages)
    return None


def _multiple_of(x, m):
    f = getattr(pl, "multiple_of", None)
    return f(x, m) if f is not None else x


def _load(ref, mask, other):
    """A masked load: plgpu.load in new jax, pl.load in old."""
    fn = getattr(plgpu, "load", None) or getattr(pl, "load")
    return fn(ref, mask=mask, other=other)


def _kernel(len_ref, *refs, block_t: int, chunk: int, g: int, scale: float, quantized: bool,
            method: str, split: bool, mask_loads: bool, convert: str, interpret: bool,
            page: int = 0, terms: int = 2, heads: int = 1, v_dt: bool = False):
    if page:
        pt_ref, q_ref, k_ref, v_ref, *rest = refs
    else:
        pt_ref = None
        q_ref, k_ref, v_ref, *rest = refs
    if quantized:
        ks_ref, vs_ref, *outs = rest
    else:
        ks_ref = vs_ref = None
        outs = list(rest)
    o_ref = outs[0]
    d = k_ref.shape[-1]
    s_idx = pl.program_id(2)
    hi = pl.program_id(0)  # kv head, or block of `heads` (read here: interpret mode has no
    # program_id inside loops)
    chunk_start = s_idx * chunk
    length = len_ref[()]
    # Valid tokens of this chunk: [chunk_start, min(length, chunk_start + chunk)).
    n_valid = jnp.minimum(jnp.maximum(length - chunk_start, 0), chunk)
    n_blocks = lax.div(n_valid + (block_t - 1), jnp.int32(block_t))
    iota = lax.broadcasted_iota(jnp.int32, (block_t,), 0)

    def index(start, two_d, pg):
        """Where a block of block_t tokens at chunk-local `start` lives in a K/V (two_d) or
        scale ref: rows of this (slot, kv head)'s view, or, paged, of page `pg`."""
        rows = pl.ds(start, block_t)
        if not page:
            if heads > 1:  # K/V views [Tc, heads, D], scales [heads, Tc]
                return (rows, slice(None), slice(None)) if two_d else (slice(None), rows)
            return (rows, slice(None)) if two_d else (rows,)
        off = _multiple_of(lax.rem(chunk_start + start, jnp.int32(page)), block_t)
        hd = pl.ds(hi * heads, heads) if heads > 1 else hi
        return (pg, pl.ds(off, block_t), hd, slice(None)) if two_d else (pg, hd, pl.ds(off, block_t))

    def page_of(i):  # the page holding block i (clamped: the loop reads one entry ahead)
        j = lax.div(chunk_start + i * block_t, jnp.int32(page))
        return pt_ref[jnp.minimum(j, pt_ref.shape[0] - 1)]

    def loop(step, init):
        """fori_loop over the slot's filled blocks. Paged, the carry also holds the next block's
        page, loaded one iteration early: its load then overlaps this block's K/V loads instead
        of delaying them (the K/V addresses depend on it)."""
        if not page:
            return lax.fori_loop(0, n_blocks, lambda i, c: step(i, c, None), init)

        def body(i, carry):
            c, pg = carry
            nxt = page_of(i + 1)
            return step(i, c, pg), nxt

        return lax.fori_loop(0, n_blocks, body, (init, page_of(0)))[0]

    def load_block(ref, start, valid, two_d, pg):
        idx = index(start, two_d, pg)
        if not mask_loads:
            return ref[idx]
        if heads > 1:
            m = (jnp.broadcast_to(valid[:, None, None], (block_t, heads, d)) if two_d
                 else jnp.broadcast_to(valid[None, :], (heads, block_t)))
        else:
            m = jnp.broadcast_to(valid[:, None], (block_t, d)) if two_d else valid
        # a float zero for float refs: Triton casts no integer constant to fp8
        return _load(ref.at[idx], mask=m, other=0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0)

    def load_vt(start, valid, pg):
        """A [D, block_t] block of a V stored token-minor (v_layout "dt")."""
        if page:
            off = _multiple_of(lax.rem(chunk_start + start, jnp.int32(page)), block_t)
            idx = (pg, hi, slice(None), pl.ds(off, block_t))
        else:
            idx = (slice(None), pl.ds(start, block_t))
        if not mask_loads:
            return v_ref[idx]
        return _load(v_ref.at[idx], mask=jnp.broadcast_to(valid[None, :], (d, block_t)), other=0)

    def block(i, pg):
        start = _multiple_of(i * block_t, block_t)
        valid = (start + iota) < n_valid  # chunk-local positions
        k = load_block(k_ref, start, valid, True, pg)
        v = load_vt(start, valid, pg) if v_dt else load_block(v_ref, start, valid, True, pg)
        ks = load_block(ks_ref, start, valid, False, pg) if quantized else None
        vs = load_block(vs_ref, start, valid, False, pg) if quantized else None
        return valid, k, v, ks, vs

    if heads > 1:
        fma_heads_attend(q_ref, o_ref, outs, loop, block, scale=scale, split=split, convert=convert,
                         interpret=interpret, quantized=quantized)
        return

    if method == "fma":
        qs = [q_ref[j, :].astype(jnp.float32) * scale for j in range(g)]  # [D] each

        def body(i, carry, pg):
            valid, k, v, ks, vs = block(i, pg)
            k = int8_to_f32(k, convert, interpret)
            v = int8_to_f32(v, convert, interpret)
            rows = []
            for j, state in enumerate(zip(*carry)):
                s = jnp.sum(k * qs[j][None, :], axis=1)  # [block_t]
                if quantized:
                    s = s * ks
                rows.append(row_update(*state, jnp.where(valid, s, NEG_INF), valid, v, vs))
            return tuple(zip(*rows))

        run_rows_and_store(loop, body, g, d, o_ref, outs, split)
        return

    if method == "mma8":
        mma8_attend(q_ref, k_ref, o_ref, outs, loop, block, scale=scale, split=split, terms=terms)
        return
    if method == "dp4a":
        dp4a_attend(q_ref, o_ref, outs, loop, block, g=g, scale=scale, split=split, convert=convert,
                    interpret=interpret, v_dt=v_dt)
        return
    if method == "mma8k":
        mma8k_attend(q_ref, k_ref, o_ref, outs, loop, block, g=g, scale=scale, split=split, terms=terms,
                     convert=convert, interpret=interpret)
        return

    # method == "dot": q_ref holds Gp >= 16 rows (zero-padded past g).
    gp = q_ref.shape[0]
    q = q_ref[...]
    cdt = q.dtype
    prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None

    def body(i, carry, pg):
        m, l, acc = carry
        valid, k, v, ks, vs = block(i, pg)
        s = lax.dot_general(q, k.astype(cdt), (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32)  # [Gp, block_t]
        if quantized:
            s = s * ks[None, :]
        s = jnp.where(valid[None, :], s * scale, NEG_INF)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        pv = p * vs[None, :] if quantized else p
        pv = jnp.where(valid[None, :], pv, 0.0)
        o = lax.dot_general(pv.astype(cdt), v.astype(cdt), (((1,), (0,)), ((), ())),
                            precision=prec, preferred_element_type=jnp.float32)  # [Gp, D]
        return m_next, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + o

    run_and_store(loop, body, gp, d, o_ref, outs, split)


def ragged_decode_attention(q, k, v, k_scale, v_scale, lengths, scale: float, *,
                            page_table=None,
                            block_t: Optional[int] = None, method: Optional[str] = None,
                            num_splits: Optional[int] = None, num_warps: Optional[int] = None,
                            num_stages: Optional[int] = None, mask_loads: Optional[bool] = None,
                            convert: Optional[str] = None, terms: Optional[int] = None,
                            heads: Optional[int] = None, v_layout: str = "td",
                            interpret: bool = False):
    """Attention of q [B, H, D] over cache positions [0, lengths[b]) of K/V [B, T, Hkv, D].

    k_scale/v_scale: [B, Hkv, T] float32 for an int8 cache, or None for an unquantized one.
    Returns [B, H, D] in q's dtype. Lengths are clipped to [0, T]; a slot of length 0 gets zeros.
    page_table: a paged cache. K/V are then pages [P, page, Hkv, D] (scales [P, Hkv, page])
    and page_table [B, W] int32 names the page holding each slot's positions
    [j*page, (j+1)*page): T = W * page. Blocks never straddle pages (block_t <= page).
    mask_loads: predicate the K/V/scale loads on position < length, so the rows of the last
    block past the length are not read either (otherwise they are read and masked in the
    scores); always on when block_t does not divide the chunk length.
    convert: how the "fma" method turns int8 into float32 ("magic" or "cvt"; both exact).
    heads: kv heads per program for the "fma" method with G=1 (each token's rows of those heads
    are contiguous in the cache, so a program reads heads*D bytes per token instead of D).
    terms: 8-bit terms per quantized operand of the "mma8" and "mma8k" methods (1 or 2;
    engine/kernels/mma8.py).
    v_layout: "td" (V as K, [.., T, Hkv, D]) or "dt" (V token-minor: [B, Hkv, D, T], paged
    [P, Hkv, D, page]; the "dp4a" method only, whose output dot then runs on dp4a as well).
    """
    cfg = resolve(block_t=block_t, method=method, num_splits=num_splits, num_warps=num_warps,
                  num_stages=num_stages, mask_loads=mask_loads, convert=convert, terms=terms,
                  heads=heads)
    if cfg["convert"] not in ("cvt", "magic", "prmt"):
        raise ValueError(f"convert must be 'cvt', 'magic' or 'prmt', not {cfg['convert']!r}")
    b, h, d = q.shape
    if page_table is not None:
        _, page, hkv, _ = k.shape
        t = page_table.shape[1] * page
    else:
        page = 0
        _, t, hkv, _ = k.shape
    if h % hkv:
        raise ValueError(f"{h} query heads do not divide into {hkv} kv heads")
    g = h // hkv
    quantized = k_scale is not None
    method = cfg["method"]
    if method == "auto":  # tensor cores pay once a kv head serves two or more query heads
        method = "dot" if g >= 2 else "fma"
    if method not in ("fma", "dot", "mma8", "mma8k", "dp4a"):
        raise ValueError(f"method must be 'auto', 'fma', 'dot', 'mma8', 'mma8k' or 'dp4a', not {method!r}")
    if int(cfg["terms"]) not in (1, 2):
        raise ValueError(f"terms must be 1 or 2, not {cfg['terms']}")
    if method in ("mma8", "mma8k") and not quantized:
        raise ValueError(f"method '{method}' reads an 8-bit cache (int8 or fp8 with scales)")
    if method == "dp4a" and (k.dtype != jnp.int8 or d > MAX_DOT):
        raise ValueError(f"method 'dp4a' reads an int8 cache with heads of at most {MAX_DOT}")
    v_dt = v_layout == "dt"
    if v_layout not in ("td", "dt") or (v_dt and method != "dp4a"):
        raise ValueError(f"v_layout {v_layout!r}: 'td', or 'dt' with the dp4a method")
    splits = max(1, int(cfg["num_splits"]))
    if t % splits:
        raise ValueError(f"num_splits={splits} does not divide the cache length {t}")
    chunk = t // splits
    if page and chunk % page:
        raise ValueError(f"num_splits={splits} must split the {t}-token page table on page edges")
    bt = block_for(chunk, min(cfg["block_t"], page) if page else cfg["block_t"], method)
    num_warps = int(cfg["num_warps"]) or warps_for(method, g, d)
    if v_dt and bt > MAX_DOT:
        raise ValueError(f"v_layout 'dt' takes blocks of at most {MAX_DOT} tokens, not {bt}")
    if page and page % bt:
        raise ValueError(f"page size {page} is not a multiple of a {bt}-token block")
    # Loads may stay unmasked when blocks tile the chunk exactly (positions past the length
    # are masked in the scores instead); otherwise the last block would run past the array.
    mask_loads = bool(cfg["mask_loads"]) or chunk % bt != 0
    split = splits > 1

    heads = max(1, int(cfg["heads"]))
    if heads > 1 and (method != "fma" or g != 1 or hkv % heads):
        raise ValueError(f"heads={heads} (kv heads per program) needs the fma method, one query "
                         f"head per kv head and a divisor of the {hkv} kv heads")
    hd = heads if heads > 1 else _SQ  # the kv-head extent of a program's blocks
    qg = q.reshape(b, hkv, g, d)
    gq = g
    if method in TENSOR_CORE_METHODS:
        gq = max(16, 1 << (g - 1).bit_length())
        if gq != g:
            qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gq - g), (0, 0)))
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)

    if page:  # the kernel indexes the whole page pool itself, through its slot's table row
        kv_spec = pl.BlockSpec(k.shape, lambda hi, bi, si: (0, 0, 0, 0))
        sc_spec = pl.BlockSpec((k.shape[0], hkv, page), lambda hi, bi, si: (0, 0, 0))
    else:
        kv_spec = pl.BlockSpec((_SQ, chunk, hd, d), lambda hi, bi, si: (bi, si, hi, 0))
        sc_spec = pl.BlockSpec((_SQ, hd, chunk), lambda hi, bi, si: (bi, hi, si))
    in_specs = [pl.BlockSpec((_SQ,), lambda hi, bi, si: (bi,))]
    args = [lengths]
    if page:
        in_specs.append(pl.BlockSpec((_SQ, page_table.shape[1]), lambda hi, bi, si: (bi, 0)))
        args.append(page_table.astype(jnp.int32))
    v_spec = kv_spec
    if v_dt:
        v_spec = (pl.BlockSpec(v.shape, lambda hi, bi, si: (0, 0, 0, 0)) if page else
                  pl.BlockSpec((_SQ, _SQ, d, chunk), lambda hi, bi, si: (bi, hi, 0, si)))
    in_specs += [pl.BlockSpec((_SQ, hd, gq, d), lambda hi, bi, si: (bi, hi, 0, 0)), kv_spec, v_spec]
    args += [qg, k, v]
    if quantized:
        in_specs += [sc_spec, sc_spec]
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    if split:
        out_shape = [jax.ShapeDtypeStruct((b, hkv, splits, gq, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, hkv, splits, gq), jnp.float32),
                     jax.ShapeDtypeStruct((b, hkv, splits, gq), jnp.float32)]
        out_specs = [pl.BlockSpec((_SQ, hd, _SQ, gq, d), lambda hi, bi, si: (bi, hi, si, 0, 0)),
                     pl.BlockSpec((_SQ, hd, _SQ, gq), lambda hi, bi, si: (bi, hi, si, 0)),
                     pl.BlockSpec((_SQ, hd, _SQ, gq), lambda hi, bi, si: (bi, hi, si, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((b, hkv, gq, d), q.dtype)]
        out_specs = [pl.BlockSpec((_SQ, hd, gq, d), lambda hi, bi, si: (bi, hi, 0, 0))]

    kernel = functools.partial(_kernel, block_t=bt, chunk=chunk, g=g, scale=float(scale),
                               quantized=quantized, method=method, split=split,
                               mask_loads=mask_loads, convert=cfg["convert"], interpret=interpret,
                               page=page, terms=int(cfg["terms"]), heads=heads, v_dt=v_dt)
    kwargs = {}
    params = _compiler_params(num_warps, int(cfg["num_stages"]))
    if params is not None:
        kwargs["compiler_params"] = params
    outs = pl.pallas_call(
        kernel, grid=(hkv // heads, b, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name="ragged_decode_attention", **kwargs,
    )(*args)

    if split:
        o, m, l = outs  # [B, Hkv, S, Gq, D], [B, Hkv, S, Gq] x2
        m_all = jnp.max(m, axis=2, keepdims=True)
        w = jnp.exp(m - m_all)  # splits with no tokens have m = NEG_INF: weight 0
        o = jnp.sum(o * w[..., None], axis=2) / jnp.maximum(jnp.sum(l * w, axis=2), 1e-30)[..., None]
        o = o.astype(q.dtype)
    else:
        o = outs[0]
    return o[:, :, :g].reshape(b, h, d)
