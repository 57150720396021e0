"""openai_output: the committed completions and errors -> OpenAI's batch output file.

With `--output_format openai` the job also writes `openai-batch-output.jsonl` in its output
directory, one line per row of OpenAI batch input, shaped as the files OpenAI's Batch API returns:

    {"id": "batch_req_<digest>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": "req_<digest>", "body": <the completion>}}
    {"id": "batch_req_<digest>", "custom_id": ..., "response": null,
     "error": {"code": <from the error row's stage>, "message": <its reason>}}

The body is a chat completion (`"object": "chat.completion"`, the text in `message.content`) when
the row's `url` is /v1/chat/completions, else a text completion (`"object": "text_completion"`,
/v1/completions); its `created` is the start of the run that committed the row, its `model` the
model that served it; a row that asked for n samples (n completions rows, `sample_index` 0..n-1)
is one line with n choices, the prompt counted once in its usage. `logprobs` is null unless the row asked for them; then it is OpenAI's shape for
that endpoint, made from the completions' `logprobs` column (`text_offset` counts characters
from the start of the completion, as vLLM does). Logprobs that are not finite are written as
-9999.0, as JSON has no -Infinity. A token's `bytes` are null where its text, decoded alone, is
not whole (U+FFFD: a token holding part of a character): the column keeps the text, not the bytes.

Which rows: those with a `custom_id` (read.normalize_openai keeps it in the row; Parquet input
with a custom_id column counts too). Plain prompt rows of the same run are not written here,
nor is a line that is not JSON (no custom_id can be read from it): those are only in
completions-*.parquet / errors-*.jsonl.

Why at the end, from the directory: the file is written once by write.FinalizeFn, after healing,
from every committed piece rather than from this run's rows, so a resumed run's file also holds
the rows committed by earlier attempts, each exactly once (the directory holds one record per
key). Each run removes the previous file when it starts (pipeline/preflight.py), so a file that
is there matches the committed rows. Ids are digests of the record's key, so rewriting the file
gives each row the same ids; lines follow the pieces (oldest run first), not the input order, as
in OpenAI's files: match lines by custom_id.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Iterator, Optional

from transforms import fs
from transforms.output_dir import (COMPLETIONS, DUPLICATE, list_pieces, read_manifests, read_records, record_key,
                                   tmp_dir)

OPENAI_OUTPUT = "openai-batch-output.jsonl"
CHAT_URL = "/v1/chat/completions"
# An error row's stage -> the line's error.code.
ERROR_CODES = {"validate": "invalid_request", "read": "invalid_request", DUPLICATE: "duplicate_custom_id",
               "generate": "generation_error"}
# The completions columns a line is made from (url and custom_id are the input row's, passed through).
_COLUMNS = ("id", "custom_id", "url", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "model",
            "logprobs", "sample_index")
_NOT_FINITE = -9999.0


def output_path(output_dir: str) -> str:
    return fs.join(output_dir, OPENAI_OUTPUT)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def _lp(v) -> float:
    return float(v) if v is not None and math.isfinite(v) else _NOT_FINITE


def _token(entry: dict) -> str:
    return entry.get("token") or ""


def chat_logprobs(entries: Optional[list]) -> Optional[dict]:
    """The logprobs column -> chat completions' `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    if entries is None:
        return None

    def one(e):
        tok = e.get("token")
        known = tok is not None and "\ufffd" not in tok  # a token decoded alone may be part of a character
        return {"token": tok or "", "logprob": _lp(e.get("logprob")),
                "bytes": list(tok.encode("utf-8")) if known else None}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.get("top_logprobs") or []]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: Optional[list]) -> Optional[dict]:
    """The logprobs column -> legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}`."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(_token(e))
    return {"tokens": [_token(e) for e in entries], "token_logprobs": [_lp(e.get("logprob")) for e in entries],
            "top_logprobs": [{_token(t): _lp(t.get("logprob")) for t in e.get("top_logprobs") or []}
                             for e in entries],
            "text_offset": offsets}


def _choice(rec: dict, chat: bool) -> dict:
    text, index = rec.get("completion") or "", int(rec.get("sample_index") or 0)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": chat_logprobs(rec.get("logprobs")), "finish_reason": rec.get("finish_reason")}
    return {"index": index, "text": text, "logprobs": completion_logprobs(rec.get("logprobs")),
            "finish_reason": rec.get("finish_reason")}


def response_body(samples: list, chat: bool, created: int, key: str) -> dict:
    """A request's completion rows (one per sample, as completions-*.parquet holds them) as
    OpenAI's response body: one choice per sample, the prompt counted once in the usage."""
    samples = sorted(samples, key=lambda r: int(r.get("sample_index") or 0))
    prompt = int(samples[0].get("prompt_tokens") or 0)
    completion = sum(int(r.get("completion_tokens") or 0) for r in samples)
    kind, prefix = ("chat.completion", "chatcmpl-") if chat else ("text_completion", "cmpl-")
    return {"id": prefix + digest(key), "object": kind, "created": created, "model": samples[0].get("model"),
            "choices": [_choice(r, chat) for r in samples],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def completion_line(samples: list, created: int) -> dict:
    """The output line of a request's completion rows, which carry its input row's custom_id and url."""
    first = samples[0]
    key = str(first["id"])
    chat = str(first.get("url") or "").rstrip("/") == CHAT_URL
    return {"id": "batch_req_" + digest(key), "custom_id": first.get("custom_id"),
            "response": {"status_code": 200, "request_id": "req_" + digest(key),
                         "body": response_body(samples, chat, created, key)},
            "error": None}


def error_line(rec: dict) -> dict:
    """The output line of an error record (a line of errors-*.jsonl) whose row has a custom_id."""
    stage = rec.get("stage") or ""
    return {"id": "batch_req_" + digest(record_key(rec)), "custom_id": rec["row"].get("custom_id"),
            "response": None, "error": {"code": ERROR_CODES.get(stage, stage or "error"), "message": rec.get("reason")}}


def is_openai_row(row) -> bool:
    return isinstance(row, dict) and row.get("custom_id") is not None


def _completions(piece, id_column: str) -> Iterator[list]:
    """A completions piece's requests of OpenAI input, each as its rows (one per sample: a row's
    samples are committed in one piece), with only the columns a line needs."""
    import pyarrow.parquet as pq
    with fs.open_file(piece.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if "custom_id" not in names and id_column != "custom_id":
            return
        by_id: dict = {}
        for batch in pf.iter_batches(batch_size=1024, columns=[c for c in _COLUMNS if c in names]):
            for rec in batch.to_pylist():
                if id_column == "custom_id":  # the id column is not passed through: it is the id
                    rec["custom_id"] = rec["id"]
                if is_openai_row(rec):
                    by_id.setdefault(rec["id"], []).append(rec)
    yield from by_id.values()


def lines(output_dir: str, id_column: str = "id") -> Iterator[dict]:
    """Every output line the directory's committed pieces make (run it on a healed directory)."""
    started = {m["run_id"]: m.get("started") for m in read_manifests(output_dir)}
    now = time.time()
    for piece in list_pieces(output_dir):
        if piece.kind == COMPLETIONS:
            created = int(started.get(piece.run_id) or now)
            for samples in _completions(piece, id_column):
                yield completion_line(samples, created)
        else:
            for rec in read_records(piece):
                if is_openai_row(rec.get("row")):
                    yield error_line(rec)


def write_openai_output(output_dir: str, id_column: str = "id") -> int:
    """(Re)write the directory's OpenAI batch output file, whole or not at all; returns its lines."""
    n = 0
    with fs.publishing(output_path(output_dir), tmp_dir(output_dir)) as f:
        for line in lines(output_dir, id_column):
            f.write((json.dumps(line, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
            n += 1
    return n
