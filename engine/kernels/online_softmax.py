"""The online softmax every method of the ragged decode kernel runs, and how a program stores it.

Each method's block step takes (m, l, acc): the running maximum score, the running sum of
exp(score - m) and the unnormalized output, per query row. This module starts them empty,
runs the loop over the slot's filled blocks, and writes the result: normalized, or with
flash-decoding splits the raw (acc, m, l) for the wrapper to merge.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG_INF = -1e30  # a masked score


def run_and_store(loop, body, rows: int, d: int, o_ref, outs, split: bool, g_axis: bool = False):
    """loop(body, init) from the empty state of `rows` query rows of width `d`, then store.

    g_axis: the output refs keep a length-1 query axis after the rows ([heads, 1, D] and
    [heads, 1]: several kv heads per program, one query head each)."""
    init = (jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    m, l, acc = loop(body, init)
    at, at_row = ((slice(None), 0, slice(None)), (slice(None), 0)) if g_axis else ((...,), (...,))
    if split:
        o_ref[at] = acc
        outs[1][at_row] = m
        outs[2][at_row] = l
    else:
        o_ref[at] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


def row_update(m, l, acc, s, valid, v, v_scale=None, pv_dot=None):
    """One query row's step over a block, the rows kept apart ("fma", "mma8k", "dp4a"): its
    scores s [block_t] (NEG_INF past the length), the block's V and V's per-token scales (None:
    an unquantized cache). Returns the row's new (m, l, acc). pv_dot(pv, v) gives the [D]
    output of the weights pv [block_t] against V; by default V is [block_t, D] float32 and the
    product is summed on the CUDA cores."""
    m_next = jnp.maximum(m, jnp.max(s))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next)
    pv = p * v_scale if v_scale is not None else p
    pv = jnp.where(valid, pv, 0.0)  # stale cache rows may hold anything
    o = pv_dot(pv, v) if pv_dot is not None else jnp.sum(pv[:, None] * v, axis=0)
    return m_next, l * alpha + jnp.sum(p), acc * alpha + o


def run_rows_and_store(loop, body, rows: int, d: int, o_ref, outs, split: bool):
    """run_and_store for methods whose state is one (m, l, acc) per query row, as tuples of
    `rows` scalars and [D] vectors (rows unrolled, stored row by row). `body` updates each row
    with row_update."""
    init = (tuple(jnp.float32(NEG_INF) for _ in range(rows)), tuple(jnp.float32(0.0) for _ in range(rows)),
            tuple(jnp.zeros((d,), jnp.float32) for _ in range(rows)))
    ms, ls, accs = loop(body, init)
    for j in range(rows):
        if split:
            o_ref[j, :] = accs[j]
            outs[1][j] = ms[j]
            outs[2][j] = ls[j]
        else:
            o_ref[j, :] = (accs[j] / jnp.maximum(ls[j], 1e-30)).astype(o_ref.dtype)
