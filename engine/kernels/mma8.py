"""The ragged decode kernel's "mma8" method: attention over an 8-bit cache on 8-bit tensor cores.

Every K/V element stays in the cache's type (int8 or fp8 e4m3): the score dot is q x K and the
output dot p x V, both 8-bit x 8-bit, so the kernel converts no cache element (the "fma" and
"dot" methods convert every one). What is quantized instead is small: the slot's query rows,
once per program, and each block's probabilities. On an H100 at 512 slots it is slower than the
default "fma" method for Llama-2-7B's heads (BENCHMARKS.md, "Decode attention on 8-bit tensor
cores"), so it is an option, never picked by "auto".

"mma8k" splits the two dots: the score dot q x K runs on the 8-bit tensor cores as in "mma8"
(K is the dot's K-major operand as stored, and is never converted), and the output p @ V runs
on the CUDA cores in float32 as in "fma" (V stored [T, D] is the wrong major for an 8-bit
tensor-core operand, so "mma8" has it reshuffled every block). It reads an 8-bit cache only.
engine/kernels/ragged_decode.py owns the grid, the loads and the masks; this module the math.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from engine.kernels.int8_convert import int8_to_f32
from engine.kernels.online_softmax import NEG_INF, row_update, run_and_store, run_rows_and_store



def _to8(x, dtype):
    """float32 already scaled into dtype's range -> int8 (rounded to nearest) or fp8."""
    if dtype == jnp.int8:
        return jnp.floor(x + 0.5).astype(jnp.int8)
    return x.astype(dtype)


def _split8(x, dtype, top: float, terms: int):
    """x (scaled into [-top, top]) as hi + lo * lo_scale, both in dtype, lo_scale per row: with
    terms=2 a second 8-bit term carries the rounding error of the first (about 15 bits in all
    for int8); with terms=1, lo is None."""
    hi = _to8(x, dtype)
    if terms == 1:
        return hi, None, None
    rest = x - hi.astype(jnp.float32)
    rest_amax = jnp.maximum(jnp.max(jnp.abs(rest), axis=1), 1e-30)
    lo = _to8(rest * (top / rest_amax)[:, None], dtype)
    return hi, lo, rest_amax / top


def _score_dot(q_ref, kdt, scale: float, terms: int):
    """The slot's query rows quantized once (a scale per row: the row's absolute maximum over
    the dtype's largest value, `terms` 8-bit terms); returns scores(k, k_scale, valid), the
    [Gp, block_t] float32 scores of a block on the 8-bit tensor cores, masked past the length."""
    top = 127.0 if kdt == jnp.int8 else 448.0
    acc_t = jnp.int32 if kdt == jnp.int8 else jnp.float32
    q = q_ref[...].astype(jnp.float32)
    q_amax = jnp.maximum(jnp.max(jnp.abs(q), axis=1), 1e-30)  # [Gp]; padded rows are zero
    q_hi, q_lo, lo_scale = _split8(q * (top / q_amax)[:, None], kdt, top, terms)
    q_scale = q_amax * (scale / top)
    dims = (((1,), (1,)), ((), ()))

    def scores(k, ks, valid):
        s = lax.dot_general(q_hi, k, dims, preferred_element_type=acc_t).astype(jnp.float32)
        if terms == 2:
            s = s + lax.dot_general(q_lo, k, dims, preferred_element_type=acc_t).astype(
                jnp.float32) * lo_scale[:, None]
        s = s * q_scale[:, None]
        return jnp.where(valid[None, :], s * ks[None, :], NEG_INF)

    return scores


def mma8_attend(q_ref, k_ref, o_ref, outs, loop, block, *, scale: float, split: bool, terms: int):
    """One program of the "mma8" method: (slot, kv head)'s G query rows (padded to Gp) over
    the filled blocks that `loop` and `block` (from ragged_decode._kernel) walk and load.

    q's rows are quantized once (a scale per row: the row's absolute maximum over the dtype's
    largest value), each block's p * v_scale rows the same way before p @ v, each as `terms`
    8-bit terms (`_split8`): one term moves the outputs by about 1% of their size, two by
    about 0.01% for int8 (tests/engine/test_ragged_decode.py). int8 dots accumulate in int32,
    fp8 dots in float32. The tensor cores have room for the second term's dots: a slot's query
    rows fill G of the 16 rows of their smallest tile."""
    kdt = k_ref.dtype
    top = 127.0 if kdt == jnp.int8 else 448.0
    acc_t = jnp.int32 if kdt == jnp.int8 else jnp.float32
    gp, d = q_ref.shape
    scores = _score_dot(q_ref, kdt, scale, terms)

    def body(i, carry, pg):
        m, l, acc = carry
        valid, k, v, ks, vs = block(i, pg)
        s = scores(k, ks, valid)  # [Gp, block_t]
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        pv = jnp.where(valid[None, :], p * vs[None, :], 0.0)
        pv_amax = jnp.maximum(jnp.max(pv, axis=1), 1e-30)  # [Gp]
        pv_hi, pv_lo, pv_lo_scale = _split8(pv * (top / pv_amax)[:, None], kdt, top, terms)
        dims = (((1,), (0,)), ((), ()))
        o = lax.dot_general(pv_hi, v, dims, preferred_element_type=acc_t).astype(jnp.float32)
        if terms == 2:
            o = o + lax.dot_general(pv_lo, v, dims, preferred_element_type=acc_t).astype(
                jnp.float32) * pv_lo_scale[:, None]
        o = o * (pv_amax / top)[:, None]  # [Gp, D]
        return m_next, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + o

    run_and_store(loop, body, gp, d, o_ref, outs, split)


def mma8k_attend(q_ref, k_ref, o_ref, outs, loop, block, *, g: int, scale: float, split: bool, terms: int,
                 convert: str, interpret: bool):
    """One program of the "mma8k" method: scores of the Gp (padded) query rows on the 8-bit
    tensor cores, then for each of the g real rows its online softmax and p @ V in float32 on
    the CUDA cores (V converted as the "fma" method converts it). Rows past g are not stored."""
    scores = _score_dot(q_ref, k_ref.dtype, scale, terms)

    def body(i, carry, pg):
        valid, k, v, ks, vs = block(i, pg)
        s_all = scores(k, ks, valid)  # [Gp, block_t]
        at = lax.broadcasted_iota(jnp.int32, s_all.shape, 0)
        v = int8_to_f32(v, convert, interpret)
        rows = []
        for j, state in enumerate(zip(*carry)):  # row j of s_all, by a masked sum (no slicing of a block value)
            rows.append(row_update(*state, jnp.sum(jnp.where(at == j, s_all, 0.0), axis=0), valid, v, vs))
        return tuple(zip(*rows))

    run_rows_and_store(loop, body, g, k_ref.shape[-1], o_ref, outs, split)
