"""n samples per request: one Result per request holding n samples, the samples admitted
together sharing one prefill row, each sampling with its own seed derived from the request's."""

from __future__ import annotations

import numpy as np
import pytest

from engine.batcher import ContinuousBatcher
from engine.prefill_calls import SampleGroups, sample_seed
from engine.fake_engine import FakeEngine, fake_geometry
from engine.request import InvalidSampling, Request, SamplingParams
from tests.hf_fixtures import save_tiny_model, tiny_llama_config


def test_n_samples_share_a_prefill_and_come_back_as_one_result():
    """Three requests (n = 3, 1, 6) through four slots: one Result each, with n samples in
    sample_index order; samples admitted together ride one prompt row of a prefill call."""
    eng = FakeEngine(fake_geometry(slots=4, prefill_batch=4))
    b = ContinuousBatcher(eng, None)
    reqs = [Request(id="a", prompt_token_ids=[1, 10], sampling=SamplingParams(max_tokens=3, n=3)),
            Request(id="b", prompt_token_ids=[1, 50], sampling=SamplingParams(max_tokens=2)),
            Request(id="c", prompt_token_ids=[1, 90, 91], sampling=SamplingParams(max_tokens=4, n=6))]
    out = {r.id: r for r in b.run(reqs)}
    assert sorted(out) == ["a", "b", "c"]
    assert [s.sample_index for s in out["a"].all_samples()] == [0, 1, 2]
    assert [s.sample_index for s in out["c"].all_samples()] == list(range(6))
    assert out["b"].samples is None and out["b"].all_samples() == [out["b"]]
    for s in out["c"].all_samples():  # the fake model is deterministic: every sample alike
        assert s.completion_token_ids == [92, 93, 94, 95] and s.finish_reason == "length"
    shared = [c for c in eng.calls if c[0] == "prefill" and len(c) > 3]  # (.., prompts, bucket, rows, cached)
    assert shared and all(c[1] < c[3] for c in shared)
    rows = sum(c[3] if len(c) > 3 else c[1] for c in eng.calls if c[0] == "prefill")
    assert rows == 3 + 1 + 6  # every sample got exactly one prefill row


def test_a_failing_sample_makes_the_request_one_error():
    """One of three samples fails: the request gives one error Result naming the sample, and
    nothing before its last sample is done."""
    from engine.request import Result
    groups = SampleGroups()
    req = Request(id="r", prompt_token_ids=[1, 10], sampling=SamplingParams(n=3))
    assert groups.add(Result(id="r", completion="x", sample_index=2), req) is None
    assert groups.add(Result(id="r", error="grammar rejected token 7", sample_index=1), req) is None
    out = groups.add(Result(id="r", completion="y", sample_index=0), req)
    assert out.error == "sample 1: grammar rejected token 7" and out.samples is None and len(groups) == 0


@pytest.mark.parametrize("bad", [0, 257, -1])
def test_n_out_of_range_refused(bad):
    with pytest.raises(InvalidSampling, match="n"):
        SamplingParams(n=bad)


def test_sample_seeds_are_derived_and_distinct():
    seeds = [sample_seed(7, k) for k in range(64)]
    assert seeds[0] == 7 and len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [sample_seed(7, k) for k in range(64)]  # reproducible


def test_tiny_llama_samples_differ_and_sample_zero_is_the_single_request(tmp_path):
    """Sampled at temperature 1: sample 0 equals the same request with n = 1 (same seed, same
    prefill), the other samples follow their own seeds; greedy samples are all the greedy output."""
    from engine.llm import LLM
    save_tiny_model(tmp_path, tiny_llama_config(), seed=3)
    llm = LLM(str(tmp_path), batch_size=4, max_cache_length=32, context_size=16, decode_steps=2)
    prompt = [1, 40, 41, 42, 43]
    hot = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=5)
    single, many, greedy, greedy_many = llm.generate_all([
        Request(id=0, prompt_token_ids=prompt, sampling=hot),
        Request(id=1, prompt_token_ids=prompt, sampling=SamplingParams(**{**vars(hot), "n": 4})),
        Request(id=2, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8, ignore_eos=True)),
        Request(id=3, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8, ignore_eos=True, n=3))])
    samples = many.all_samples()
    assert [s.sample_index for s in samples] == [0, 1, 2, 3]
    assert samples[0].completion_token_ids == single.completion_token_ids
    assert len({tuple(s.completion_token_ids) for s in samples}) > 1
    assert all(s.completion_token_ids == greedy.completion_token_ids for s in greedy_many.all_samples())
    assert llm.stats()["prefill_rows"] >= 1 + 4 + 1 + 3
    assert np.all([len(s.completion_token_ids) == 8 for s in samples])
