"""Exact int8 -> float32 conversion inside a Pallas-Triton kernel, three ways (`convert`).

The ragged decode kernel's "fma" method converts every int8 K/V element it reads; the plain
conversion instruction is slow enough on Hopper to bound the kernel, so two cheaper exact
spellings exist beside it. All three give the same floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

try:  # pallas.triton in current jax; pallas.gpu in older releases
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    from jax.experimental.pallas import gpu as plgpu

_MAGIC = 0x4B000080  # float32 bits of 2**23 + 128
_MAGIC_F = float(2 ** 23 + 128)


def int8_to_f32(x, convert: str, interpret: bool = False):
    """int8 -> float32, exactly. "cvt" is the plain conversion (I2F, which a Hopper SM issues at
    a quarter of its integer-add rate: it bounds the kernel). "magic" sign-extends, adds the
    bits of 2**23 + 128 so that x + 128 lands in the float's low mantissa bits, bitcasts, and
    subtracts 2**23 + 128: integer and float adds only. "prmt" builds the same float bits with
    one byte-permute instruction per element straight from the packed bytes, skipping the
    sign extension and the integer add (inline PTX; interpreted runs use "magic")."""
    if convert == "cvt" or x.dtype != jnp.int8:
        return x.astype(jnp.float32)
    if convert == "prmt" and not interpret:
        bits = _prmt_magic_bits(x)
    else:
        bits = x.astype(jnp.int32) + jnp.int32(_MAGIC)
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(_MAGIC_F)


# Four int8 in one 32-bit register -> four words 0x4B0000uu, uu = byte + 128 (flip its sign bit):
# as float32 each is 2**23 + 128 + x. PRMT's selector 0x765i takes byte i of t for the low byte
# and bytes 1..3 of the constant 0x4B000000 above it.
_PRMT_ASM = """{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7650;
prmt.b32 $1, t, 0x4B000000, 0x7651;
prmt.b32 $2, t, 0x4B000000, 0x7652;
prmt.b32 $3, t, 0x4B000000, 0x7653;
}"""


def _prmt_magic_bits(x):
    (bits,) = plgpu.elementwise_inline_asm(
        _PRMT_ASM, args=[x], constraints="=r,=r,=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])
    return bits
