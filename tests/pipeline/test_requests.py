"""Typed requests, validated once: ValidRequest and its Beam coder, the validation rules and their
error rows, the per-process tokenizer, the shared engine integration, and the batch job's
accounting of bad rows end to end."""

from __future__ import annotations

import datetime
import decimal
import math
import os

import pytest

from engine.config import Settings
from engine.request import RequestError, Result, SamplingParams
from engine.rows import RowValidator, ValidRequest
from tests.pipeline.test_pipeline import (CHAT_TEMPLATE, assert_each_id_once, engine_args,  # noqa: F401
                                          read_outputs, run_job, tokenizer_dir, write_jsonl)
from transforms.requests import ValidRequestCoder, process_tokenizer, row_validator, validate


def tiny_settings(tokenizer_dir, **flat) -> Settings:
    return Settings.from_flat({"model": "tiny-llama", "batch_size": 4, "max_cache_length": 32, "context_size": 16,
                               "max_tokens": 4, "tokenizer_path": os.path.join(tokenizer_dir, "tokenizer.json"),
                               **flat})


@pytest.fixture()
def byte_validator():
    from tests.tiny import byte_tokenizer
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return RowValidator(tok, context_size=16, defaults=SamplingParams(max_tokens=4))


# ---- the coder ----

def test_coder_round_trips_odd_row_values():
    import apache_beam as beam
    from apache_beam.coders import TupleCoder, VarIntCoder
    row = {"when": datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
           "day": datetime.date(2026, 1, 2), "price": decimal.Decimal("12.3400"), "blob": b"\x00\xff",
           "nested": [[1, 2], [], [{"a": None}]], "pair": (1, "x"), "nan": float("nan"), "big": 2**70,
           "text": "ünï\ncode", "none": None}
    sampling = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=2**64 - 1,
                              stop=("###", "END"), stop_token_ids=(2, 9), ignore_eos=True)
    values = [ValidRequest("a", row, "The sky is", (1, 84, 104), sampling, "raw", "in.parquet:3"),
              ValidRequest("b", {}, None, (1, 5), SamplingParams(), "tokens"),
              ValidRequest("c", {"messages": [{"role": "user", "content": "Hi"}]}, "Hi", (1, 72, 105),
                           SamplingParams(temperature=0.1 + 2**-40), "chat")]
    coder = beam.coders.registry.get_coder(ValidRequest)
    assert isinstance(coder, ValidRequestCoder) and coder.to_type_hint() is ValidRequest
    keyed = TupleCoder([VarIntCoder(), coder])  # as the generate step's input is encoded
    for v in values:
        for got in (coder.decode(coder.encode(v)), keyed.decode(keyed.encode((3, v)))[1]):
            assert type(got.prompt_token_ids) is tuple and got.sampling == v.sampling
            assert (got.id, got.prompt, got.prompt_token_ids, got.kind, got.source) == \
                   (v.id, v.prompt, v.prompt_token_ids, v.kind, v.source)
            assert got.row.keys() == v.row.keys()
            for k, x in v.row.items():
                y = got.row[k]
                assert (math.isnan(x) and math.isnan(y)) if k == "nan" else (y == x and type(y) is type(x)), k
    assert coder.encode(values[1]) == coder.encode(values[1])


# ---- the rules, and their error rows ----

def test_valid_rows_are_rendered_and_tokenized_once(byte_validator):
    v = byte_validator({"id": 7, "row": {"prompt": "Hi", "max_tokens": 2}, "source": "a.jsonl:0"})
    # prompt_format auto: a plain prompt goes through the chat template (this one renders content only)
    assert (v.id, v.kind, v.prompt, v.prompt_token_ids[0], len(v.prompt_token_ids)) == ("7", "chat", "Hi", 1, 3)
    raw = byte_validator({"id": "r", "row": {"prompt": "Hi", "prompt_format": "raw"}})
    assert (raw.kind, raw.prompt, raw.prompt_token_ids) == ("raw", "Hi", v.prompt_token_ids)
    assert v.sampling.max_tokens == 2 and v.source == "a.jsonl:0"
    chat = byte_validator({"id": "c", "row": {"messages": [{"role": "user", "content": "Yo"}]}})
    assert (chat.kind, chat.prompt) == ("chat", "Yo")
    assert chat.prompt_token_ids == tuple(byte_validator.tokenizer.encode("Yo"))  # BOS as the engine adds it
    tokens = byte_validator({"id": "t", "row": {"prompt_token_ids": [5, 6.0]}})  # used exactly as given
    assert (tokens.kind, tokens.prompt, tokens.prompt_token_ids) == ("tokens", None, (5, 6))
    req = tokens.to_request(request_id=0, metadata=0)
    assert (req.id, req.prompt_token_ids, req.sampling) == (0, (5, 6), tokens.sampling)


def test_refused_rows_become_validate_error_rows(byte_validator):
    from engine.admission import prompt_ids
    from engine.config import EngineConfig
    from engine.engine_api import geometry_of
    from engine.request import Request
    long_text = "this prompt is far longer than sixteen bytes"
    cases = {
        "too-long": ({"prompt": long_text}, "prompt has 45 tokens, longer than context_size 16"),
        # refused by its length in characters, before tokenizing (one byte token is one character)
        "huge": ({"prompt": "x" * 100_000}, "prompt has 100,000 characters, more than context_size 16 tokens "
                                            "can hold (at most 64 characters with this tokenizer)"),
        "empty": ({"prompt": "   "}, "empty prompt in column 'prompt'"),
        "noprompt": ({"other": 1}, "missing prompt"),
        "msgs-role": ({"messages": [{"content": "no role"}]}, "messages[0] has no role"),
        "msgs-json": ({"messages": "not json"}, "messages is a string but not a JSON list"),
        "msgs-empty": ({"messages": []}, "messages must be a non-empty list"),
        "hot": ({"prompt": "x", "temperature": -0.5}, "temperature"),
        "top-p": ({"prompt": "x", "top_p": 0}, "top_p"),
        "max": ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        "tokens": ({"prompt_token_ids": ["a"]}, "prompt_token_ids must be a non-empty list of integers"),
    }
    for rid, (row, reason) in cases.items():
        rec = validate(byte_validator, {"id": rid, "row": row, "source": f"in.jsonl:{rid}"})
        assert isinstance(rec, dict), rid
        assert (rec["id"], rec["stage"], rec["row"], rec["source"]) == (rid, "validate", row, f"in.jsonl:{rid}")
        assert reason in rec["reason"], (rid, rec["reason"])
    # The length rule and its words are the engine's own.
    geo = geometry_of(EngineConfig(max_cache_length=32, context_size=16), 256, (2,))
    with pytest.raises(RequestError) as e:
        prompt_ids(Request(id=0, prompt=long_text), geo, byte_validator.tokenizer)
    assert str(e.value) == cases["too-long"][1]
    with pytest.raises(RequestError) as e:
        prompt_ids(Request(id=0, prompt="x" * 100_000), geo, byte_validator.tokenizer)
    assert str(e.value) == cases["huge"][1]


def test_chat_template_is_compiled_once_per_text(byte_validator):
    """Rows reuse the compiled template (compiling it cost as much as the rest of a row's
    validation); a new template text is compiled anew; a tokenizer that rendered still pickles."""
    import pickle
    tok = byte_validator.tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    first = tok.render_chat(msgs)
    compiled = tok._compiled_template()
    assert tok.render_chat(msgs) == first and tok._compiled_template() is compiled
    assert pickle.loads(pickle.dumps(tok)).render_chat(msgs) == first
    tok.chat_template = "{{ messages[0].content }}!"
    assert tok.render_chat(msgs) == "hi!"


def test_chat_needs_a_template_and_text_needs_a_tokenizer(byte_validator):
    from dataclasses import replace
    byte_validator.tokenizer.chat_template = None
    rec = validate(byte_validator, {"id": "c", "row": {"messages": [{"role": "user", "content": "Hi"}]}})
    assert rec["stage"] == "validate" and "no chat template" in rec["reason"]
    blind = replace(byte_validator, tokenizer=None)
    assert "no tokenizer" in validate(blind, {"id": "t", "row": {"prompt": "Hi"}})["reason"]
    assert isinstance(validate(blind, {"id": "i", "row": {"prompt_token_ids": [1, 2]}}), ValidRequest)


def test_tokenizer_is_loaded_once_per_process_without_weights(tokenizer_dir):
    import subprocess
    import sys
    from tests import REPO
    settings = tiny_settings(tokenizer_dir)
    tok = process_tokenizer(settings)
    assert tok is process_tokenizer(settings.replace(max_tokens=9, batch_size=2))  # same model source
    assert process_tokenizer(Settings.from_flat({"model": "tiny-llama"})) is None  # a config name has none
    v = row_validator(settings, "text")
    assert (v.tokenizer, v.context_size, v.defaults, v.prompt_column) == (tok, 16, settings.sampling, "text")
    # Validating needs neither JAX nor the engine.
    code = ("import sys; from engine.config import Settings; from transforms.requests import row_validator; "
            f"v = row_validator(Settings.from_flat({{'model': 'tiny-llama', 'tokenizer_path': {settings.source.tokenizer_path!r}}})); "
            "v({'id': 'a', 'row': {'prompt': 'hi'}}); assert 'jax' not in sys.modules and 'engine.llm' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_embedded_model_tokenizer_comes_from_its_gguf_file():
    from engine.default_model import default_model_path
    from engine.model_files import load_tokenizer_for
    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("the embedded default model is not installed")
    tok = load_tokenizer_for(Settings())
    assert tok is not None and tok.chat_template and tok.encode("hi")


def test_validate_step_types_its_output(tokenizer_dir):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to
    from pipeline.build import make_options
    from transforms.validate import Validate
    rows = [{"id": "ok", "row": {"prompt": "Hello"}}, {"id": "bad", "row": {"prompt": ""}}]
    with beam.Pipeline(options=make_options([])) as p:
        out = p | beam.Create(rows) | Validate("prompt", tiny_settings(tokenizer_dir))
        assert out.valid.element_type is ValidRequest
        assert_that(out.valid | beam.Map(lambda v: (v.id, v.kind, len(v.prompt_token_ids))),
                    equal_to([("ok", "chat", 6)]))
        assert_that(out["errors"] | beam.Map(lambda e: (e["id"], e["stage"])), equal_to([("bad", "validate")]),
                    label="errors")


# ---- the shared engine integration ----

class _FakeLLM:
    """generate() echoes each request's prompt ids back, so a test sees what the engine was given."""

    model_name = "fake"

    def __init__(self):
        self.seen = []

    def generate(self, requests):
        for r in requests:
            self.seen.append(r)
            if r.prompt_token_ids[0] == 0:
                yield Result(id=r.id, error="refused by the engine", metadata=r.metadata)
            elif r.prompt_token_ids[0] != 9:  # 9: the engine "loses" it
                yield Result(id=r.id, completion="ok", completion_token_ids=[3], finish_reason="stop",
                             prompt_tokens=len(r.prompt_token_ids), completion_tokens=1, metadata=r.metadata)

    def stats(self):
        from engine.sched_stats import SCHEDULER_STATS
        return {k: 0 for k in SCHEDULER_STATS}


def test_engine_call_serves_prompt_ids_as_validated():
    import threading
    from transforms.serving import EngineCall, EngineMetrics
    holder = type("Holder", (), {"llm": _FakeLLM(), "lock": threading.Lock(), "name": "h", "rows_done": 0,
                                 "tokens_done": 0, "engine_config": {}, "device_info": {}, "load_time_s": 0.0})()
    reqs = [ValidRequest("a", {"k": 1}, "Hi", (1, 72, 105), SamplingParams(), "raw"),
            ValidRequest("b", {}, None, (0, 5), SamplingParams(), "tokens", "in.jsonl:1"),
            ValidRequest("c", {}, None, (9,), SamplingParams(), "tokens")]
    call = EngineCall(holder, reqs, EngineMetrics())
    got = {i: (ok, rec) for i, ok, rec in call}
    assert [r.prompt_token_ids for r in holder.llm.seen] == [(1, 72, 105), (0, 5), (9,)]
    assert got[0][0] and got[0][1]["prompt"] == "Hi" and got[0][1]["row"] == {"k": 1}
    assert got[0][1]["prompt_tokens"] == 3 and got[0][1]["model"] == "fake"
    assert got[1] == (False, {"id": "b", "reason": "refused by the engine", "stage": "generate", "row": {},
                              "source": "in.jsonl:1"})
    assert not got[2][0] and "no result" in got[2][1]["reason"]
    assert call.stats["rows"] == 3 and call.stats["completion_tokens"] == 1 and holder.rows_done == 3
    assert not holder.lock.locked()


# ---- end to end ----

def test_bad_rows_accounting(tmp_path, tokenizer_dir):
    rows = [
        {"id": "ok", "prompt": "fine"},
        {"id": "null", "prompt": None},
        {"id": "empty", "prompt": "   "},
        {"id": "number", "prompt": 42},
        {"id": "noprompt", "other": 1},
        {"id": "neg-max", "prompt": "x", "max_tokens": -1},
        {"id": "float-max", "prompt": "x", "max_tokens": 2.5},
        {"id": "hot", "prompt": "x", "temperature": -0.5},
        {"id": "top-p", "prompt": "x", "top_p": 0},
        {"id": "top-k", "prompt": "x", "top_k": "many"},
        {"id": "seed", "prompt": "x", "seed": -3},
        {"id": "stop", "prompt": "x", "stop": [1, 2]},
        {"id": "msgs-empty", "messages": []},
        {"id": "msgs-bad", "messages": [{"content": "no role"}]},
        {"id": "msgs-type", "messages": "not json"},
        {"id": "too-long", "prompt": "this prompt is far longer than sixteen bytes"},
        {"id": "bad-token", "prompt_token_ids": [1, 999]},
        {"id": "tokens-type", "prompt_token_ids": ["a"]},
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows, raw_lines=["{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000,
                                                                 '{"id": "after-deep", "prompt": "fine"}'])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not a parquet file")
    out = tmp_path / "out"
    metrics, _ = run_job([f"--input={bad},{corrupt}", f"--output={out}"] + engine_args(tokenizer_dir))
    comps, errs = read_outputs(str(out))
    assert sorted(c["id"] for c in comps) == ["after-deep", "ok"]  # a line nested too deep loses only itself
    expected = {r["id"] for r in rows} | {"bad.jsonl:18", "bad.jsonl:19", "bad.jsonl:20", "after-deep",
                                          "corrupt.parquet:file"}
    assert_each_id_once(comps, errs, expected)
    assert metrics["rows_in"] == len(rows) + 5 == metrics["completed"] + metrics["errored"]
    reasons = {e["id"]: (e["stage"], e["reason"]) for e in errs}
    # Everything but what only a loaded engine knows (the model's vocabulary) is refused by validate.
    assert reasons["too-long"] == ("validate", "prompt has 45 tokens, longer than context_size 16")
    assert reasons["bad-token"][0] == "generate" and "999" in reasons["bad-token"][1]
    assert {i for i, (stage, _) in reasons.items() if stage == "validate"} == {r["id"] for r in rows} - {
        "ok", "bad-token"}
    assert reasons["bad.jsonl:20"][0] == "read" and "recursion" in reasons["bad.jsonl:20"][1]
    assert reasons["neg-max"][0] == "validate" and "max_tokens" in reasons["neg-max"][1]
    assert reasons["corrupt.parquet:file"][0] == "read" and "unreadable" in reasons["corrupt.parquet:file"][1]
    assert reasons["bad.jsonl:18"][0] == "read"
    assert all(e["reason"] for e in errs)
    row_of = {e["id"]: e for e in errs}
    assert row_of["hot"]["row"] == {"id": "hot", "prompt": "x", "temperature": -0.5}  # the row, as JSON
    assert row_of["hot"]["source"].endswith("bad.jsonl:7") and row_of["bad-token"]["source"].endswith("bad.jsonl:16")
    assert metrics["errors_by_stage"]["read"] == 4
    assert metrics["errors_by_stage"]["validate"] == len(rows) - 2 and metrics["errors_by_stage"]["generate"] == 1
