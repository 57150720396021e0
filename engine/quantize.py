"""int8 quantization: weights per output channel, KV cache per token and head.

Symmetric absmax: q = round(x / s), s = max|x| / 127, so x ~= q * s.
A quantized weight stays int8 in memory; the matmul converts it to the
activation dtype inside the fused GEMM and scales the output columns, so
bf16 weights never exist in device memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class QuantizedWeight:
    """An int8 [in, out] matrix with one float scale per output column."""

    q: Any  # int8 [in, out]
    scale: Any  # float32 [out]

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype


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


# Rows at or above which a quantized matmul converts its weight in a separate op first.
# XLA fuses the int8->bf16 convert into its own GEMM kernel, which beats cuBLAS only at
# decode's few rows; prefill's thousands of rows run the plain bf16 GEMM much faster, and one
# layer's bf16 copy is a small, short-lived temporary.
DEQUANT_ROWS = 1024


def linear(x, w):
    """x @ w for a plain or a quantized [in, out] weight; output in x's dtype."""
    if isinstance(w, QuantizedWeight):
        wq = w.q.astype(x.dtype)  # exact: int8 values are representable in bf16
        if math.prod(x.shape[:-1]) >= DEQUANT_ROWS:
            wq = jax.lax.optimization_barrier(wq)  # keep the convert out of the GEMM fusion
        y = jnp.einsum("...k,kn->...n", x, wq, preferred_element_type=jnp.float32)
        return (y * w.scale).astype(x.dtype)
    return jnp.einsum("...k,kn->...n", x, w.astype(x.dtype))


def quantize_kv(x):
    """Quantize K or V [..., head_dim] per (token, head): returns int8 values and f32 scales [...]."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(xf / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)
