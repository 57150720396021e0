"""The ragged decode kernel's "fma" method over several kv heads per program (`heads` > 1, G=1).

A token's K/V rows of neighbouring kv heads are contiguous in the cache ([.., T, Hkv, D]), so
a program owning `heads` of them loads heads*D bytes per token in one row instead of D.
engine/kernels/ragged_decode.py owns the grid, the loads and the masks; this module the math.
"""

from __future__ import annotations

import jax.numpy as jnp

from engine.kernels.int8_convert import int8_to_f32
from engine.kernels.online_softmax import NEG_INF, run_and_store


def fma_heads_attend(q_ref, o_ref, outs, loop, block, *, scale, split, convert, interpret, quantized):
    """The "fma" method for one slot and `heads` kv heads at once (G=1): K/V blocks
    [block_t, heads, D], whose rows are heads*D contiguous bytes of the cache instead of D, and
    one online softmax per head."""
    q = q_ref[:, 0, :].astype(jnp.float32) * scale  # [heads, D]
    h = q.shape[0]

    def body(i, carry, pg):
        m, l, acc = carry
        valid, k, v, ks, vs = block(i, pg)  # k, v [block_t, heads, D]; scales [heads, block_t]
        k = int8_to_f32(k, convert, interpret)
        v = int8_to_f32(v, convert, interpret)
        s = jnp.sum(k * q[None, :, :], axis=2)  # [block_t, heads]
        if quantized:
            s = s * jnp.transpose(ks)
        s = jnp.where(valid[:, None], s, NEG_INF)
        m_next = jnp.maximum(m, jnp.max(s, axis=0))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[None, :])
        pv = p * jnp.transpose(vs) if quantized else p
        pv = jnp.where(valid[:, None], pv, 0.0)  # stale cache rows may hold anything
        o = jnp.sum(pv[:, :, None] * v, axis=0)  # [heads, D]
        return m_next, l * alpha + jnp.sum(p, axis=0), acc * alpha[:, None] + o

    run_and_store(loop, body, h, q.shape[1], o_ref, outs, split, g_axis=True)
