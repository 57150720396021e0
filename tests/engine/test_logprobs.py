"""Per-token logprobs (SamplingParams.logprobs): the batcher's accounting against the fake
engine, and values against transformers' float32 log-softmax on a tiny random Llama (the
embedded SmolLM2's check shares its model with tests/engine/test_constraints.py)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
import torch

from engine.batcher import ContinuousBatcher
from engine.fake_engine import FakeEngine, fake_geometry
from engine.request import InvalidSampling, Request, SamplingParams
from tests.hf_fixtures import save_tiny_model, tiny_llama_config

TOL = 1e-3


def test_fake_engine_entries_follow_tokens():
    eng = FakeEngine(fake_geometry(slots=2, decode_steps=2))
    reqs = [Request(id="k3", prompt_token_ids=[5, 10], sampling=SamplingParams(max_tokens=5, logprobs=3)),
            Request(id="off", prompt_token_ids=[7], sampling=SamplingParams(max_tokens=4)),
            Request(id="k0", prompt_token_ids=[20], sampling=SamplingParams(max_tokens=3, logprobs=0))]
    out = {r.id: r for r in ContinuousBatcher(eng, None).run(reqs)}
    assert out["off"].logprobs is None and "logprobs" not in out["off"].to_json()
    for rid, k in (("k3", 3), ("k0", 0)):
        r = out[rid]
        assert [e["token_id"] for e in r.logprobs] == r.completion_token_ids
        for e in r.logprobs:  # the fake model: chosen 0, alternative j is token + j at -j
            assert e["logprob"] == 0.0 and e["token"] is None
            assert [(a["token_id"], a["logprob"]) for a in e["top_logprobs"]] == \
                [(e["token_id"] + j, -float(j)) for j in range(k)]
    assert out["k3"].completion_token_ids == [11, 12, 13, 14, 15]


@pytest.mark.parametrize("bad", [-1, 21, 2.5, "3"])
def test_out_of_range_refused(bad):
    with pytest.raises(InvalidSampling, match="logprobs"):
        SamplingParams(logprobs=bad)


def check_against(model, prompt_ids, result, k):
    """Our logprobs of each completion token and its top-k against transformers' teacher-forced forward."""
    seq = list(prompt_ids) + list(result.completion_token_ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1).numpy()
    assert len(result.logprobs) == len(result.completion_token_ids) > 0
    for j, e in enumerate(result.logprobs):
        row = ref[len(prompt_ids) - 1 + j]
        assert abs(e["logprob"] - row[e["token_id"]]) <= TOL
        assert len(e["top_logprobs"]) == k
        got = np.array([a["logprob"] for a in e["top_logprobs"]])
        np.testing.assert_allclose(got, np.sort(row)[::-1][:k], atol=TOL)
        for a in e["top_logprobs"]:
            assert abs(a["logprob"] - row[a["token_id"]]) <= TOL


def test_tiny_llama_matches_transformers(tmp_path):
    from engine.llm import LLM
    model = save_tiny_model(tmp_path, tiny_llama_config(), seed=3).eval()
    llm = LLM(str(tmp_path), batch_size=2, max_cache_length=32, context_size=16, decode_steps=2,
              weight_dtype="float32")  # the oracle comparison: float32 matrices as transformers
    prompts = [[1, 40, 41, 42], [1, 90, 7, 8, 9, 10, 11], [1, 5]]
    sampled = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5, temperature=0.8, seed=11)
    reqs = [Request(id=0, prompt_token_ids=prompts[0], sampling=SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5)),
            Request(id=1, prompt_token_ids=prompts[1], sampling=sampled),  # logprobs are before temperature
            Request(id=2, prompt_token_ids=prompts[2], sampling=SamplingParams(max_tokens=6, ignore_eos=True))]
    out = {r.id: r for r in llm.generate(reqs)}
    check_against(model, prompts[0], out[0], 5)
    check_against(model, prompts[1], out[1], 5)
    assert out[2].logprobs is None and len(out[2].completion_token_ids) == 6


def test_prompt_logprobs_match_transformers(tmp_path):
    """prompt_logprobs: None for the first prompt token, then each prompt token's logprob and top-k
    given the tokens before it, within 1e-3 of transformers' float32 log-softmax; two samples of one
    prompt (n = 2) carry the same; the fake engine keeps the accounting (one entry per prompt token)."""
    from engine.batcher import ContinuousBatcher
    from engine.fake_engine import FakeEngine, fake_geometry
    from engine.llm import LLM
    fake = ContinuousBatcher(FakeEngine(fake_geometry()), None)
    r, = fake.run([Request(id=0, prompt_token_ids=[1, 5, 9], sampling=SamplingParams(max_tokens=2, prompt_logprobs=3))])
    assert r.prompt_logprobs[0] is None and [e["token_id"] for e in r.prompt_logprobs[1:]] == [5, 9]
    assert [a["token_id"] for a in r.prompt_logprobs[1]["top_logprobs"]] == [5, 6, 7]
    model = save_tiny_model(tmp_path, tiny_llama_config(), seed=3).eval()
    llm = LLM(str(tmp_path), batch_size=2, max_cache_length=32, context_size=16, decode_steps=2,
              weight_dtype="float32")  # the oracle comparison: float32 matrices as transformers
    prompt = [1, 90, 7, 8, 9, 10, 11]
    out = llm.generate_all([Request(id=0, prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=2, prompt_logprobs=4, n=2, temperature=1.0, seed=1))])[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1).numpy()
    for s in out.all_samples():
        lps = s.prompt_logprobs
        assert lps[0] is None and len(lps) == len(prompt)
        for j, e in enumerate(lps[1:]):
            assert e["token_id"] == prompt[j + 1] and abs(e["logprob"] - ref[j, prompt[j + 1]]) <= TOL
            got = np.array([a["logprob"] for a in e["top_logprobs"]])
            np.testing.assert_allclose(got, np.sort(ref[j])[::-1][:4], atol=TOL)
