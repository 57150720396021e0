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
