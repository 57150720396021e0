"""The paged KV cache (EngineConfig.kv_page_size): the host page pool, and an engine whose
slots share a pool of pages decoding exactly what the contiguous cache decodes."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.kv_pages import PagePool
from engine.llm import LLM
from engine.request import Request, SamplingParams
from test_engine import KW, _clone, _mixed_requests
from tiny import byte_tokenizer

# 4 slots of up to 64 tokens, but a pool of 12 pages x 8 = 96 tokens: requests wait for pages.
PAGED = dict(KW, kv_page_size=8, kv_cache_tokens=96)


@pytest.fixture(scope="module")
def paged():
    return LLM("tiny-llama", batch_size=4, tokenizer=byte_tokenizer(), **PAGED)


@pytest.fixture(scope="module")
def contiguous():
    return LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), **KW)


def test_page_pool():
    pool = PagePool(num_pages=5, page_size=4, pages_per_slot=3)
    a = pool.take(9)  # 3 pages
    assert len(a) == 3 and pool.free_pages == 2 and pool.peak_used == 3
    with pytest.raises(ValueError, match="2 are free"):
        pool.take(9)
    with pytest.raises(ValueError, match="more than a slot's 3"):
        pool.take(13)
    b = pool.take(1)
    rows = pool.rows([a, b, []])
    assert rows.shape == (3, 3) and list(rows[0]) == a and list(rows[1]) == [b[0], 5, 5]
    assert list(rows[2]) == [5, 5, 5]  # the trash page
    pool.give(a)
    c = pool.take(16 - 4)
    assert pool.free_pages == 1 and not set(c) & set(b)
    pool.give(c)
    assert pool.count_fitting([8, 4, 8], limit=3) == 2  # 2 + 1 of the 4 free pages; then 2 more
    assert pool.count_fitting([8, 4, 4], limit=3) == 3
    assert pool.count_fitting([8, 4, 4], limit=1) == 1
    assert pool.count_fitting([20, 1], limit=2) == 0  # first come, first served: no skipping


def test_config_checks():
    assert EngineConfig(batch_size=4, max_cache_length=64, context_size=32).num_kv_pages == 0
    assert EngineConfig(batch_size=4, max_cache_length=64, context_size=32, kv_page_size=16).num_kv_pages == 16
    with pytest.raises(ValueError, match="must divide max_cache_length"):
        EngineConfig(max_cache_length=100, context_size=32, kv_page_size=16)


def _mix(n, seed):
    reqs = _mixed_requests(n, seed=seed)
    for i, r in enumerate(reqs):  # stop tokens on some, so slots free before max_tokens
        if i % 4 == 1:
            r.sampling.stop_token_ids = [int(t) for t in range(3, 256, 3)]
    return reqs


def test_paged_matches_contiguous_and_returns_every_page(paged, contiguous):
    """A length mix through 4 slots that share 96 cache tokens (so admissions wait for pages):
    each request decodes the tokens and finish reason it gets from the contiguous cache, and
    every page is back in the pool once the slots are parked."""
    reqs = _mix(14, seed=21)
    want = contiguous.generate_all([_clone(r) for r in reqs])
    paged.batcher.stats.clear()
    got = paged.generate_all([_clone(r) for r in reqs])
    assert [(g.completion_token_ids, g.finish_reason) for g in got] == \
        [(w.completion_token_ids, w.finish_reason) for w in want]
    assert any(w.finish_reason == "stop" for w in want)
    stats, pool = paged.batcher.scheduler_stats(), paged.batcher.pages
    assert stats["page_waits"] > 0 and 0 < stats["kv_pages_peak"] <= pool.num_pages == 12
    assert pool.free_pages + sum(len(p) for p in paged.batcher.slot_pages.values()) == 12
    paged.generate_all([_clone(reqs[0])])  # the next run parks the last slots first
    assert pool.used_pages == len(paged.batcher.slot_pages[next(iter(paged.batcher.slot_pages))])


def test_request_larger_than_the_pool_is_an_error_row(paged, contiguous):
    """Prompt 30 + max_tokens 34 needs 63 positions = 8 pages: fits. A pool of 12 pages holds
    it, but not a request that needs more than the pool (checked with a smaller pool)."""
    small = LLM("tiny-llama", batch_size=2, tokenizer=byte_tokenizer(), **dict(PAGED, kv_cache_tokens=40))
    big = Request(id="big", prompt_token_ids=[9] * 30, sampling=SamplingParams(max_tokens=34, ignore_eos=True))
    ok = Request(id="ok", prompt_token_ids=[9, 8, 7], sampling=SamplingParams(max_tokens=5, ignore_eos=True))
    out = {r.id: r for r in small.generate([big, ok])}
    assert "needs 8 KV cache pages of 8 tokens; the pool holds 5" in out["big"].error
    assert out["ok"].completion_token_ids == contiguous.generate_all([_clone(ok)])[0].completion_token_ids
    full = paged.generate_all([_clone(big)])[0]
    assert full.ok and full.completion_tokens == 34


def test_paged_int8_cache_and_pallas_kernel(contiguous):
    """An int8 paged cache read by the Pallas kernel (interpreted on CPU) gives the contiguous
    int8 cache's tokens."""
    reqs = _mix(6, seed=4)
    kw = dict(KW, quantize_kv_cache=True)
    want = LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), **kw).generate_all([_clone(r) for r in reqs])
    llm = LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), attention="pallas",
              **dict(kw, kv_page_size=16, kv_cache_tokens=128))
    assert llm.engine.attention_impl == "pallas"
    got = llm.generate_all([_clone(r) for r in reqs])
    assert [g.completion_token_ids for g in got] == [w.completion_token_ids for w in want]
