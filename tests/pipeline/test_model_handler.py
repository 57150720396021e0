"""RunInference's JetbeamModelHandler: the batch job's validation, engine and records, through
Beam's RunInference on the tiny-llama config (the same engine settings as the pipeline tests, so
the process's engine is loaded once)."""

from __future__ import annotations

import json
import os

import pytest

from engine.request import Request, SamplingParams
from tests.pipeline.test_pipeline import tokenizer_dir  # noqa: F401


def make_handler(tokenizer_dir, **flat):
    from transforms.model_handler import JetbeamModelHandler
    return JetbeamModelHandler(model="tiny-llama", batch_size=4, max_cache_length=32, context_size=16,
                               tokenizer_path=os.path.join(tokenizer_dir, "tokenizer.json"), **flat)


_RESULTS: list = []  # module level: Beam runs a pickled copy of the check, in this process


def _example_key(example) -> str:
    return json.dumps(example if not isinstance(example, Request) else repr(example), default=str)


def _collect(results):
    _RESULTS.extend((_example_key(r.example), r.inference, r.model_id) for r in results)


def run_inference(handler, examples, **kw) -> dict:
    """{json of the example: (inference record, model_id)}, in the examples' order, from a real
    RunInference pipeline."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that
    from pipeline.build import make_options
    _RESULTS.clear()
    with beam.Pipeline(options=make_options([])) as p:
        assert_that(p | beam.Create(examples, reshuffle=False) | RunInference(handler, **kw), _collect)
    got = {k: (inference, model) for k, inference, model in _RESULTS}
    assert len(_RESULTS) == len(got) == len(examples)
    return {_example_key(e): got[_example_key(e)] for e in examples}


def test_run_inference_model_handler(tokenizer_dir):
    handler = make_handler(tokenizer_dir, max_tokens=3)
    long_text = "this prompt is far longer than sixteen bytes"
    request = Request(id="r", prompt_token_ids=[1, 7, 8], sampling=SamplingParams(max_tokens=2))
    examples = ["Hello", [1, 5, 6], {"messages": [{"role": "user", "content": "Hi"}]},
                {"id": "x1", "prompt": "x", "max_tokens": 1}, "", long_text, {"prompt": "y", "top_p": 0},
                request, 3.5, [1, 999]]
    out = list(run_inference(handler, examples).values())
    served, errors = out[:4] + [out[7]], out[4:7] + out[8:]
    for rec, model in served:
        assert model == "tiny-llama" and "reason" not in rec, rec
        assert 0 < rec["completion_tokens"] <= 3 and rec["finish_reason"] in ("stop", "length")
        assert rec["completion_tokens"] == len(rec["completion_token_ids"]) and rec["model"] == "tiny-llama"
    hello, tokens, chat, one, req = (r for r, _ in served)
    assert hello["prompt"] == "Hello" and hello["prompt_tokens"] == 6  # BOS + 5 bytes, as the batch job counts
    assert tokens["prompt"] is None and tokens["prompt_tokens"] == 3 and tokens["row"] == {"prompt_token_ids": [1, 5, 6]}
    assert chat["prompt"] == "Hi"  # rendered with the chat template
    assert one["id"] == "x1" and one["completion_tokens"] == 1  # the example's own id and sampling columns
    assert req["completion_tokens"] <= 2 and req["prompt_tokens"] == 3
    (empty, _), (long, _), (top_p, _), (odd, _), (vocab, _) = errors
    assert empty["stage"] == "validate" and "empty prompt" in empty["reason"]
    # The same rule and words as the batch job's validate step.
    assert {k: v for k, v in long.items() if k != "id"} == {  # id: the example's place in its batch
        "reason": "prompt has 45 tokens, longer than context_size 16", "stage": "validate",
        "row": {"prompt": long_text}, "source": None}
    assert top_p["stage"] == "validate" and "top_p" in top_p["reason"]
    assert odd["stage"] == "validate" and "unsupported example type float" in odd["reason"]
    assert vocab["stage"] == "generate" and "999" in vocab["reason"]


def test_inference_args_override_the_sampling_defaults(tokenizer_dir):
    handler = make_handler(tokenizer_dir, max_tokens=3)
    out = run_inference(handler, ["Hello", {"prompt": "Hi", "max_tokens": 2}],
                        inference_args={"max_tokens": 1})
    (hello, _), (hi, _) = out.values()
    assert hello["completion_tokens"] == 1 and hi["completion_tokens"] <= 2
    bad = run_inference(handler, ["Hello"], inference_args={"temperature": -1.0})
    ((rec, _),) = bad.values()
    assert rec["stage"] == "validate" and rec["reason"].startswith("inference_args:") and "temperature" in rec["reason"]
    with pytest.raises(ValueError, match="inference_args may only hold sampling settings"):
        handler.validate_inference_args({"batch_size": 3})


def test_the_handler_shares_the_batch_jobs_engine(tokenizer_dir):
    from transforms.serving import acquire_engine
    handler = make_handler(tokenizer_dir, max_tokens=3, temperature=0.5)  # sampling defaults: same engine
    holder = handler.load_model()
    assert holder is acquire_engine(handler.settings.replace(temperature=0.0))
    assert handler.get_metrics_namespace() == "jetbeam"
