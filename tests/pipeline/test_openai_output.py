"""--output_format openai: OpenAI's batch output file, made from the committed completions and errors.

The conversion on hand-made records; the file made from a directory's committed pieces of two runs
(local and gs://: what a resumed run writes); and one real pipeline run over an OpenAI batch file."""

from __future__ import annotations

import json

import pytest

from tests.pipeline.test_gcs import gcs  # noqa: F401  (the GCS emulator fixture)
from tests.pipeline.test_pipeline import engine_args, read_outputs, run_job, tokenizer_dir, write_jsonl  # noqa: F401
from transforms import fs
from transforms.openai_output import (OPENAI_OUTPUT, chat_logprobs, completion_line, completion_logprobs, error_line,
                                      write_openai_output)

LOGPROBS = [  # the completions' logprobs column, for a completion "Hi!"
    {"token_id": 72, "token": "Hi", "logprob": -0.5,
     "top_logprobs": [{"token_id": 72, "token": "Hi", "logprob": -0.5},
                      {"token_id": 73, "token": "é", "logprob": float("-inf")},
                      {"token_id": 195, "token": "\ufffd", "logprob": -7.0}]},
    {"token_id": 33, "token": "!", "logprob": -1.25,
     "top_logprobs": [{"token_id": 33, "token": "!", "logprob": -1.25}]},
]


def _completion(id_, url, logprobs=None, **row):
    return {"id": id_, "prompt": "p", "completion": "Hi!", "completion_token_ids": [72, 33], "finish_reason": "stop",
            "prompt_tokens": 5, "completion_tokens": 2, "ttft_s": 0.1, "latency_s": 0.2, "model": "tiny",
            "prompt_format": "chat", "logprobs": logprobs,
            "row": {"id": id_, **({"custom_id": id_, "url": url} if url else {}), **row}}


def _flat(rec):
    """A completion record as its completions-*.parquet row reads back: the input row's columns beside it."""
    return {**rec["row"], **{k: v for k, v in rec.items() if k != "row"}}


def test_logprobs_in_each_endpoints_shape():
    chat = chat_logprobs(LOGPROBS)
    assert chat["content"][0] == {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "é", "logprob": -9999.0, "bytes": [195, 169]},
        {"token": "\ufffd", "logprob": -7.0, "bytes": None}]}  # part of a character: its bytes are unknown
    assert [e["token"] for e in chat["content"]] == ["Hi", "!"]
    legacy = completion_logprobs(LOGPROBS)
    assert legacy == {"tokens": ["Hi", "!"], "token_logprobs": [-0.5, -1.25],
                      "top_logprobs": [{"Hi": -0.5, "é": -9999.0, "\ufffd": -7.0}, {"!": -1.25}],
                      "text_offset": [0, 2]}
    assert chat_logprobs(None) is None and completion_logprobs(None) is None
    assert completion_logprobs([]) == {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def test_lines_in_openais_shapes():
    rec = _flat(_completion("c1", "/v1/chat/completions", LOGPROBS))
    line = completion_line([rec], created=1700000000)
    assert line["id"].startswith("batch_req_") and line["custom_id"] == "c1" and line["error"] is None
    assert line == completion_line([rec], created=1700000000)  # ids are the row's, not random
    resp = line["response"]
    assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
    body = resp["body"]
    assert (body["object"], body["created"], body["model"]) == ("chat.completion", 1700000000, "tiny")
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                                "logprobs": chat_logprobs(LOGPROBS), "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    text = completion_line([_flat(_completion("t1", "/v1/completions"))], created=1)["response"]["body"]
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    assert text["choices"] == [{"index": 0, "text": "Hi!", "logprobs": None, "finish_reason": "stop"}]
    # n samples: one line, a choice per sample, the prompt counted once
    second = {**_flat(_completion("t1", "/v1/completions")), "sample_index": 1, "completion": "Yo",
              "completion_tokens": 1, "finish_reason": "length"}
    body = completion_line([second, _flat(_completion("t1", "/v1/completions"))], created=1)["response"]["body"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [(0, "Hi!", "stop"),
                                                                                      (1, "Yo", "length")]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    err = error_line({"id": "b1", "stage": "validate", "reason": "messages must be a non-empty list",
                      "source": "in.jsonl:3", "row": {"id": "b1", "custom_id": "b1", "url": "/v1/chat/completions"}})
    assert err["response"] is None and err["custom_id"] == "b1"
    assert err["error"] == {"code": "invalid_request", "message": "messages must be a non-empty list"}
    dup = error_line({"id": "c1", "stage": "duplicate", "reason": "repeats", "source": "in.jsonl:9",
                      "row": {"custom_id": "c1"}})
    assert dup["error"]["code"] == "duplicate_custom_id" and dup["id"] != line["id"]


def _commit(fn, records):
    fn.setup()
    fn.records = list(records)
    return fn._commit()


@pytest.fixture(params=["local", "gs"])
def output_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("gcs")
    return f"gs://test-bucket/openai-{tmp_path.name}"


def test_file_covers_every_committed_run_once(output_dir):
    """What a resumed run writes: rows committed by an earlier run and this one, a second copy of a
    row (healed away first), error rows; never rows without a custom_id."""
    from transforms.output_dir import heal, write_manifest
    from transforms.write import WriteCompletionsFn, WriteErrorsFn
    first, second = "20260101-000000000-aaaaaa", "20260102-000000000-bbbbbb"
    write_manifest(output_dir, first, {"run_id": first, "started": 1767225600.0})
    write_manifest(output_dir, second, {"run_id": second, "started": 1767312000.0})
    chat = _completion("c1", "/v1/chat/completions", LOGPROBS)
    _commit(WriteCompletionsFn(output_dir, first), [chat, _completion("plain", None)])
    t1 = [{**_completion("t1", "/v1/completions"), "sample_index": k} for k in range(2)]  # a row's n=2 samples
    _commit(WriteCompletionsFn(output_dir, second), [{**t1[0], "samples": t1}, chat])  # c1 again
    _commit(WriteErrorsFn(output_dir, second), [
        {"id": "b1", "stage": "validate", "reason": "bad", "source": "x:2", "row": {"custom_id": "b1", "url": "u"}},
        {"id": "x:9", "stage": "read", "reason": "not JSON", "source": "x:9", "row": {"file": "x", "line": 10}}])
    assert heal(output_dir).removed_records == 1
    assert write_openai_output(output_dir) == 3
    path = fs.join(output_dir, OPENAI_OUTPUT)
    text = fs.read_bytes(path)
    lines = {ln["custom_id"]: ln for ln in map(json.loads, text.decode().splitlines())}
    assert sorted(lines) == ["b1", "c1", "t1"]
    assert lines["c1"]["response"]["body"]["created"] == 1767225600  # committed by the first run
    assert lines["c1"]["response"]["body"]["choices"][0]["logprobs"] == chat_logprobs(LOGPROBS)
    assert lines["t1"]["response"]["body"]["object"] == "text_completion"
    assert [c["index"] for c in lines["t1"]["response"]["body"]["choices"]] == [0, 1]
    assert lines["b1"]["error"]["message"] == "bad"
    write_openai_output(output_dir)
    assert fs.read_bytes(path) == text  # rewriting gives the same file
    assert not fs.list_files(fs.join(output_dir, "_jetbeam", "tmp"), "", ".inprogress")


def test_pipeline_writes_one_line_per_openai_row(tmp_path, tokenizer_dir):
    chat, text = "/v1/chat/completions", "/v1/completions"
    rows = [
        {"custom_id": "chat", "method": "POST", "url": chat,
         "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}},
        {"custom_id": "text", "method": "POST", "url": text, "body": {"model": "m", "prompt": "Say hi", "n": 2}},
        {"custom_id": "chat-lp", "method": "POST", "url": chat,
         "body": {"model": "m", "messages": [{"role": "user", "content": "Yo"}], "logprobs": True, "top_logprobs": 2}},
        {"custom_id": "text-lp", "method": "POST", "url": text,
         "body": {"model": "m", "prompt": "1 2 3", "logprobs": 3}},
        {"custom_id": "bad", "method": "POST", "url": chat, "body": {"model": "m", "messages": []}},
        {"id": "plain", "prompt": "not an OpenAI row"},
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", rows)
    out = tmp_path / "out"
    metrics, _ = run_job([f"--input={src}", f"--output={out}", "--output_format=openai"] + engine_args(tokenizer_dir))
    lines = [json.loads(ln) for ln in (out / OPENAI_OUTPUT).read_text().splitlines()]
    assert metrics["openai_output_lines"] == len(lines) == 5
    by = {ln["custom_id"]: ln for ln in lines}
    assert sorted(by) == ["bad", "chat", "chat-lp", "text", "text-lp"]  # each OpenAI row once, the plain row not
    assert len({ln["id"] for ln in lines}) == 5 and all(ln["id"].startswith("batch_req_") for ln in lines)
    samples: dict = {}
    for c in read_outputs(str(out))[0]:
        samples.setdefault(c["id"], []).append(c)
    assert len(samples["text"]) == 2  # n: 2 -> two completions rows, one line with two choices
    comps = {i: rows[0] for i, rows in samples.items()}
    for cid in ("chat", "text", "chat-lp", "text-lp"):
        ln = by[cid]
        assert set(ln) == {"id", "custom_id", "response", "error"} and ln["error"] is None
        assert ln["response"]["status_code"] == 200 and ln["response"]["request_id"]
        body, c = ln["response"]["body"], comps[cid]
        assert body["object"] == ("chat.completion" if cid.startswith("chat") else "text_completion")
        assert body["model"] == "tiny-llama" and isinstance(body["created"], int) and body["id"]
        generated = sum(r["completion_tokens"] for r in samples[cid])
        assert body["usage"] == {"prompt_tokens": c["prompt_tokens"], "completion_tokens": generated,
                                 "total_tokens": c["prompt_tokens"] + generated}
        rows = sorted(samples[cid], key=lambda r: r["sample_index"])
        assert [ch["index"] for ch in body["choices"]] == [r["sample_index"] for r in rows] == list(range(len(rows)))
        for choice, r in zip(body["choices"], rows):
            assert choice["finish_reason"] == r["finish_reason"]
            got = choice["message"]["content"] if cid.startswith("chat") else choice["text"]
            assert got == r["completion"]
            if cid.startswith("chat"):
                assert choice["message"]["role"] == "assistant"
    assert by["chat"]["response"]["body"]["choices"][0]["logprobs"] is None
    assert by["text"]["response"]["body"]["choices"][0]["logprobs"] is None
    content = by["chat-lp"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(content) == comps["chat-lp"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    assert all(e["bytes"] is None or bytes(e["bytes"]).decode() == e["token"] for e in content)
    legacy = by["text-lp"]["response"]["body"]["choices"][0]["logprobs"]
    n = comps["text-lp"]["completion_tokens"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["text_offset"]) == n
    assert len(legacy["top_logprobs"]) == n and all(1 <= len(t) <= 3 for t in legacy["top_logprobs"])
    assert by["bad"]["response"] is None and by["bad"]["error"]["code"] == "invalid_request"
    assert "messages" in by["bad"]["error"]["message"]
