"""The KV cache is updated in place: the compiled decode step and insert hold no cache-sized
copy (benchmarks/decode_step.cache_copies reads their HLO). A copy of the cache per layer per
step is the kind of slowdown no output test sees; on CPU one came from a bitcast view of the
cache (engine/kv_cache._set_rows), which is why that view is used on GPUs only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.decode_step import cache_copies, cache_program_copies
from engine.kv_cache import _set_rows
from engine.config import make_settings
from engine.llm import load_engine


def test_the_check_sees_an_undone_bitcast_and_passes_a_plain_scatter():
    cache = jnp.zeros((4, 64, 2, 8), jnp.int8)
    rows = jnp.ones((4, 2, 8), jnp.int8)
    where = (jnp.arange(4), jnp.array([3, 0, 63, 7]))
    hlo = lambda words: jax.jit(lambda c, r: _set_rows(c, where, r, words=words),  # noqa: E731
                                donate_argnums=0).lower(cache, rows).compile().as_text()
    assert cache_copies(hlo(False), 4, 64) == []
    if jax.default_backend() == "cpu":  # XLA's CPU backend materializes the uint32 view
        assert cache_copies(hlo(True), 4, 64)


@pytest.mark.parametrize("layout", ["chunks", "tokens", "paged"])
def test_decode_step_and_insert_write_the_cache_in_place(layout):
    kw = dict(kv_page_size=8, kv_cache_tokens=256) if layout == "paged" else dict(kv_layout=layout)
    # int8 blocks of a chunked cache are converted whole for XLA's CPU dots (a temporary the
    # check would count): the chunked case runs the float cache it is the default for
    loaded = load_engine(make_settings("tiny-llama", batch_size=4, max_cache_length=64, context_size=32,
                                       decode_steps=2, prefill_batch=2, quantize_kv_cache=layout != "chunks", **kw))
    eng = loaded.engine
    assert cache_program_copies(eng, loaded.params, eng.init_decode_state()) == []
