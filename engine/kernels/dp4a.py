"""The ragged decode kernel's "dp4a" method: int8 scores by 4-way integer dot products.

The "fma" method spends about three CUDA-core instructions on every int8 K element (convert,
subtract, multiply-add). Here the slot's query rows are quantized to int8 once per program and
each K block is multiplied as stored: one `dp4a` instruction (four int8 x int8 products summed
into an int32) per four elements per query term. p @ V stays as "fma" computes it. The query
is kept as two int8 terms with a fixed ratio, q ~ (254 * hi + lo) * q_scale, about 15 bits:
for a head width of up to 256 the exact integer score, at most 256 * 127 * 127 * 255, fits
in int32. An int8 cache only (there is no fp8 dot product on the CUDA cores).
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
MAX_HEAD_DIM = 256  # the widest head whose integer score cannot overflow int32

# Four int8 of K ($4) against the same four of hi ($5) and lo ($6): the score's part
# dp4a(k, hi) * 254 + dp4a(k, lo) in $0. $1..$3 are zeros, so that summing the [block_t, D]
# result over D adds each group of four once, however the elements are grouped in registers.
_DP4A_ASM = """{
.reg .s32 t;
dp4a.s32.s32 t, $4, $5, 0;
mul.lo.s32 t, t, 254;
dp4a.s32.s32 $0, $4, $6, t;
mov.b32 $1, 0;
mov.b32 $2, 0;
mov.b32 $3, 0;
}"""


def quantize_query(q):
    """One query row [D] (float) -> (hi, lo) int8 [D] and its scale with
    q ~ (254 * hi + lo) * scale."""
    q = q.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(q)), 1e-30)
    x = q * (127.0 / amax)
    hi = jnp.floor(x + 0.5)
    lo = jnp.floor((x - hi) * LO_RATIO + 0.5)
    return hi.astype(jnp.int8), lo.astype(jnp.int8), amax / (127.0 * LO_RATIO)


def int_scores(k, hi, lo, interpret: bool):
    """sum over D of k * (254 * hi + lo), exactly, as int32 [block_t]: k [block_t, D] int8,
    hi/lo [D] int8. Interpreted runs (no PTX) multiply in int32."""
    if interpret:
        comb = hi.astype(jnp.int32) * LO_RATIO + lo.astype(jnp.int32)
        return jnp.sum(k.astype(jnp.int32) * comb[None, :], axis=1)
    hb = jnp.broadcast_to(hi[None, :], k.shape)
    lb = jnp.broadcast_to(lo[None, :], k.shape)
    (parts,) = plgpu.elementwise_inline_asm(
        _DP4A_ASM, args=[k, hb, lb], constraints="=r,=r,=r,=r,r,r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(k.shape, jnp.int32)])
    return jnp.sum(parts, axis=1)


def dp4a_attend(q_ref, o_ref, outs, loop, block, *, g: int, scale: float, split: bool,
                convert: str, interpret: bool):
    """One program of the "dp4a" method: the slot's g query rows of one kv head, each with its
    online softmax (engine/kernels/online_softmax.py); scores by `int_scores`, V converted as
    the "fma" method converts it."""
    rows = [quantize_query(q_ref[j, :]) for j in range(g)]  # (hi, lo, scale) per row
    d = q_ref.shape[-1]

    def body(i, carry, pg):
        valid, k, v, ks, vs = block(i, pg)
        v = int8_to_f32(v, convert, interpret)
        out = []
        for (h, l, qs), state in zip(rows, zip(*carry)):
            s = int_scores(k, h, l, interpret).astype(jnp.float32) * (ks * (qs * scale))
            out.append(row_update(*state, jnp.where(valid, s, NEG_INF), valid, v, vs))
        return tuple(zip(*out))

    run_rows_and_store(loop, body, g, d, o_ref, outs, split)
