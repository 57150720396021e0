"""The ragged decode kernel's "dp4a" method: int8 dots by 4-way integer dot-product instructions.

The "fma" method spends about three CUDA-core instructions on every int8 K element (convert,
subtract, multiply-add). Here the slot's query rows are quantized to int8 once per program and
each K block is multiplied as stored: one `dp4a` instruction (four int8 x int8 products summed
into an int32) per four elements per query term. p @ V runs as in "fma", or, with V stored
token-minor (v_layout "dt": each (kv head, d) holds its tokens contiguously), on dp4a as well,
against each block's p * v_scale quantized the same way.

Each quantized vector is two int8 terms with a fixed ratio, x ~ (254 * hi + lo) * scale, about
15 bits: for dots of up to 256 elements the exact integer sum, at most 256 * 127 * 127 * 255,
fits in int32. An int8 cache only (there is no fp8 dot product on the CUDA cores).
engine/kernels/ragged_decode.py owns the grid, the loads and the masks; this module the math.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.kernels.int8_convert import int8_to_f32
from engine.kernels.online_softmax import NEG_INF, row_update, run_rows_and_store

try:  # pallas.triton in current jax; pallas.gpu in older releases
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    from jax.experimental.pallas import gpu as plgpu

LO_RATIO = 254  # hi carries round(x), lo round((x - hi) * 254): both within [-127, 127]
MAX_DOT = 256  # the longest dot whose integer sum cannot overflow int32

# Four int8 of the cache ($4) against the same four of hi ($5) and lo ($6): the dot's part
# dp4a(x, hi) * 254 + dp4a(x, lo) in $0. $1..$3 are zeros, so that summing the result over the
# dot's axis adds each group of four once, however the elements are grouped in registers.
_DP4A_ASM = """{
.reg .s32 t;
dp4a.s32.s32 t, $4, $5, 0;
mul.lo.s32 t, t, 254;
dp4a.s32.s32 $0, $4, $6, t;
mov.b32 $1, 0;
mov.b32 $2, 0;
mov.b32 $3, 0;
}"""


def two_terms(x):
    """A float vector [N] -> (hi, lo) int8 [N] and its scale with x ~ (254 * hi + lo) * scale."""
    x = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(x)), 1e-30)
    y = x * (127.0 / amax)
    hi = jnp.floor(y + 0.5)
    lo = jnp.floor((y - hi) * LO_RATIO + 0.5)
    return hi.astype(jnp.int8), lo.astype(jnp.int8), amax / (127.0 * LO_RATIO)


def int_dots(x, hi, lo, interpret: bool):
    """sum over the last axis of x * (254 * hi + lo), exactly, as int32 [N]: x [N, M] int8,
    hi/lo [M] int8, M <= MAX_DOT. Interpreted runs (no PTX) multiply in int32."""
    if interpret:
        comb = hi.astype(jnp.int32) * LO_RATIO + lo.astype(jnp.int32)
        return jnp.sum(x.astype(jnp.int32) * comb[None, :], axis=1)
    hb = jnp.broadcast_to(hi[None, :], x.shape)
    lb = jnp.broadcast_to(lo[None, :], x.shape)
    (parts,) = plgpu.elementwise_inline_asm(
        _DP4A_ASM, args=[x, hb, lb], constraints="=r,=r,=r,=r,r,r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])
    return jnp.sum(parts, axis=1)


def _pv_dot_dt(pv, v_dt, interpret: bool):
    """The [D] output of weights pv [block_t] against a V block stored token-minor, [D, block_t]
    int8: pv as two int8 terms, the dot by int_dots."""
    hi, lo, scale = two_terms(pv)
    return int_dots(v_dt, hi, lo, interpret).astype(jnp.float32) * scale


def dp4a_attend(q_ref, o_ref, outs, loop, block, *, g: int, scale: float, split: bool,
                convert: str, interpret: bool, v_dt: bool = False):
    """One program of the "dp4a" method: the slot's g query rows of one kv head, each with its
    online softmax (engine/kernels/online_softmax.py); scores by `int_dots`, V converted as the
    "fma" method converts it, or (v_dt: V blocks [D, block_t]) multiplied by `int_dots` too."""
    rows = [two_terms(q_ref[j, :]) for j in range(g)]  # (hi, lo, scale) per query row
    d = q_ref.shape[-1]
    pv_dot = (lambda pv, vt: _pv_dot_dt(pv, vt, interpret)) if v_dt else None

    def body(i, carry, pg):
        valid, k, v, ks, vs = block(i, pg)
        if not v_dt:
            v = int8_to_f32(v, convert, interpret)
        out = []
        for (h, l, qs), state in zip(rows, zip(*carry)):
            s = int_dots(k, h, l, interpret).astype(jnp.float32) * (ks * (qs * scale))
            out.append(row_update(*state, jnp.where(valid, s, NEG_INF), valid, v, vs, pv_dot))
        return tuple(zip(*out))

    run_rows_and_store(loop, body, g, d, o_ref, outs, split)
