"""The continuous batcher against the fake engine (engine/fake_engine.py): slot refill, serving
orders, prefill call sizes, parking and page waits, with tokens computed by hand.

The fake engine generates last-prompt-token + 1, + 2, ... (mod 256), so every request's
tokens are known without a model; it also refuses calls the Engine API does not allow (a
page given to two live slots, a prefill call size or bucket the geometry lacks)."""

from __future__ import annotations

import pytest

from engine.batcher import ContinuousBatcher
from engine.config import SchedulerConfig
from engine.fake_engine import ContractError, FakeEngine, fake_geometry
from engine.request import Request, SamplingParams


def req(i, prompt, max_tokens, **sp):
    return Request(id=i, prompt_token_ids=list(prompt), sampling=SamplingParams(max_tokens=max_tokens, **sp))


def expected(prompt, n):
    return [(prompt[-1] + k) % 256 for k in range(1, n + 1)]


def run(reqs, scheduler=None, **geometry):
    """(results by id, the engine's call log, the batcher's counters)."""
    eng = FakeEngine(fake_geometry(**geometry))
    b = ContinuousBatcher(eng, None, scheduler=scheduler or SchedulerConfig())
    results = list(b.run(reqs))
    return {r.id: r for r in results}, eng.calls, b.scheduler_stats() | dict(b.stats)


def test_every_request_gets_its_own_tokens_through_refilled_slots():
    """Ten requests of mixed lengths through four slots: each gets exactly its tokens, and
    freed slots take new requests (more inserts than slots)."""
    reqs = [req(i, [10 * i + 3] * (1 + i % 5), max_tokens=1 + (7 * i) % 11, ignore_eos=True) for i in range(10)]
    got, calls, stats = run(reqs, slots=4)
    assert len(got) == 10
    for r in reqs:
        assert got[r.id].completion_token_ids == expected(r.prompt_token_ids, r.sampling.max_tokens)
        assert got[r.id].finish_reason == "length" and got[r.id].prompt_tokens == len(r.prompt_token_ids)
    inserted = [s for c in calls if c[0] == "insert" for s in c[1]]
    assert len(inserted) == 10 and set(inserted) == {0, 1, 2, 3}
    assert stats["completed"] == 10 and stats["generated_tokens"] == sum(r.sampling.max_tokens for r in reqs)


def test_eos_and_stop_token_ids_end_a_request_unless_eos_is_ignored():
    """EOS (id 2) three tokens after a prompt ending in 255 (256, 0, 1, 2 -> 0, 1, then EOS)."""
    got, _, _ = run([req("eos", [5, 255], 10), req("ignored", [5, 255], 5, ignore_eos=True),
                     req("stop_id", [40], 10, stop_token_ids=(44,))])
    assert got["eos"].completion_token_ids == [0, 1] and got["eos"].finish_reason == "stop"
    assert got["ignored"].completion_token_ids == [0, 1, 2, 3, 4]
    assert got["stop_id"].completion_token_ids == [41, 42, 43] and got["stop_id"].finish_reason == "stop"


def test_results_stream_in_completion_order():
    got = [r.id for r in ContinuousBatcher(FakeEngine(fake_geometry()), None).run(
        [req("long", [5, 6], 30, ignore_eos=True), req("short", [5, 6], 2, ignore_eos=True)])]
    assert got == ["short", "long"]


def test_prefill_calls_take_power_of_two_sizes_without_padding_rows():
    """Seven same-bucket prompts, prefill_batch 4: calls of 4, 2 and 1 (7 = 4 + 2 + 1)."""
    reqs = [req(i, [5 + i] * 3, 2, ignore_eos=True) for i in range(7)]
    _, calls, stats = run(reqs, slots=7, prefill_batch=4)
    assert sorted(c[1] for c in calls if c[0] == "prefill") == [1, 2, 4]
    assert stats["prefill_rows"] == 7 and stats["prefill_calls"] == 3
    assert stats["prefill_tokens"] == 7 * 8  # every row padded to the smallest bucket, 8


def test_prefill_tokens_count_the_padding():
    """Prompts of 3, 30, 5 and 20 tokens share one call padded to 32: 128 positions, 58 of them
    prompt tokens, so 55% padding."""
    from engine.sched_stats import prefill_padding
    reqs = [req(i, range(7, 7 + n), 5, ignore_eos=True) for i, n in enumerate([3, 30, 5, 20])]
    _, _, stats = run(reqs, slots=4, prefill_batch=4)
    assert stats["prefill_tokens"] == 4 * 32 and stats["prompt_tokens"] == 58
    assert prefill_padding(stats["prompt_tokens"], stats["cached_prompt_tokens"], stats["prefill_tokens"]) == 0.547
    assert prefill_padding(0, 0, 0) is None


def test_short_prompts_share_a_longer_prefill_call():
    """Prompts of buckets 8, 32, 8 and 32 go through one call padded to 32 (within MERGE_TOKENS)."""
    reqs = [req(i, range(7, 7 + n), 5, ignore_eos=True) for i, n in enumerate([3, 30, 5, 20])]
    got, calls, _ = run(reqs, slots=4, prefill_batch=4)
    assert [c for c in calls if c[0] == "prefill"] == [("prefill", 4, 32)]
    assert all(got[r.id].completion_token_ids == expected(r.prompt_token_ids, 5) for r in reqs)


def test_early_refill_skips_the_wasted_decode_call():
    """Two waves of 3 requests that end together (1 prefill token + 8 decode tokens = 2 calls of
    4 steps): refilling as soon as the dispatched calls cover max_tokens takes 4 decode calls;
    refilling after the tokens are read takes a 3rd call per wave for nothing."""
    reqs = [req(i, [3 + i, 7, 9], 9, ignore_eos=True) for i in range(6)]
    early, _, s_early = run(reqs, SchedulerConfig(early_refill=True), slots=3, decode_steps=4)
    late, _, s_late = run(reqs, SchedulerConfig(early_refill=False), slots=3, decode_steps=4)
    assert s_early["decode_calls"] == 4 and s_late["decode_calls"] == 6
    for r in reqs:
        assert early[r.id].completion_token_ids == late[r.id].completion_token_ids == expected(r.prompt_token_ids, 9)


def test_min_refill_waits_for_fuller_prefill_calls():
    """min_refill=3 on 3 slots refills only when all three are free (or nothing decodes)."""
    reqs = [req(i, [20 + i] * 3, m, ignore_eos=True) for i, m in enumerate([2, 9, 5, 3, 12, 4, 7, 2, 6])]
    at_once, _, s1 = run(reqs, SchedulerConfig(min_refill=1), slots=3, decode_steps=4)
    grouped, _, s3 = run(reqs, SchedulerConfig(min_refill=3), slots=3, decode_steps=4)
    assert s3["refills"] == 3 < s1["refills"]
    for r in reqs:
        assert grouped[r.id].completion_token_ids == at_once[r.id].completion_token_ids \
            == expected(r.prompt_token_ids, r.sampling.max_tokens)


def test_longest_first_ends_without_a_lone_tail():
    """Six 2-token requests then one of 21 on 3 slots of 4-step calls: in arrival order the long
    one starts last and decodes alone; longest first it starts at once. A window of 2 sorts only
    within pairs, so the long request still starts last."""
    reqs = [req(i, [4 + i, 9], 2, ignore_eos=True) for i in range(6)] + [req(6, [7, 7, 7], 21, ignore_eos=True)]
    geometry = dict(slots=3, decode_steps=4)
    _, _, arrival = run(reqs, SchedulerConfig(schedule="arrival"), **geometry)
    got, _, longest = run(reqs, SchedulerConfig(schedule="longest_first"), **geometry)
    _, _, windowed = run(reqs, SchedulerConfig(schedule_window=2), **geometry)
    assert longest["decode_calls"] == 5 < arrival["decode_calls"] == 7 == windowed["decode_calls"]
    assert got[6].completion_token_ids == expected([7], 21)


def test_free_slots_are_parked_unless_told_not_to():
    """Slots that free with no request left are released before the next decode call (the fake
    engine then stops advancing them); with park_free_slots off they keep decoding."""
    reqs = [req(i, [5 + i, 6, 7], m, ignore_eos=True) for i, m in enumerate([2, 3, 25])]
    got, calls, parked = run(reqs, slots=3, decode_steps=4)
    _, calls_off, unparked = run(reqs, SchedulerConfig(park_free_slots=False), slots=3, decode_steps=4)
    assert parked["released_slots"] == 2 and unparked.get("released_slots", 0) == 0
    assert [c[1] for c in calls if c[0] == "generate"][-1] == 1  # the long request decodes alone
    assert [c[1] for c in calls_off if c[0] == "generate"][-1] == 3
    assert got[2].completion_token_ids == expected([7], 25)


def test_a_paged_pool_admits_what_fits_and_never_shares_a_page():
    """A pool of 6 pages of 8 tokens for 4 slots: requests wait for pages (page_waits), every
    admission gets pages no live slot holds (the fake engine checks), all are served."""
    reqs = [req(i, [30 + i] * (4 + 3 * (i % 4)), 6 + 5 * (i % 3), ignore_eos=True) for i in range(12)]
    got, _, stats = run(reqs, slots=4, kv_page_size=8, kv_cache_tokens=48)
    assert stats["page_waits"] > 0 and stats["kv_pages"] == 6 and stats["kv_pages_peak"] <= 6
    for r in reqs:
        assert got[r.id].completion_token_ids == expected(r.prompt_token_ids, r.sampling.max_tokens)


def test_a_request_larger_than_the_pool_is_an_error_and_others_are_served():
    got, _, _ = run([req("big", [9] * 30, 34, ignore_eos=True), req("ok", [9, 8, 7], 5, ignore_eos=True)],
                    slots=2, kv_page_size=8, kv_cache_tokens=32)
    assert "KV cache pages" in got["big"].error and got["ok"].completion_token_ids == expected([7], 5)


def test_bad_requests_become_errors_without_touching_the_engine():
    reqs = [req("long", [7] * 33, 4), Request(id="empty", prompt="  "), Request(id="none"),
            req("vocab", [5, 256], 4), Request(id="text", prompt="hi"), req("good", [1, 2], 3, ignore_eos=True)]
    got, calls, _ = run(reqs)
    assert "longer than context_size 32" in got["long"].error
    assert "empty" in got["empty"].error and "empty" in got["none"].error
    assert "outside [0, 256)" in got["vocab"].error and "no tokenizer" in got["text"].error
    assert got["good"].completion_token_ids == [3, 4, 5]
    assert [c for c in calls if c[0] == "prefill"] == [("prefill", 1, 8)]


def test_the_fake_engine_refuses_calls_outside_the_contract():
    """The checks that make the tests above mean something: a bucket or call size the geometry
    lacks, and a page handed to a second live slot, are refused."""
    import numpy as np
    eng = FakeEngine(fake_geometry(slots=2, kv_page_size=8, kv_cache_tokens=32))
    state = eng.init_decode_state()
    with pytest.raises(ContractError, match="bucket"):
        eng.prefill(params=None, padded_tokens=np.zeros((1, 12), np.int32), true_length=[3])
    with pytest.raises(ContractError, match="prompts in one call"):
        eng.prefill(params=None, padded_tokens=np.zeros((3, 8), np.int32), true_length=[3, 3, 3])
    prefix, _ = eng.prefill(params=None, padded_tokens=np.ones((1, 8), np.int32), true_length=[3])
    rows = np.asarray([[0, 1, 4, 4, 4, 4, 4, 4]], np.int32)
    state = eng.insert(prefix, state, [0], rows)
    with pytest.raises(ContractError, match="pages \\[1\\] written for slot 1"):
        eng.insert(prefix, state, [1], np.asarray([[1, 2, 4, 4, 4, 4, 4, 4]], np.int32))
    from engine.engine_api import CachedPrompt  # page 0 holds 3 prompt tokens, not a whole page
    with pytest.raises(ContractError, match="reuses page 0"):
        eng.prefill(params=None, padded_tokens=np.ones((1, 8), np.int32), true_length=[2],
                    existing_prefix=CachedPrompt(state, np.asarray([[0]], np.int32), np.asarray([8], np.int32)))
