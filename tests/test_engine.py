"""Engine API, continuous batching, sampling and stop handling on the tiny random config."""

from __future__ import annotations

import numpy as np
import pytest

from engine.llm import LLM
from engine.model import prefill as model_prefill
from engine.request import Request, SamplingParams
from tiny import byte_tokenizer

KW = dict(max_cache_length=64, context_size=32, decode_steps=4, prefill_batch=2)


@pytest.fixture(scope="module")
def batched():
    return LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), **KW)


@pytest.fixture(scope="module")
def solo():
    return LLM("tiny-llama", batch_size=1, tokenizer=byte_tokenizer(), **KW)


def _mixed_requests(n, seed=0, **sp):
    rng = np.random.default_rng(seed)
    return [Request(id=i, prompt_token_ids=[int(t) for t in rng.integers(3, 256, size=int(rng.integers(1, 31)))],
                    sampling=SamplingParams(max_tokens=int(rng.integers(1, 24)), ignore_eos=True, **sp))
            for i in range(n)]


def _clone(r: Request) -> Request:
    import dataclasses
    return Request(id=r.id, prompt=r.prompt, prompt_token_ids=r.prompt_token_ids,
                   sampling=dataclasses.replace(r.sampling))


def test_engine_api_decode_matches_full_forward(batched):
    """prefill -> insert -> generate (JetStream contract) gives the tokens a full forward predicts."""
    eng, params = batched.engine, batched.params
    state = eng.init_decode_state()
    prompt = [1, 17, 99, 4, 250]
    padded = np.zeros(eng.bucket_for(len(prompt)), np.int32)
    padded[:len(prompt)] = prompt
    prefix, first = eng.prefill(params=params, padded_tokens=padded, true_length=len(prompt))
    state = eng.insert(prefix, state, 1)
    state, res = eng.generate(params, state)
    slot = res.to_host().get_result_at_slot(1)
    seq = prompt + [int(first.tokens[0, 0])] + [int(t) for t in slot.tokens]
    assert list(slot.lengths) == [len(prompt) + 1 + i for i in range(eng.config.decode_steps)]
    assert slot.valid.all()
    logits, _, _ = model_prefill(params, batched.model_config, np.asarray([seq]), eng.dtype, all_logits=True)
    predicted = np.argmax(np.asarray(logits[0]), -1)
    assert list(predicted[len(prompt) - 1:-1]) == seq[len(prompt):]


def test_continuous_batching_equals_solo(batched, solo):
    reqs = _mixed_requests(12)  # 4x the 3 slots, prompt lengths 1..30 over 2 buckets
    together = batched.generate_all([_clone(r) for r in reqs])
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    for t, a, r in zip(together, alone, reqs):
        assert t.ok and a.ok
        assert t.completion_token_ids == a.completion_token_ids
        assert t.completion_tokens == r.sampling.max_tokens and t.finish_reason == "length"
        assert t.prompt_tokens == len(r.prompt_token_ids)


def test_prefill_computes_no_padding_rows():
    """A same-bucket group splits into power-of-two prefill calls exactly (7 = 4 + 2 + 1)."""
    llm = LLM("tiny-llama", batch_size=7, tokenizer=byte_tokenizer(), **dict(KW, prefill_batch=4))
    assert llm.engine.prefill_sizes() == [1, 2, 4]
    reqs = [Request(id=i, prompt_token_ids=[5 + i] * 3, sampling=SamplingParams(max_tokens=2, ignore_eos=True))
            for i in range(7)]
    assert all(r.ok for r in llm.generate_all(reqs))
    stats = llm.batcher.stats
    assert stats["prefill_rows"] == 7 and stats["prefill_calls"] == 3


def test_short_prompts_share_a_longer_prefill_call(solo):
    """Prompts from two buckets (16 and 32) go through one prefill call, padded to 32, and give
    the tokens each gives alone."""
    llm = LLM("tiny-llama", batch_size=4, tokenizer=byte_tokenizer(), **dict(KW, prefill_batch=4))
    reqs = [Request(id=i, prompt_token_ids=list(range(7, 7 + n)), sampling=SamplingParams(max_tokens=5, ignore_eos=True))
            for i, n in enumerate([3, 30, 5, 20])]
    together = llm.generate_all([_clone(r) for r in reqs])
    assert llm.batcher.stats["prefill_calls"] == 1
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    assert [r.completion_token_ids for r in together] == [r.completion_token_ids for r in alone]


def test_a_refilled_slot_is_parked_again_when_it_frees_again(batched):
    b = batched.batcher
    b.stats.clear()
    parked = set()
    b._park([0], parked)  # slot 0 free, no refill: released
    b._park([0], parked)  # still parked: nothing to do
    b._park([], parked)  # refilled: live again
    b._park([0], parked)  # free again: released again
    assert b.stats["released_slots"] == 2 and parked == {0}


def test_results_stream_in_completion_order(batched):
    reqs = [Request(id="long", prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=30, ignore_eos=True)),
            Request(id="short", prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=2, ignore_eos=True))]
    assert [r.id for r in batched.generate(reqs)] == ["short", "long"]


def test_seeded_sampling_is_independent_of_batch(batched, solo):
    sp = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    target = Request(id="t", prompt_token_ids=[1, 40, 41, 42], sampling=SamplingParams(**sp))
    others = _mixed_requests(5, seed=7, temperature=1.0)
    with_others = {r.id: r for r in batched.generate([_clone(r) for r in others[:2]] + [_clone(target)]
                                                     + [_clone(r) for r in others[2:]])}["t"]
    alone = solo.generate_all([_clone(target)])[0]
    assert with_others.completion_token_ids == alone.completion_token_ids
    other_seed = solo.generate_all([Request(id="t", prompt_token_ids=[1, 40, 41, 42],
                                            sampling=SamplingParams(**dict(sp, seed=99)))])[0]
    greedy = solo.generate_all([Request(id="g", prompt_token_ids=[1, 40, 41, 42],
                                        sampling=SamplingParams(max_tokens=20, ignore_eos=True))])[0]
    assert other_seed.completion_token_ids != alone.completion_token_ids
    assert greedy.completion_token_ids != alone.completion_token_ids


def test_top_k_one_is_greedy(solo):
    base = dict(max_tokens=12, ignore_eos=True)
    greedy = solo.generate_all([Request(id=0, prompt_token_ids=[1, 9, 8], sampling=SamplingParams(**base))])[0]
    topk1 = solo.generate_all([Request(id=0, prompt_token_ids=[1, 9, 8],
                                       sampling=SamplingParams(temperature=5.0, top_k=1, seed=3, **base))])[0]
    assert topk1.completion_token_ids == greedy.completion_token_ids


def test_stop_token_ids_and_strings(batched):
    prompt = "The tiny model says"
    free = batched.generate_all([Request(id=0, prompt=prompt, sampling=SamplingParams(max_tokens=16, ignore_eos=True))])[0]
    toks = free.completion_token_ids
    assert len(toks) == 16 and free.completion == batched.tokenizer.decode(toks)
    stop_id = toks[5]
    r = batched.generate_all([Request(id=1, prompt=prompt, sampling=SamplingParams(
        max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id]))])[0]
    assert r.finish_reason == "stop" and r.completion_token_ids == toks[:toks.index(stop_id)]
    text = free.completion
    stop = text[6:9]
    assert stop
    r = batched.generate_all([Request(id=2, prompt=prompt, sampling=SamplingParams(
        max_tokens=16, ignore_eos=True, stop=[stop]))])[0]
    assert r.finish_reason == "stop" and r.completion == text[:text.find(stop)]


def test_eos_stops_unless_ignored(solo):
    free = solo.generate_all([Request(id=0, prompt_token_ids=[1, 3, 4], sampling=SamplingParams(
        max_tokens=10, ignore_eos=True))])[0]
    eos = free.completion_token_ids[3]
    solo.batcher.eos_ids = frozenset({eos})
    try:
        r = solo.generate_all([Request(id=0, prompt_token_ids=[1, 3, 4], sampling=SamplingParams(max_tokens=10))])[0]
    finally:
        solo.batcher.eos_ids = frozenset(solo.model_config.eos_token_ids)
    assert r.finish_reason == "stop"
    assert r.completion_token_ids == free.completion_token_ids[:free.completion_token_ids.index(eos)]


def test_bad_requests_are_errors_and_others_unaffected(batched):
    good = _mixed_requests(3, seed=3)
    bad = [
        Request(id="long", prompt_token_ids=[7] * 33),
        Request(id="empty", prompt="   "),
        Request(id="none"),
        Request(id="vocab", prompt_token_ids=[5, 256]),
        Request(id="temp", prompt="hi", sampling=SamplingParams(temperature=-1)),
        Request(id="topp", prompt="hi", sampling=SamplingParams(top_p=0)),
        Request(id="maxtok", prompt="hi", sampling=SamplingParams(max_tokens=0)),
    ]
    reference = batched.generate_all([_clone(r) for r in good])
    mixed = {r.id: r for r in batched.generate([bad[0], _clone(good[0]), *bad[1:4], _clone(good[1]),
                                                 *bad[4:], _clone(good[2])])}
    assert len(mixed) == len(good) + len(bad)
    for b in bad:
        assert mixed[b.id].error and not mixed[b.id].ok
    assert "longer than context_size 32" in mixed["long"].error
    assert "empty" in mixed["empty"].error and "empty" in mixed["none"].error
    assert "temperature" in mixed["temp"].error and "top_p" in mixed["topp"].error
    assert "max_tokens" in mixed["maxtok"].error
    for g, ref in zip(good, reference):
        assert mixed[g.id].completion_token_ids == ref.completion_token_ids


def _run_with(llm, reqs, stat: str, **policy):
    """Serve clones of `reqs` with batcher policy fields of the live engine's config changed
    (they are read per run, not compiled in); return the results and one batcher stat."""
    old = {k: getattr(llm.engine.config, k) for k in policy}
    for k, v in policy.items():
        setattr(llm.engine.config, k, v)
    llm.batcher.stats.clear()
    try:
        return llm.generate_all([_clone(r) for r in reqs]), llm.batcher.stats[stat]
    finally:
        for k, v in old.items():
            setattr(llm.engine.config, k, v)


def test_early_refill_skips_the_wasted_decode_call(batched):
    """Two waves of 3 requests that all end together (1 prefill token + 8 decode tokens = 2
    calls of 4 steps each): refilling as soon as the dispatched calls cover max_tokens runs
    4 decode calls; refilling after reading the tokens runs a 3rd call per wave for nothing.
    Tokens are the same either way."""
    reqs = [Request(id=i, prompt_token_ids=[3 + i, 7, 9], sampling=SamplingParams(max_tokens=9, ignore_eos=True))
            for i in range(6)]
    early, early_calls = _run_with(batched, reqs, "decode_calls", early_refill=True)
    late, late_calls = _run_with(batched, reqs, "decode_calls", early_refill=False)
    assert early_calls == 4 and late_calls == 6
    assert [r.completion_token_ids for r in early] == [r.completion_token_ids for r in late]
    assert all(r.completion_tokens == 9 and r.finish_reason == "length" for r in early)


def test_min_refill_waits_for_fuller_prefill_calls(batched):
    """min_refill=3 on 3 slots: slots are refilled only when all three are free (or the
    requests run out), so 9 requests of different lengths take 3 refills; refilling at once
    takes more. Every request still completes with the same tokens."""
    reqs = _mixed_requests(9, seed=5)
    at_once, n_at_once = _run_with(batched, reqs, "refills", min_refill=1)
    batched3, n_batched3 = _run_with(batched, reqs, "refills", min_refill=3)
    assert n_batched3 == 3 < n_at_once
    assert [r.completion_token_ids for r in batched3] == [r.completion_token_ids for r in at_once]
    assert [r.completion_tokens for r in batched3] == [r.sampling.max_tokens for r in reqs]


def test_longest_first_ends_without_a_lone_tail(batched):
    """Six 2-token requests then one of 21 tokens, on 3 slots of 4-step calls: in arrival order
    the long one starts last and decodes alone for 5 calls; served longest first it starts at
    once and the short ones pass through the other two slots meanwhile. Same tokens each way."""
    reqs = [Request(id=i, prompt_token_ids=[4 + i, 9], sampling=SamplingParams(max_tokens=2, ignore_eos=True))
            for i in range(6)]
    reqs.append(Request(id=6, prompt_token_ids=[7, 7, 7], sampling=SamplingParams(max_tokens=21, ignore_eos=True)))
    arrival, arrival_calls = _run_with(batched, reqs, "decode_calls", schedule="arrival")
    longest, longest_calls = _run_with(batched, reqs, "decode_calls", schedule="longest_first")
    assert longest_calls == 5 < arrival_calls == 7
    assert [r.completion_token_ids for r in longest] == [r.completion_token_ids for r in arrival]
    assert [r.completion_tokens for r in longest] == [2] * 6 + [21]
    # A window of 2 sorts only within pairs: the long request is in the last window, so it
    # still starts last.
    _, windowed_calls = _run_with(batched, reqs, "decode_calls", schedule_window=2)
    assert windowed_calls == arrival_calls


def test_refill_policies_give_every_request_its_solo_tokens(batched, solo):
    """Under each refill policy, a mix of lengths (max_tokens 1 included: done at prefill) and
    stop tokens (ending requests before max_tokens, after their slot may have been refilled
    early) gives every request the tokens and finish reason it gets alone."""
    reqs = _mixed_requests(10, seed=11)
    # Every residue mod decode_steps (4), so a request ends at each step of a call.
    for r, m in zip(reqs, [17, 4, 1, 19, 6, 1, 10, 2, 8, 3]):
        r.sampling.max_tokens = m
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    for r, a in zip(reqs, alone):  # stop on the 3rd token for some: a stop before max_tokens
        if r.sampling.max_tokens > 3 and r.id % 3 == 0:
            r.sampling.stop_token_ids = [a.completion_token_ids[2]]
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    assert any(a.finish_reason == "stop" for a in alone)
    for early, min_refill in ((True, 2), (False, 3), (True, 3)):
        got, _ = _run_with(batched, reqs, "refills", early_refill=early, min_refill=min_refill)
        assert [(g.completion_token_ids, g.finish_reason) for g in got] == \
            [(a.completion_token_ids, a.finish_reason) for a in alone], (early, min_refill)


def test_released_slot_is_parked_and_others_unaffected(batched):
    """release_slots parks a slot at position 0 (its decode reads one cache row, not a stale
    sequence growing to the end of the cache) and leaves the other slots' tokens unchanged."""
    eng, params = batched.engine, batched.params

    def run(release: bool):
        state = eng.init_decode_state()
        for slot, prompt in ((0, [1, 17, 99, 4]), (1, [1, 8, 8, 8, 8, 30])):
            padded = np.zeros(eng.bucket_for(len(prompt)), np.int32)
            padded[:len(prompt)] = prompt
            prefix, _ = eng.prefill(params=params, padded_tokens=padded, true_length=len(prompt))
            state = eng.insert(prefix, state, slot)
        state, first = eng.generate(params, state)
        if release:
            state = eng.release_slots(state, np.array([False, True, False]))
        state, res = eng.generate(params, state)
        return first.to_host(), res.to_host(), np.asarray(state.pos)

    f0, kept, pos_kept = run(False)
    f1, parked, pos_parked = run(True)
    assert list(f0.tokens[1]) == list(f1.tokens[1])  # the call before the release is the same
    assert list(parked.lengths[1]) == [0] * 4 and not parked.valid[1].any()
    assert pos_parked[1] == 0 and pos_kept[1] == 6 + 8
    assert list(parked.tokens[0]) == list(kept.tokens[0]) and pos_parked[0] == pos_kept[0] == 4 + 8
    assert pos_kept[2] == pos_parked[2] == 0  # never filled: parked from the start


def test_batcher_parks_slots_left_free(batched, solo):
    """Slots that free while no request is left to take them are released before the next
    decode call; the remaining requests' tokens are those they get alone."""
    reqs = [Request(id=i, prompt_token_ids=[5 + i, 6, 7], sampling=SamplingParams(max_tokens=m, ignore_eos=True))
            for i, m in enumerate([2, 3, 25])]
    together, released = _run_with(batched, reqs, "released_slots")
    unparked, none_released = _run_with(batched, reqs, "released_slots", park_free_slots=False)
    assert released == 2 and none_released == 0
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    assert [r.completion_token_ids for r in together] == [r.completion_token_ids for r in alone]
    assert [r.completion_token_ids for r in unparked] == [r.completion_token_ids for r in alone]


def test_cache_full_ends_with_length(solo):
    prompt = [1] + [10] * 29  # 30 of the 64 cache positions
    r = solo.generate_all([Request(id=0, prompt_token_ids=prompt,
                                   sampling=SamplingParams(max_tokens=500, ignore_eos=True))])[0]
    assert r.finish_reason == "length" and r.completion_tokens == 64 - 30


def test_sampling_paths_agree(solo):
    """A slot's draw is the same whichever sampling path its batch takes (no filter vs top-k/top-p)."""
    import jax.numpy as jnp
    from engine.sampling import SlotSampling, sample
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 256)).astype(np.float32))
    keys = np.stack([np.asarray([0, 11], np.uint32)] * 2)
    plain = SlotSampling(np.float32([0.8, 0.8]), np.int32([0, 0]), np.float32([1, 1]), keys)
    mixed = SlotSampling(np.float32([0.8, 0.8]), np.int32([0, 5]), np.float32([1, 1]), keys)
    for step in range(5):
        st = jnp.full((2,), step)
        a, b = np.asarray(sample(logits, plain, st)), np.asarray(sample(logits, mixed, st))
        assert a[0] == b[0]  # slot 0 has no filter in both batches
        top5 = np.argsort(-np.asarray(logits[1]))[:5]
        assert b[1] in top5


def test_warmup_compiles_every_shape_up_front(batched):
    """Warm-up compiles every prefill shape, insert and decode step; serving a mixed batch
    afterwards lowers nothing new, and gives the tokens of an engine that compiled lazily."""
    import jax
    lowered = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: lowered.append(name) if name.endswith("jaxpr_to_mlir_module_duration") else None)
    llm = LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), warmup=True, **KW)
    eng = llm.engine
    shapes = len(eng.buckets) * len(eng.prefill_sizes())
    assert shapes == 4 and len(lowered) >= 2 * shapes + len(eng.decode_windows())
    reqs = _mixed_requests(8, seed=3)  # prompt lengths over both buckets, lone and batched refills
    n = len(lowered)
    warm = llm.generate_all([_clone(r) for r in reqs])
    assert len(lowered) == n, "serving compiled a shape the warm-up missed"
    lazy = batched.generate_all([_clone(r) for r in reqs])
    assert [r.completion_token_ids for r in warm] == [r.completion_token_ids for r in lazy]


def test_decode_windows_cross_boundaries():
    """Generation past the 128-token attention window (cache 320) still equals full-forward argmax."""
    llm = LLM("tiny-llama", batch_size=2, max_cache_length=320, context_size=16, decode_steps=8)
    assert llm.engine.decode_windows() == [128, 256, 320]
    prompts = [[1, 50, 60, 70, 80], [1, 9]]
    res = llm.generate_all([Request(id=i, prompt_token_ids=p, sampling=SamplingParams(max_tokens=280, ignore_eos=True))
                            for i, p in enumerate(prompts)])
    for p, r in zip(prompts, res):
        seq = p + r.completion_token_ids
        assert len(seq) > 256
        logits, _, _ = model_prefill(llm.params, llm.model_config, np.asarray([seq]), llm.engine.dtype, all_logits=True)
        predicted = np.argmax(np.asarray(logits[0]), -1)
        assert list(predicted[len(p) - 1:-1]) == seq[len(p):]


def test_filter_mask_matches_sorted_definition():
    """Bisection thresholds keep exactly the tokens the sort-based top-k / top-p definition keeps."""
    import jax.numpy as jnp
    from engine.sampling import _keep_mask
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 300)).astype(np.float32) * 3
    top_k = np.int32([0, 1, 7, 50, 0, 20])
    top_p = np.float32([1.0, 1.0, 1.0, 0.9, 0.5, 0.3])
    got = np.asarray(_keep_mask(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for row in range(6):
        order = np.argsort(-logits[row])
        keep = np.ones(300, bool) if top_k[row] == 0 else np.isin(np.arange(300), order[:top_k[row]])
        p = np.exp(logits[row] - logits[row].max()) * keep
        p /= p.sum()
        ps = p[order]
        cum_before = np.cumsum(ps) - ps
        kept_sorted = order[(cum_before < top_p[row]) & keep[order]]
        want = np.isin(np.arange(300), kept_sorted) if top_p[row] < 1 else keep
        assert (got[row] == want).all(), row


@pytest.mark.parametrize("kv8,page", [(False, 0), (True, 0), (False, 8)])
def test_gemma2_decode_matches_full_forward(kv8, page):
    """Gemma 2's sliding window (8) and soft-caps hold in decode through the cache, past the
    window; also through a paged cache (8-token pages, gathered for the XLA path)."""
    llm = LLM("tiny-gemma2", batch_size=2, max_cache_length=64, context_size=16, decode_steps=4,
              quantize_kv_cache=kv8, kv_page_size=page)
    assert llm.engine.attention_impl == "xla" and llm.model_config.sliding_layers == (0, 2)
    prompt = [2, 40, 41, 42, 43, 44]
    r = llm.generate_all([Request(id=0, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=24, ignore_eos=True))])[0]
    seq = prompt + r.completion_token_ids
    logits, _, _ = model_prefill(llm.params, llm.model_config, np.asarray([seq]), llm.engine.dtype, all_logits=True)
    predicted = np.argmax(np.asarray(logits[0]), -1)[len(prompt) - 1:-1]
    agree = np.mean(predicted == np.asarray(seq[len(prompt):]))
    assert agree == 1.0 if not kv8 else agree >= 0.9, agree
