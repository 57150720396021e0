"""int8-weight matmul in Pallas (Triton backend): y = x @ (wq * scale), weights read as int8.

Why: XLA fuses the int8 -> bf16 convert into a Triton GEMM of its own, which on an H100 loses
to cuBLAS bf16 from about 256 rows (BENCHMARKS.md, `benchmarks/profile_step.py`): int8 weights
then made a decode step slower, not faster. This kernel tiles the product itself:

- "w8a16": bf16 activations, each [block_k, block_n] int8 weight tile converted to bf16 in
  registers, float32 accumulation, per-column scale on the way out. Exact up to bf16 rounding
  of the product, like `(x @ wq.astype(bf16)) * scale`.
- "w8a8": activations quantized per row (absmax / 127, dynamic) before the kernel, then an
  int8 x int8 -> int32 tensor-core product (twice the bf16 rate on Hopper), scaled by row and
  column scales. Changes numerics (activation rounding), so it is opt-in.

x [M, K], wq [K, N] int8, scale [N] float32 -> [M, N] in x's dtype. Grid (N / block_n,
M / block_m), rows fastest, so programs sharing one weight slab run together and the slab
comes from HBM once. M is padded to a multiple of block_m; K and N must divide by the blocks.

Works with jax 0.10 (interpret=True, CPU tests) and 0.11 (Triton on GPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from engine.kernels.ragged_decode import _compiler_params, _multiple_of

MODES = ("w8a16", "w8a8")
# (block_m, block_n, block_k, num_warps, num_stages); replaced by what the H100 sweep picks.
DEFAULT_BLOCKS = (128, 128, 128, 4, 3)


def quantize_rows(x):
    """Per-row symmetric int8: (int8 [M, K], float32 scale [M])."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(xf / s[:, None]), -127, 127).astype(jnp.int8), s


def _kernel(x_ref, w_ref, s_ref, *rest, block_k: int, num_k: int, mode: str):
    if mode == "w8a8":
        xs_ref, o_ref = rest
    else:
        (o_ref,) = rest
    bm, bn = o_ref.shape
    acc_t = jnp.int32 if mode == "w8a8" else jnp.float32

    def body(i, acc):
        k0 = _multiple_of(i * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]
        w = w_ref[pl.ds(k0, block_k), :]
        if mode == "w8a16":
            w = w.astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=acc_t)

    acc = lax.fori_loop(0, num_k, body, jnp.zeros((bm, bn), acc_t))
    y = acc.astype(jnp.float32) * s_ref[...][None, :]
    if mode == "w8a8":
        y = y * xs_ref[...][:, None]
    o_ref[...] = y.astype(o_ref.dtype)


def _pow2_at_most(x: int, cap: int) -> int:
    return min(cap, 1 << max(0, (x - 1).bit_length()))


def int8_matmul(x, wq, scale, *, mode: str = "w8a16", blocks: Optional[tuple] = None,
                interpret: bool = False):
    """x [..., K] @ int8 wq [K, N] * scale [N] -> [..., N] in x's dtype (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    bm, bn, bk, warps, stages = blocks or DEFAULT_BLOCKS
    lead = x.shape[:-1]
    k, n = wq.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    bm = max(16, _pow2_at_most(m, bm))
    if n % bn or k % bk:
        raise ValueError(f"blocks ({bn}, {bk}) do not divide N={n}, K={k}")
    mp = -(-m // bm) * bm
    args, in_specs = [], []
    if mode == "w8a8":
        xq, xs = quantize_rows(x2)
        x_in, extra = xq, [xs]
    else:
        x_in, extra = x2, []
    if mp != m:
        x_in = jnp.pad(x_in, ((0, mp - m), (0, 0)))
        extra = [jnp.pad(e, (0, mp - m), constant_values=1.0) for e in extra]
    args = [x_in, wq, scale.astype(jnp.float32)] + extra
    in_specs = [pl.BlockSpec((bm, k), lambda j, i: (i, 0)),
                pl.BlockSpec((k, bn), lambda j, i: (0, j)),
                pl.BlockSpec((bn,), lambda j, i: (j,))]
    if mode == "w8a8":
        in_specs.append(pl.BlockSpec((bm,), lambda j, i: (i,)))
    kwargs = {}
    params = _compiler_params(warps, stages)
    if params is not None:
        kwargs["compiler_params"] = params
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, num_k=k // bk, mode=mode),
        grid=(n // bn, mp // bm), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype), interpret=interpret,
        name=f"int8_matmul_{mode}", **kwargs,
    )(*args)
    return out[:m].reshape(*lead, n)
