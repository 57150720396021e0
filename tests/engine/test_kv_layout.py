"""The chunked KV cache (blocks of 128 positions, engine/kv_chunks.py) serves exactly the tokens
of the token-major one across a block boundary and into a shorter last block; its blocks are
allocated only once a sequence reaches them, placed like the others (no second compile of a
window's program); and it is refused where it does not work."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine.config import make_settings
from engine.llm import LLM
from engine.request import Request, SamplingParams
from engine.settings import ConfigError


def test_chunked_cache_serves_the_token_major_tokens(caplog):
    """A float cache here; the int8 chunked cache is checked in tests/engine/test_sharding.py's
    child (one device, against the token-major tensor-parallel and Pallas runs)."""
    rng = np.random.default_rng(3)
    # cache 200 = blocks of 128 + 72; prompts of 90 and 140 tokens: the first decodes across the
    # boundary, the second is inserted across it and decodes in the shorter last block; one short
    shapes = [(90, 60), (140, 24), (6, 12)]
    reqs = [Request(id=i, prompt_token_ids=[int(t) for t in rng.integers(3, 250, n)],
                    sampling=SamplingParams(max_tokens=m, ignore_eos=True)) for i, (n, m) in enumerate(shapes)]
    out = {}

    def compiles(name):
        return sum(f"compilation of jit({name})" in r.getMessage() for r in caplog.records)

    for layout in ("tokens", "chunks"):
        caplog.clear()
        caplog.set_level("WARNING", logger="jax")
        llm = LLM(model="tiny-llama", batch_size=2, max_cache_length=200, context_size=160, decode_steps=8,
                  prefill_batch=2, kv_layout=layout)
        assert llm._engine.kv_chunked == (layout == "chunks")
        with jax.log_compiles(True):
            short = llm.generate_all(reqs[2:])
        if layout == "chunks":  # positions below 128 only: one block allocated
            assert [len(blocks) for blocks in llm._batcher.state.cache.k] == [1] * 2
        with jax.log_compiles(True):
            first = llm.generate_all(reqs[:1])  # grows the cache inside a decode call
            out[layout] = {r.id: r.completion_token_ids for r in llm.generate_all(reqs)}
        assert short[0].completion_token_ids == out[layout][2]
        assert first[0].completion_token_ids == out[layout][0]
        if layout == "chunks":  # up to 164 positions: both blocks
            k = llm._batcher.state.cache.k
            assert [len(blocks) for blocks in k] == [2] * 2
            # a grown block is placed like the first: the next call of a window reuses its program
            assert all(b.sharding == k[0][0].sharding for blocks in k for b in blocks)
            assert compiles("_generate_impl") == 2  # windows 128 and 200, once each
    assert [len(out["chunks"][i]) for i in range(3)] == [60, 24, 12]
    assert out["chunks"] == out["tokens"]


def test_auto_picks_chunks_on_one_cpu_device_only_where_it_works():
    from engine.engine import JaxEngine
    from engine.llm import resolve_model
    mc = resolve_model(make_settings("tiny-llama").source)[0]
    load = lambda **kw: JaxEngine(make_settings("tiny-llama", batch_size=2, max_cache_length=64,  # noqa: E731
                                                context_size=32, **kw).engine, mc)
    assert load().kv_chunked  # this machine: one CPU device, XLA attention
    assert not load(kv_page_size=8).kv_chunked
    with pytest.raises(ConfigError, match="chunks is a layout of an unpaged cache"):
        make_settings("tiny-llama", kv_page_size=8, kv_layout="chunks")


def test_fp8_cache_in_every_layout():
    """kv_cache_dtype fp8: the cache holds e4m3 elements in the chunked, token-major and paged
    layouts, and all three serve the same tokens (the same per-token quantization); it is
    refused without quantize_kv_cache."""
    import jax.numpy as jnp
    rng = np.random.default_rng(5)
    reqs = [Request(id=i, prompt_token_ids=[int(t) for t in rng.integers(3, 250, n)],
                    sampling=SamplingParams(max_tokens=m, ignore_eos=True)) for i, (n, m) in enumerate([(20, 12), (7, 9)])]
    out = {}
    for name, kw in (("chunks", {"kv_layout": "chunks"}), ("tokens", {"kv_layout": "tokens"}),
                     ("paged", {"kv_page_size": 16})):
        llm = LLM(model="tiny-llama", batch_size=2, max_cache_length=64, context_size=32, decode_steps=4,
                  prefill_batch=2, quantize_kv_cache=True, kv_cache_dtype="fp8", **kw)
        k = llm._batcher.state.cache.k[0]
        assert (k[0] if isinstance(k, tuple) else k).dtype == jnp.float8_e4m3fn
        out[name] = [r.completion_token_ids for r in llm.generate_all(reqs)]
    assert [len(t) for t in out["chunks"]] == [12, 9]
    assert out["chunks"] == out["tokens"] == out["paged"]
    with pytest.raises(ConfigError, match="kv_cache_dtype: fp8 is the type of a quantized KV cache"):
        make_settings("tiny-llama", kv_cache_dtype="fp8")
