"""The token lookup on CPU gathers the embedding table's 16-bit patterns (engine/weights.add_embed_bits):
the same rows as the table, and a compiled decode program that holds no float32 copy of the
table. XLA's CPU backend gathers bf16 rows by converting the whole table to float32, and the
decode loop hoists that conversion into a copy made on every call: slower and a table-sized
temporary, which no output test sees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import make_settings
from engine.llm import load_engine
from engine.model import embed
from engine.weights import add_embed_bits


def test_the_bits_gather_the_tables_rows():
    table = jax.random.normal(jax.random.PRNGKey(0), (64, 8)).astype(jnp.bfloat16)
    params = add_embed_bits({"embed": table})
    assert params["embed_bits"].dtype == jnp.uint16
    tokens = jnp.array([[0, 5, 63], [7, 7, 1]])
    got = embed(params, _Cfg(), tokens, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table[tokens].astype(jnp.float32)))
    assert "embed_bits" not in add_embed_bits({"embed": table.astype(jnp.float32)})


def test_the_decode_program_holds_no_float32_table():
    loaded = load_engine(make_settings("tiny-llama", batch_size=4, max_cache_length=64, context_size=32,
                                       decode_steps=2, prefill_batch=2, weight_dtype="bfloat16"))
    eng, params = loaded.engine, loaded.params
    assert "embed_bits" in params  # on a CPU device
    v, d = params["embed"].shape
    table_f32 = f"f32[{v},{d}]"
    hlo = lambda p: eng.lower_generate(p, eng.init_decode_state()).compile().as_text()  # noqa: E731
    assert table_f32 not in hlo(params)
    # the check sees the copy that a gather of the bf16 table brings into the program
    assert table_f32 in hlo({k: x for k, x in params.items() if k != "embed_bits"})


class _Cfg:
    embed_scale = False
