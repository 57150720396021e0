"""Packed prefill (engine/packed.py): prompts back to back in one row give the tokens bucketed
prefill gives, through the real engine (contiguous, paged and 8-bit caches; Gemma 2's soft-cap
and sliding window), and the batcher plans calls within the packed geometry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.batcher import ContinuousBatcher
from engine.config import ConfigError, EngineConfig, SchedulerConfig
from engine.fake_engine import ContractError, FakeEngine, fake_geometry
from engine.kv_cache import prefill_attention
from engine.llm import LLM
from engine.packed import packed_attention, segment_layout
from engine.request import Request, SamplingParams
from tests.engine.test_engine import KW, _clone, _mixed_requests
from tests.tiny import byte_tokenizer


@pytest.mark.parametrize("opts", [{}, {"softcap": 5.0, "sliding_window": 6}])
def test_packed_attention_matches_each_prompt_alone(opts):
    """Segments of a packed row attend only to themselves: each prompt's rows equal its own
    causal attention, with query blocks (8) shorter than the span (16) a key window covers."""
    lengths = np.array([5, 16, 1, 9, 12, 0, 0], np.int32)
    t, h, hkv, d = 48, 4, 2, 8
    starts, seg, _ = segment_layout(lengths, t)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, t, n, d), jnp.float32) for kk, n in zip(key, (h, hkv, hkv)))
    got = packed_attention(q, k, v, jnp.asarray(seg), jnp.asarray(starts), jnp.asarray(lengths), scale=0.3,
                           span=16, block=8, **opts)[0]
    for s, n in zip(starts, lengths):
        if n:
            one = prefill_attention(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n], scale=0.3, **opts)[0]
            np.testing.assert_allclose(got[s:s + n], one, atol=2e-6)


def test_packed_attention_path():
    """cuDNN serves packed rows only where it serves the prefill and the model has neither
    soft-capped nor sliding-window attention (those take XLA)."""
    from engine.config import ModelSource
    from engine.model_files import resolve_model
    from engine.packed import packed_attention_impl
    llama, gemma2 = (resolve_model(ModelSource(model=m))[0] for m in ("tiny-llama", "tiny-gemma2"))
    assert packed_attention_impl("xla", llama) == "xla" and packed_attention_impl("cudnn", gemma2) == "xla"
    assert packed_attention_impl("cudnn", llama) == "cudnn"  # the JAX-internal entry exists in this JAX


def test_segment_layout():
    starts, seg, pos = segment_layout([3, 2, 0], 8)
    assert starts.tolist() == [0, 3, 5]
    assert seg.tolist() == [0, 0, 0, 1, 1, 3, 3, 3] and pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 0]


@pytest.fixture(scope="module")
def requests():
    return _mixed_requests(14, seed=21)


@pytest.fixture(scope="module")
def bucketed(requests):
    """Completions of the same requests through bucketed prefill, float and int8 caches."""
    out = {}
    for name, extra in (("float", {}), ("int8", dict(quantize_kv_cache=True))):
        llm = LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), kv_layout="tokens", **KW, **extra)
        out[name] = [r.completion_token_ids for r in llm.generate_all([_clone(r) for r in requests])]
    return out


@pytest.mark.parametrize("cache,extra", [
    ("float", dict(kv_layout="tokens")),
    ("int8", dict(kv_page_size=8, kv_cache_tokens=96, batch_size=4, quantize_kv_cache=True)),
])
def test_packed_prefill_gives_the_bucketed_tokens(requests, bucketed, cache, extra):
    """A length mix through 3-4 slots (paged: 4 slots sharing 96 tokens, so refills wait for
    pages): each request decodes exactly its bucketed tokens, in one prefill call per refill
    (the refill's prompts share a row)."""
    kw = dict(KW, batch_size=3, packed_prefill=64) | extra
    llm = LLM("tiny-llama", tokenizer=byte_tokenizer(), **kw)
    got = [r.completion_token_ids for r in llm.generate_all([_clone(r) for r in requests])]
    assert got == bucketed[cache]
    stats = llm._batcher.scheduler_stats()
    assert stats["prefill_calls"] == stats["refills"]


def test_packed_gemma2_softcap_and_sliding_window(requests):
    """Gemma 2 (attention soft-cap, sliding-window layers) packed equals bucketed."""
    got = []
    for extra in ({}, dict(packed_prefill=64)):
        llm = LLM("tiny-gemma2", batch_size=3, tokenizer=byte_tokenizer(), kv_layout="tokens", **KW, **extra)
        got.append([r.completion_token_ids for r in llm.generate_all([_clone(r) for r in requests[:8]])])
    assert got[0] == got[1]


def test_packed_geometry_and_config_checks():
    ec = EngineConfig(batch_size=64, max_cache_length=2048, context_size=1024, min_prefill_bucket=64,
                      prefill_batch=8, packed_prefill=8192)
    assert ec.packed_sizes() == (512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192) and ec.packed_rows() == 64
    assert EngineConfig().packed_sizes() == () and EngineConfig().packed_rows() == 0
    with pytest.raises(ConfigError, match="cannot hold a prompt of the longest prefill bucket"):
        EngineConfig(max_cache_length=2048, context_size=1024, packed_prefill=512)
    with pytest.raises(ConfigError, match="kv_layout tokens or a paged cache"):
        EngineConfig(packed_prefill=1024, kv_layout="chunks")


def test_batcher_packs_within_the_budget_and_rows():
    """Fake engine, 8 slots, rows of up to 64 tokens and 8 prompts: prompts of 20 tokens go
    three to a call (60 of 64), the row the smallest packed size (steps of 8) that holds them; prompt
    logprobs and n > 1 take bucketed calls; every request gets its own tokens."""
    geo = fake_geometry(slots=8, context_size=32, max_cache_length=64, packed_prefill=64)
    assert geo.packed_sizes == (8, 16, 24, 32, 40, 48, 56, 64) and geo.packed_rows == 8
    reqs = [Request(id=i, prompt_token_ids=[3 + i] * 20, sampling=SamplingParams(max_tokens=3, ignore_eos=True))
            for i in range(7)]
    reqs.append(Request(id="lp", prompt_token_ids=[9] * 5,
                        sampling=SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=1)))
    eng = FakeEngine(geo)
    b = ContinuousBatcher(eng, None, scheduler=SchedulerConfig())
    got = {r.id: r for r in b.run(reqs)}
    for r in reqs:
        want = [(r.prompt_token_ids[-1] + k) % 256 for k in range(1, r.sampling.max_tokens + 1)]
        assert got[r.id].completion_token_ids == want
    packed = [c for c in eng.calls if c[0] == "prefill_packed"]
    assert packed == [("prefill_packed", 64, 3), ("prefill_packed", 64, 3), ("prefill_packed", 24, 1)]
    assert [c[:3] for c in eng.calls if c[0] == "prefill"] == [("prefill", 1, 8)]
    assert b.scheduler_stats()["prefill_tokens"] == 64 + 64 + 24 + 8


def test_fake_engine_refuses_bad_packed_calls():
    eng = FakeEngine(fake_geometry(slots=4, context_size=32, max_cache_length=64, packed_prefill=64))
    rows = eng.geometry.packed_rows
    with pytest.raises(ContractError, match="not a packed size|the engine takes"):
        eng.prefill_packed(params=None, tokens=np.zeros(44, np.int32), lengths=np.r_[4, [0] * (rows - 1)])
    with pytest.raises(ContractError, match="used ones first"):
        eng.prefill_packed(params=None, tokens=np.zeros(64, np.int32), lengths=np.r_[0, 4, [0] * (rows - 2)])
