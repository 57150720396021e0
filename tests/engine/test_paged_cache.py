"""The paged KV cache (EngineConfig.kv_page_size): the host page pool, and an engine whose
slots share a pool of pages decoding exactly what the contiguous cache decodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.batcher import ContinuousBatcher
from engine.config import EngineConfig, ModelSource, make_settings
from engine.kv_pages import PagePool
from engine.llm import LLM, load_engine
from engine.request import Request, SamplingParams
from engine.settings import from_mapping
from tests.engine.test_engine import KW, _clone, _mixed_requests
from tests.tiny import byte_tokenizer

# 4 slots of up to 64 tokens, but a pool of 12 pages x 8 = 96 tokens: requests wait for pages.
PAGED = dict(KW, kv_page_size=8, kv_cache_tokens=96)


@pytest.fixture(scope="module")
def paged():
    """A batcher over a paged engine, driven directly so the test can look at its page pool."""
    loaded = load_engine(make_settings("tiny-llama", batch_size=4, **PAGED))
    return ContinuousBatcher(loaded.engine, loaded.params, byte_tokenizer())


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
    fit = lambda tokens, limit: pool.count_fitting([(t, []) for t in tokens], limit)
    assert fit([8, 4, 8], limit=3) == 2  # 2 + 1 of the 4 free pages; then 2 more
    assert fit([8, 4, 4], limit=3) == 3
    assert fit([8, 4, 4], limit=1) == 1
    assert fit([20, 1], limit=2) == 0  # first come, first served: no skipping


def test_page_pool_prefix_index():
    """Indexed pages are found by their chained hashes, shared by reference count, kept while
    idle, and evicted oldest-idle first once the never-used pages run out."""
    from engine.kv_pages import prefix_hashes
    pool = PagePool(num_pages=4, page_size=2, pages_per_slot=4)
    ids = [1, 5, 6, 7, 8]  # 2 whole pages
    h = prefix_hashes(ids, 2)
    assert len(h) == 2 and h == prefix_hashes(ids + [9], 2)[:2] and h[1] != prefix_hashes([1, 4, 6, 7], 2)[1]
    a = pool.take(6)
    pool.index(h, a)
    assert pool.match(h, len(ids)) == a[:2] and pool.match(h, 4) == a[:1]  # the last token is computed
    hit = pool.match(h, len(ids))
    assert pool.count_fitting([(6, hit)], 1) == 1  # 3 pages, 2 of them held: 1 new of 1 free
    assert pool.count_fitting([(6, [])], 1) == 0
    pool.hold(hit)
    b = pool.take(6, hit)
    assert b[:2] == a[:2] and pool.free_pages == 0
    pool.give(a)
    assert pool.free_pages == 1  # a's last page; its cached pages are still held by b
    pool.give(b)
    assert pool.free_pages == 4 and pool.cached_pages == 2 and pool.match(h, len(ids)) == a[:2]
    pool.take(8)  # every page: the 2 never-cached ones first, then the idle cached ones
    assert pool.cached_pages == 0 and pool.match(h, len(ids)) == []


def _shared_prefix(n, sampled=False):
    """Prompts sharing 19 tokens (2 whole pages of 8) before a tail of their own."""
    head = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 256, size=18)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True, **(dict(temperature=1.0, seed=9, n=2) if sampled else {}))
    return [Request(id=i, prompt_token_ids=head + [10 + i] * (1 + i % 3), sampling=sp) for i in range(n)]


def test_prefix_caching_keeps_tokens_and_pages(paged, contiguous):
    """Prompts that share whole pages reuse them (prefilling only their tails) and decode the
    tokens the contiguous cache decodes, greedy and sampled (n = 2); a second run finds the
    pages of the first; with prefix_caching off nothing is reused and the tokens are the same."""
    reqs = _shared_prefix(7) + [dataclasses.replace(r, id=f"s{r.id}") for r in _shared_prefix(2, sampled=True)]
    want = {r.id: [s.completion_token_ids for s in r.all_samples()] for r in contiguous.generate_all(
        [_clone(r) for r in reqs])}
    for caching, runs in ((True, 2), (False, 1)):
        paged.set_scheduler(dataclasses.replace(paged.scheduler, prefix_caching=caching))
        for _ in range(runs):
            paged.stats.clear()
            got = {r.id: [s.completion_token_ids for s in r.all_samples()] for r in paged.run([_clone(r) for r in reqs])}
            assert got == want
            assert (paged.stats["cached_prompt_tokens"] > 0) == caching
    paged.set_scheduler(dataclasses.replace(paged.scheduler, prefix_caching=True))
    held = {p for pages in paged.slot_pages.values() for p in pages}  # shared pages counted once
    assert paged.pages.used_pages == len(held)


def test_config_checks():
    assert EngineConfig(batch_size=4, max_cache_length=64, context_size=32).num_kv_pages == 0
    assert EngineConfig(batch_size=4, max_cache_length=64, context_size=32, kv_page_size=16).num_kv_pages == 16
    with pytest.raises(ValueError, match="must divide max_cache_length"):
        EngineConfig(max_cache_length=100, context_size=32, kv_page_size=16)


def _mix(n, seed):
    reqs = _mixed_requests(n, seed=seed)
    for i, r in enumerate(reqs):  # stop tokens on some, so slots free before max_tokens
        if i % 4 == 1:
            r.sampling = dataclasses.replace(r.sampling, stop_token_ids=tuple(range(3, 256, 3)))
    return reqs


def test_paged_matches_contiguous_and_returns_every_page(paged, contiguous):
    """A length mix through 4 slots that share 96 cache tokens (so admissions wait for pages):
    each request decodes the tokens and finish reason it gets from the contiguous cache, and
    every page is back in the pool once the slots are parked."""
    reqs = _mix(14, seed=21)
    want = contiguous.generate_all([_clone(r) for r in reqs])
    paged.stats.clear()
    got = sorted(paged.run([_clone(r) for r in reqs]), key=lambda r: r.id)
    assert [(g.completion_token_ids, g.finish_reason) for g in got] == \
        [(w.completion_token_ids, w.finish_reason) for w in want]
    assert any(w.finish_reason == "stop" for w in want)
    stats, pool = paged.scheduler_stats(), paged.pages
    assert stats["page_waits"] > 0 and 0 < stats["kv_pages_peak"] <= pool.num_pages == 12
    assert pool.free_pages + sum(len(p) for p in paged.slot_pages.values()) == 12
    list(paged.run([_clone(reqs[0])]))  # the next run parks the last slots first
    assert pool.used_pages == len(paged.slot_pages[next(iter(paged.slot_pages))])


def test_request_larger_than_the_pool_is_an_error_row(paged, contiguous):
    """Prompt 30 + max_tokens 34 needs 63 positions = 8 pages: fits. A pool of 12 pages holds
    it, but not a request that needs more than the pool (checked with a smaller pool)."""
    small = LLM("tiny-llama", batch_size=2, tokenizer=byte_tokenizer(), **dict(PAGED, kv_cache_tokens=40))
    big = Request(id="big", prompt_token_ids=[9] * 30, sampling=SamplingParams(max_tokens=34, ignore_eos=True))
    ok = Request(id="ok", prompt_token_ids=[9, 8, 7], sampling=SamplingParams(max_tokens=5, ignore_eos=True))
    out = {r.id: r for r in small.generate([big, ok])}
    assert "needs 8 KV cache pages of 8 tokens; the pool holds 5" in out["big"].error
    assert out["ok"].completion_token_ids == contiguous.generate_all([_clone(ok)])[0].completion_token_ids
    full, = paged.run([_clone(big)])
    assert full.ok and full.completion_tokens == 34


def test_paged_int8_cache_and_pallas_kernel(contiguous):
    """An int8 paged cache read by the Pallas kernel (interpreted on CPU) gives the contiguous
    int8 cache's tokens."""
    reqs = _mix(6, seed=4)
    kw = dict(KW, quantize_kv_cache=True)
    want = LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), **kw).generate_all([_clone(r) for r in reqs])
    llm = LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), attention="pallas",
              **dict(kw, kv_page_size=16, kv_cache_tokens=128))
    assert llm.engine_info()["decode_attention"] == "pallas"
    got = llm.generate_all([_clone(r) for r in reqs])
    assert [g.completion_token_ids for g in got] == [w.completion_token_ids for w in want]


# ---- kv_cache_tokens="auto" (engine/kv_budget.py) ----

def test_auto_pool_sized_from_memory_stats(contiguous):
    """The pool gets what the device's memory statistics leave after the weights, the compiled
    workspace (XLA's memory analysis of the largest prefill and a decode call) and the margin;
    the engine then serves a length mix from it with the contiguous cache's tokens. (The CPU
    reports no memory statistics, so the test hands them in, as a GPU's would read.)"""
    from engine import kv_budget
    from engine.engine import JaxEngine
    from engine.llm import resolve_model
    settings = make_settings("tiny-llama", **dict(KW, batch_size=4, kv_page_size=8, kv_cache_tokens="auto"))
    ec, mc = settings.engine, resolve_model(settings.source)[0]
    with pytest.raises(ValueError, match="sized from device memory"):
        ec.num_kv_pages
    eng = JaxEngine(ec, mc)
    params = eng.load_params()
    ws = eng.workspace_bytes()
    per_token = kv_budget.cache_bytes_per_token(mc, eng.dtype, quantized=False)
    n, s = eng.geometry.prefill_sizes[-1], eng.geometry.prefill_buckets[-1]
    assert ws >= n * s * per_token  # the largest prefill's K/V output waits for its insert
    per_page, in_use = 8 * per_token, 1 << 20
    # Room for 12 pages and half a page: 11 pool pages plus the trash page.
    limit = int((in_use + ws + 12.5 * per_page) / (1 - kv_budget.MARGIN_FRACTION)) + 1
    plan = eng.size_kv_pool({"bytes_limit": limit, "bytes_in_use": in_use})
    assert (plan.pages, eng.config.kv_cache_tokens, eng.geometry.num_kv_pages, plan.capped) == (11, 88, 11, False)
    assert ec.kv_cache_tokens == "auto"  # the engine made a new config; the one it was given is unchanged
    assert "11 pages of 8 tokens" in plan.describe()
    batcher = ContinuousBatcher(eng, params)  # init_decode_state: "auto" is already resolved
    assert batcher.state.cache.k[0].shape[0] == 12 and batcher.pages.num_pages == 11
    reqs = _mix(10, seed=5)
    want = {r.id: r.completion_token_ids for r in contiguous.generate_all([_clone(r) for r in reqs])}
    got = {r.id: r.completion_token_ids for r in batcher.run([_clone(r) for r in reqs])}
    assert got == want and batcher.stats["page_waits"] > 0
    # Far more memory than 4 slots x 64 tokens can use: capped at 4 x 8 pages.
    other = JaxEngine(ec, mc)
    other.load_params()
    big = other.size_kv_pool({"bytes_limit": 1 << 34, "bytes_in_use": in_use})
    assert big.capped and big.pages == 4 * 8 == other.geometry.num_kv_pages


def test_cache_sized_by_hand_is_checked_against_device_memory():
    """A pool of kv_cache_tokens, or a contiguous cache, larger than the allocator's limit leaves
    after the weights is a one-line ConfigError naming the sizes and the fixes, raised before
    anything is allocated; one that fits passes; the CPU (no memory statistics) is not checked."""
    import jax

    from engine import kv_budget
    from engine.engine import JaxEngine
    from engine.llm import resolve_model
    from engine.settings import ConfigError
    for extra, what in ((dict(kv_page_size=8, kv_cache_tokens=96), "kv_cache_tokens 96"),
                        ({}, "batch_size 4 x max_cache_length 64")):
        settings = make_settings("tiny-llama", **dict(KW, batch_size=4, **extra))
        eng = JaxEngine(settings.engine, resolve_model(settings.source)[0])
        per_token = kv_budget.cache_bytes_per_token(eng.model_config, eng.dtype, quantized=False)
        tokens = 13 * 8 if extra else 4 * 64  # paged: 12 pool pages and the trash page
        room = tokens * per_token + (1 << 20)  # the cache plus 1 MiB of weights, before the margin
        fits = {"bytes_limit": int(room / (1 - kv_budget.MARGIN_FRACTION)) + 1, "bytes_in_use": 1 << 20}
        kv_budget.check_fits(eng, fits)
        with pytest.raises(ConfigError, match=f"^{what}: the KV cache needs .* raise XLA_PYTHON_CLIENT_MEM_FRACTION"):
            kv_budget.check_fits(eng, dict(fits, bytes_in_use=(1 << 20) + per_token))
        kv_budget.check_fits(eng, {})
        assert jax.tree.leaves(eng.init_decode_state().cache.k)[0].shape[0] == (13 if extra else 4)


def test_weights_checked_against_device_memory():
    """device_bytes counts what the weights take on each device (8-bit matrices with their
    scales, the rest in its dtype, split as sharded); a model that cannot fit is a one-line
    ConfigError before any tensor is placed, naming the fixes that apply."""
    import jax.numpy as jnp

    from engine import sharding as shd
    from engine.llm import resolve_model
    from engine.settings import ConfigError
    from engine.weights import check_weights_fit, device_bytes, load_params
    mesh = shd.make_mesh("cpu")
    llama7b = resolve_model(ModelSource(model="llama2-7b"))[0]
    matrices = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000  # layers and lm_head
    other = 32000 * 4096 + (2 * 32 + 1) * 4096  # the embedding table and the norms
    assert device_bytes(llama7b, mesh, jnp.bfloat16, "none") == 2 * (matrices + other)
    assert device_bytes(llama7b, mesh, jnp.bfloat16, "w8a8") == matrices + 2 * other + 4 * (
        32 * (3 * 4096 + 4096 + 2 * 11008 + 4096) + 32000)  # float32 scales per output column
    stats = {"bytes_limit": 8 * 2**30, "bytes_in_use": 0}
    with pytest.raises(ConfigError, match=r"^model llama2-7b: its weights \(bfloat16 matrices\) need 12.55 GiB "
                                          r"on its device.* Quantize them"):
        check_weights_fit(llama7b, mesh, jnp.bfloat16, "none", None, stats)
    check_weights_fit(llama7b, mesh, jnp.bfloat16, "w8a8", None, stats)  # 6.40 GiB fits in 8
    with pytest.raises(ConfigError, match=r"8-bit matrices.*\. Spread them over more devices"):
        check_weights_fit(llama7b, mesh, jnp.bfloat16, "w8a8", None, dict(stats, bytes_in_use=2 * 2**30))
    check_weights_fit(llama7b, mesh, jnp.bfloat16, "none", None, {})  # the CPU: no statistics, no check
    tiny = resolve_model(ModelSource(model="tiny-llama"))[0]
    assert load_params(tiny, None, mesh, jnp.float32, "none")["embed"].shape == (tiny.vocab_size, tiny.hidden_size)


def test_auto_pool_arithmetic_errors_and_cpu_fallback():
    from engine import kv_budget
    from engine.llm import resolve_model
    llama7b = resolve_model(ModelSource(model="llama2-7b"))[0]
    # int8 K and V of 32 layers x 32 heads x 128, plus two f32 scales per head: 264 KiB a token.
    assert kv_budget.cache_bytes_per_token(llama7b, "bfloat16", quantized=True) == 32 * 32 * (256 + 8)
    assert kv_budget.cache_bytes_per_token(llama7b, "bfloat16", quantized=False) == 32 * 32 * 512
    assert kv_budget.cache_bytes_per_token(llama7b, "bfloat16", quantized=True, kv_shards=4) == 8 * 32 * (256 + 8)
    # 100 MiB - 80 in use - 1 of workspace - 4 of margin = 15 MiB: 7 pages of 2 MiB, one the trash page.
    with pytest.raises(ValueError, match="only 6 KV pages of 8 tokens fit"):
        kv_budget.plan_pool(bytes_limit=100 * 2**20, bytes_in_use=80 * 2**20, workspace_bytes=2**20,
                            bytes_per_token=2**18, page_size=8, max_pages=100, min_pages=8)
    assert kv_budget.plan_pool(bytes_limit=100 * 2**20, bytes_in_use=80 * 2**20, workspace_bytes=2**20,
                               bytes_per_token=2**18, page_size=8, max_pages=100, min_pages=6).pages == 6
    with pytest.raises(ValueError, match="set kv_page_size"):
        EngineConfig(max_cache_length=64, context_size=32, kv_cache_tokens="auto")
    assert from_mapping(EngineConfig, dict(max_cache_length=64, context_size=32, kv_page_size=8,
                                           kv_cache_tokens="Auto")).kv_cache_tokens == "auto"
    # The CPU has no memory statistics: "auto" falls back to batch_size x max_cache_length.
    llm = LLM("tiny-llama", batch_size=2, **dict(KW, kv_page_size=8, kv_cache_tokens="auto"))
    assert llm.engine_config.kv_cache_tokens == 2 * 64 and llm.stats()["kv_pages"] == 16
    assert llm.generate_all([Request(id=0, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=3))])[0].ok
