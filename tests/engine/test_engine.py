"""The JAX engine on the tiny random config: the Engine API against a full forward, continuous
batching against solo runs, sampling, stops and bad requests. Scheduling policies are tested
against the fake engine in test_batcher.py; here they are checked to keep every token."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.batcher import ContinuousBatcher
from engine.config import make_settings
from engine.llm import LLM, load_engine
from engine.model import prefill as model_prefill
from engine.request import Request, SamplingParams
from engine.settings import to_mapping
from tests.tiny import byte_tokenizer

KW = dict(max_cache_length=64, context_size=32, decode_steps=4, prefill_batch=2)


@pytest.fixture(scope="module")
def batched():
    return LLM("tiny-llama", batch_size=3, tokenizer=byte_tokenizer(), **KW)


@pytest.fixture(scope="module")
def solo():
    return LLM("tiny-llama", batch_size=1, tokenizer=byte_tokenizer(), **KW)


@pytest.fixture(scope="module")
def loaded():
    """The engine of `batched`, driven through the Engine API directly."""
    return load_engine(make_settings("tiny-llama", batch_size=3, **KW))


def _padded(eng, prompt):
    padded = np.zeros(eng.geometry.bucket_for(len(prompt)), np.int32)
    padded[:len(prompt)] = prompt
    return padded


def _full_forward_argmax(loaded, seq):
    logits, _, _ = model_prefill(loaded.params, loaded.engine.model_config, np.asarray([seq]),
                                 loaded.engine.dtype, all_logits=True)
    return np.argmax(np.asarray(logits[0]), -1)


def _mixed_requests(n, seed=0, **sp):
    rng = np.random.default_rng(seed)
    return [Request(id=i, prompt_token_ids=[int(t) for t in rng.integers(3, 256, size=int(rng.integers(1, 31)))],
                    sampling=SamplingParams(max_tokens=int(rng.integers(1, 24)), ignore_eos=True, **sp))
            for i in range(n)]


def _clone(r: Request) -> Request:
    return Request(id=r.id, prompt=r.prompt, prompt_token_ids=r.prompt_token_ids, sampling=r.sampling)


def test_engine_api_decode_matches_full_forward(loaded):
    """prefill -> insert -> generate (JetStream contract) gives the tokens a full forward predicts."""
    eng, params = loaded.engine, loaded.params
    state = eng.init_decode_state()
    prompt = [1, 17, 99, 4, 250]
    prefix, first = eng.prefill(params=params, padded_tokens=_padded(eng, prompt), true_length=len(prompt))
    state = eng.insert(prefix, state, 1)
    state, res = eng.generate(params, state)
    slot = res.to_host().get_result_at_slot(1)
    seq = prompt + [int(first.tokens[0, 0])] + [int(t) for t in slot.tokens]
    assert list(slot.lengths) == [len(prompt) + 1 + i for i in range(eng.geometry.decode_steps)]
    assert slot.valid.all()
    assert list(_full_forward_argmax(loaded, seq)[len(prompt) - 1:-1]) == seq[len(prompt):]


def test_continuous_batching_equals_solo(batched, solo):
    reqs = _mixed_requests(12)  # 4x the 3 slots, prompt lengths 1..30 over 2 buckets
    together = batched.generate_all([_clone(r) for r in reqs])
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    for t, a, r in zip(together, alone, reqs):
        assert t.ok and a.ok
        assert t.completion_token_ids == a.completion_token_ids
        assert t.completion_tokens == r.sampling.max_tokens and t.finish_reason == "length"
        assert t.prompt_tokens == len(r.prompt_token_ids)


def test_short_prompts_share_a_longer_prefill_call(solo):
    """Prompts from two buckets (16 and 32) go through one prefill call, padded to 32, and give
    the tokens each gives alone."""
    llm = LLM("tiny-llama", batch_size=4, tokenizer=byte_tokenizer(), **dict(KW, prefill_batch=4))
    reqs = [Request(id=i, prompt_token_ids=list(range(7, 7 + n)), sampling=SamplingParams(max_tokens=5, ignore_eos=True))
            for i, n in enumerate([3, 30, 5, 20])]
    together = llm.generate_all([_clone(r) for r in reqs])
    assert llm.stats()["prefill_calls"] == 1
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    assert [r.completion_token_ids for r in together] == [r.completion_token_ids for r in alone]


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
    """The tokenizer's EOS ids end a request (beside the model's), unless ignore_eos."""
    free = solo.generate_all([Request(id=0, prompt_token_ids=[1, 3, 4], sampling=SamplingParams(
        max_tokens=10, ignore_eos=True))])[0]
    eos = free.completion_token_ids[3]
    tok = byte_tokenizer()
    tok.eos_ids = (eos,)
    llm = LLM("tiny-llama", batch_size=1, tokenizer=tok, **KW)
    r = llm.generate_all([Request(id=0, prompt_token_ids=[1, 3, 4], sampling=SamplingParams(max_tokens=10))])[0]
    assert r.finish_reason == "stop"
    assert r.completion_token_ids == free.completion_token_ids[:free.completion_token_ids.index(eos)]


def test_bad_requests_are_errors_and_others_unaffected(batched):
    good = _mixed_requests(3, seed=3)
    bad = [
        Request(id="long", prompt_token_ids=[7] * 33),
        Request(id="empty", prompt="   "),
        Request(id="none"),
        Request(id="vocab", prompt_token_ids=[5, 256]),
        Request(id="sampling", prompt="hi", sampling={"temperature": 0.5}),
    ]
    reference = batched.generate_all([_clone(r) for r in good])
    mixed = {r.id: r for r in batched.generate([bad[0], _clone(good[0]), *bad[1:4], _clone(good[1]),
                                                 *bad[4:], _clone(good[2])])}
    assert len(mixed) == len(good) + len(bad)
    for b in bad:
        assert mixed[b.id].error and not mixed[b.id].ok
    assert "longer than context_size 32" in mixed["long"].error
    assert "empty" in mixed["empty"].error and "empty" in mixed["none"].error
    assert "SamplingParams" in mixed["sampling"].error
    for g, ref in zip(good, reference):
        assert mixed[g.id].completion_token_ids == ref.completion_token_ids


def _run_with(llm, reqs, stat: str, **policy):
    """Serve clones of `reqs` under other scheduler settings (no recompilation); return the
    results and one batcher stat."""
    old = llm.set_scheduler(**policy)
    llm.reset_stats()
    try:
        return llm.generate_all([_clone(r) for r in reqs]), llm.stats().get(stat, 0)
    finally:
        llm.set_scheduler(**to_mapping(old))


def test_refill_policies_give_every_request_its_solo_tokens(batched, solo):
    """Under each refill policy, a mix of lengths (max_tokens 1 included: done at prefill) and
    stop tokens (ending requests before max_tokens, after their slot may have been refilled
    early) gives every request the tokens and finish reason it gets alone."""
    reqs = _mixed_requests(10, seed=11)
    # Every residue mod decode_steps (4), so a request ends at each step of a call.
    for r, m in zip(reqs, [17, 4, 1, 19, 6, 1, 10, 2, 8, 3]):
        r.sampling = dataclasses.replace(r.sampling, max_tokens=m)
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    for r, a in zip(reqs, alone):  # stop on the 3rd token for some: a stop before max_tokens
        if r.sampling.max_tokens > 3 and r.id % 3 == 0:
            r.sampling = dataclasses.replace(r.sampling, stop_token_ids=(a.completion_token_ids[2],))
    alone = [solo.generate_all([_clone(r)])[0] for r in reqs]
    assert any(a.finish_reason == "stop" for a in alone)
    for early, min_refill in ((True, 2), (False, 3), (True, 3)):
        got, _ = _run_with(batched, reqs, "refills", early_refill=early, min_refill=min_refill)
        assert [(g.completion_token_ids, g.finish_reason) for g in got] == \
            [(a.completion_token_ids, a.finish_reason) for a in alone], (early, min_refill)


def test_released_slot_is_parked_and_others_unaffected(loaded):
    """release_slots parks a slot at position 0 (its decode reads one cache row, not a stale
    sequence growing to the end of the cache) and leaves the other slots' tokens unchanged."""
    eng, params = loaded.engine, loaded.params

    def run(release: bool):
        state = eng.init_decode_state()
        for slot, prompt in ((0, [1, 17, 99, 4]), (1, [1, 8, 8, 8, 8, 30])):
            prefix, _ = eng.prefill(params=params, padded_tokens=_padded(eng, prompt), true_length=len(prompt))
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
    loaded = load_engine(make_settings("tiny-llama", batch_size=3, **KW))
    eng = loaded.engine
    batcher = ContinuousBatcher(eng, loaded.params, byte_tokenizer())
    batcher.warmup()
    shapes = len(eng.geometry.prefill_buckets) * len(eng.geometry.prefill_sizes)
    assert shapes == 4 and len(lowered) >= 2 * shapes + len(eng.decode_windows())
    reqs = _mixed_requests(8, seed=3)  # prompt lengths over both buckets, lone and batched refills
    n = len(lowered)
    warm = sorted(batcher.run([_clone(r) for r in reqs]), key=lambda r: r.id)
    assert len(lowered) == n, "serving compiled a shape the warm-up missed"
    lazy = batched.generate_all([_clone(r) for r in reqs])
    assert [r.completion_token_ids for r in warm] == [r.completion_token_ids for r in lazy]


def test_decode_windows_cross_boundaries():
    """Generation past the 128-token attention window (cache 320) still equals full-forward argmax
    (float32 matrices: the comparison is exact arithmetic, not bf16 rounding)."""
    loaded = load_engine(make_settings("tiny-llama", batch_size=2, max_cache_length=320, context_size=16,
                                       decode_steps=8, weight_dtype="float32"))
    assert loaded.engine.decode_windows() == [128, 256, 320]
    prompts = [[1, 50, 60, 70, 80], [1, 9]]
    batcher = ContinuousBatcher(loaded.engine, loaded.params)
    res = sorted(batcher.run([Request(id=i, prompt_token_ids=p, sampling=SamplingParams(max_tokens=280, ignore_eos=True))
                              for i, p in enumerate(prompts)]), key=lambda r: r.id)
    for p, r in zip(prompts, res):
        seq = p + r.completion_token_ids
        assert len(seq) > 256
        assert list(_full_forward_argmax(loaded, seq)[len(p) - 1:-1]) == seq[len(p):]


@pytest.mark.parametrize("misfit", [None, "top_k", "nucleus"])
def test_filter_mask_matches_sorted_definition(misfit):
    """The top-k / top-p mask keeps exactly the tokens the sort-based definition keeps: read off
    the ranked candidates when every row fits in them, by bisection when one row does not
    (a top_k above FILTER_CANDIDATES, or a flat row whose nucleus reaches past them)."""
    import jax.numpy as jnp
    from engine.sampling import FILTER_CANDIDATES, _keep_mask
    vocab = FILTER_CANDIDATES + 44
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(7, vocab)).astype(np.float32) * 3
    top_k = np.int32([0, 1, 7, 50, 0, 20, 3])
    top_p = np.float32([1.0, 1.0, 1.0, 0.9, 0.5, 0.3, 1.0])
    if misfit == "top_k":
        top_k[6] = FILTER_CANDIDATES + 24
    elif misfit == "nucleus":
        logits[6] = rng.normal(size=vocab).astype(np.float32) * 0.01
        top_k[6], top_p[6] = 0, 0.95
    got = np.asarray(_keep_mask(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for row in range(len(logits)):
        order = np.argsort(-logits[row])
        keep = np.ones(vocab, bool) if top_k[row] == 0 else np.isin(np.arange(vocab), order[:top_k[row]])
        p = np.exp(logits[row] - logits[row].max()) * keep
        p /= p.sum()
        ps = p[order]
        cum_before = np.cumsum(ps) - ps
        kept_sorted = order[(cum_before < top_p[row]) & keep[order]]
        want = np.isin(np.arange(vocab), kept_sorted) if top_p[row] < 1 else keep
        assert (got[row] == want).all(), row
    if misfit == "nucleus":
        assert got[6].sum() > FILTER_CANDIDATES


@pytest.mark.parametrize("kv8,page", [(False, 0), (True, 0), (False, 8)])
def test_gemma2_decode_matches_full_forward(kv8, page):
    """Gemma 2's sliding window (8) and soft-caps hold in decode through the cache, past the
    window; also through a paged cache (8-token pages, gathered for the XLA path)."""
    loaded = load_engine(make_settings("tiny-gemma2", batch_size=2, max_cache_length=64, context_size=16,
                                       decode_steps=4, quantize_kv_cache=kv8, kv_page_size=page))
    eng = loaded.engine
    assert eng.describe()["decode_attention"] == "xla" and eng.model_config.sliding_layers == (0, 2)
    prompt = [2, 40, 41, 42, 43, 44]
    r, = ContinuousBatcher(eng, loaded.params).run(
        [Request(id=0, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=24, ignore_eos=True))])
    seq = prompt + r.completion_token_ids
    predicted = _full_forward_argmax(loaded, seq)[len(prompt) - 1:-1]
    agree = np.mean(predicted == np.asarray(seq[len(prompt):]))
    assert agree == 1.0 if not kv8 else agree >= 0.9, agree
