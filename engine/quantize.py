"""8-bit quantization: weights per output channel, activations per token, KV cache per token and head.

Symmetric absmax: q = round(x / s), s = max|x| / qmax (127 for int8, 448 for fp8 e4m3), so
x ~= q * s. Two weight forms:

* `QuantizedWeight` (weight-only int8, stored [in, out]): the matmul converts it to the
  activation dtype inside the GEMM and scales the output columns, so bf16 weights never exist
  in device memory; the math runs at the bf16 rate.
* `W8A8Weight` (stored [out, in], int8 or fp8 e4m3): each activation row is quantized on the
  fly and the GEMM runs on 8-bit tensor cores (int8 x int8 -> int32, or fp8 x fp8 -> f32), its
  output scaled per row and per column. [out, in] keeps the contracted dimension contiguous
  for both operands, the layout the fast 8-bit GEMMs need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


class _EightBit:
    """8-bit values `q` with float scales: shape and dtype are those of `q`."""

    q: Any
    scale: Any

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype


@dataclass
class QuantizedWeight(_EightBit):
    """An int8 [in, out] matrix with one float scale per output column."""

    q: Any  # int8 [in, out]
    scale: Any  # float32 [out]


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale"], meta_fields=[])


def quantize_weight(w, axis: int = 0) -> QuantizedWeight:
    """Quantize a [in, out] matrix, reducing over `axis` (the input dim) for per-column scales.

    Works on numpy arrays (host, for conversion) and jax arrays (device, at load time).
    """
    xp = np if isinstance(w, np.ndarray) else jnp
    wf = w.astype(xp.float32)
    amax = xp.max(xp.abs(wf), axis=axis)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(wf / xp.expand_dims(scale, axis)), -127, 127).astype(xp.int8)
    return QuantizedWeight(q=q, scale=scale)


def dequantize_weight(w: QuantizedWeight, dtype=jnp.float32):
    return (w.q.astype(jnp.float32) * w.scale[None, :]).astype(dtype)


@dataclass
class W8A8Weight(_EightBit):
    """An 8-bit [out, in] matrix (int8 or float8_e4m3fn) with one float scale per output row."""

    q: Any  # int8 | float8_e4m3fn [out, in]
    scale: Any  # float32 [out]


jax.tree_util.register_dataclass(W8A8Weight, data_fields=["q", "scale"], meta_fields=[])

FP8 = jnp.float8_e4m3fn
_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(FP8): 448.0}


def _quantize_last(x, dtype):
    """(q, scale) of x quantized symmetrically along its last axis (scale keeps that axis as 1)."""
    xf = x.astype(jnp.float32)
    qmax = _QMAX[jnp.dtype(dtype)]
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    y = xf / scale
    if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
        y = jnp.round(y)
    return jnp.clip(y, -qmax, qmax).astype(dtype), scale


def quantize_w8a8(w, dtype=jnp.int8) -> W8A8Weight:
    """A float [in, out] matrix, or a weight-only `QuantizedWeight`, as a W8A8Weight of `dtype`.
    An int8 QuantizedWeight becomes an int8 W8A8Weight exactly (the same values, transposed)."""
    if isinstance(w, QuantizedWeight):
        if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
            return W8A8Weight(q=w.q.T, scale=w.scale)
        w = dequantize_weight(w)
    q, scale = _quantize_last(jnp.asarray(w).T, dtype)
    return W8A8Weight(q=q, scale=scale[:, 0])


def w8a8_dtype(mode: str, platform: str, compute_capability: Optional[str] = None):
    """The 8-bit type of a weight mode on a device: fp8 e4m3 on NVIDIA GPUs with 8-bit float
    tensor cores (compute capability 8.9+) for "w8a8", int8 elsewhere; explicit modes as named."""
    if mode == "w8a8_fp8":
        return FP8
    if mode == "w8a8_int8":
        return jnp.int8
    if platform == "gpu" and compute_capability:
        major, _, minor = str(compute_capability).partition(".")
        if (int(major), int(minor or 0)) >= (8, 9):
            return FP8
    return jnp.int8


def _linear_w8a8(x, w: W8A8Weight):
    """x @ w.T with x quantized per row to w's 8-bit type; output in x's dtype."""
    xq, xs = _quantize_last(x, w.q.dtype)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if jnp.dtype(w.q.dtype) == jnp.dtype(jnp.int8):
        y = jax.lax.dot_general(xq, w.q, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    else:  # the dequantize-then-dot form XLA rewrites into an fp8 GEMM
        y = jax.lax.dot_general(xq.astype(jnp.bfloat16), w.q.astype(jnp.bfloat16), dims,
                                preferred_element_type=jnp.float32)
    return (y * xs * w.scale).astype(x.dtype)


# Rows at or above which a quantized matmul converts its weight in a separate op first.
# XLA fuses the int8->bf16 convert into its own GEMM kernel, which beats cuBLAS only at
# decode's few rows; prefill's thousands of rows run the plain bf16 GEMM much faster, and one
# layer's bf16 copy is a small, short-lived temporary.
DEQUANT_ROWS = 1024


def linear(x, w):
    """x @ w for a plain [in, out], a weight-only int8 or a W8A8 weight; output in x's dtype."""
    if isinstance(w, W8A8Weight):
        return _linear_w8a8(x, w)
    if isinstance(w, QuantizedWeight):
        wq = w.q.astype(x.dtype)  # exact: int8 values are representable in bf16
        if math.prod(x.shape[:-1]) >= DEQUANT_ROWS:
            wq = jax.lax.optimization_barrier(wq)  # keep the convert out of the GEMM fusion
        y = jnp.einsum("...k,kn->...n", x, wq, preferred_element_type=jnp.float32)
        return (y * w.scale).astype(x.dtype)
    if w.dtype == x.dtype:
        return jnp.einsum("...k,kn->...n", x, w)
    # Narrower stored weights (bf16 matrices under float32 compute on CPU): the activations are
    # rounded to the weights' type and the dot accumulates in float32 on bf16 matrix units.
    y = jnp.einsum("...k,kn->...n", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def quantize_kv(x, dtype=jnp.int8):
    """Quantize K or V [..., head_dim] per (token, head): returns 8-bit values of `dtype` (int8
    or fp8 e4m3) and f32 scales [...]."""
    q, scale = _quantize_last(x, dtype)
    return q, scale[..., 0]
