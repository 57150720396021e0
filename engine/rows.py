"""Rows (dicts from JSONL, Parquet or an OpenAI batch file) -> validated request specs.

Shared by the engine CLI and the Beam validate step, so both accept the same rows and give
the same reasons. A spec is `{"id", "row", "prompt" | "prompt_token_ids" | "messages",
"sampling"}`. The prompt comes from the prompt column (text, or a list of token ids), else a
`prompt_token_ids` column, else a chat `messages` column (rendered later with the model's
chat template, where the tokenizer lives). Per-row columns named like the SamplingParams
settings (max_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids, ignore_eos) override
the defaults; null/NaN means "use the default". Prompt length is checked by the engine, which has the tokenizer.
"""

from __future__ import annotations

import json
import math

from engine.request import InvalidSampling, Request, RequestError, SamplingParams
from engine.settings import ConfigError, fields_of, from_mapping

# Per-row columns that override the job's sampling defaults: every SamplingParams setting.
SAMPLING_COLUMNS = tuple(f.name for f in fields_of(SamplingParams))


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _coerce(name, v):
    """Row spellings beyond a flag's: a stop list written as JSON text (CSV/Parquet string columns)."""
    if name == "stop" and isinstance(v, str) and v.strip().startswith("["):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def sampling_for_row(row: dict, defaults: SamplingParams) -> SamplingParams:
    """The row's SamplingParams: its sampling columns (null/NaN: the default) over `defaults`."""
    given = {k: _coerce(k, row[k]) for k in SAMPLING_COLUMNS if k in row and not _missing(row[k])}
    try:
        return from_mapping(SamplingParams, given, base=defaults)
    except InvalidSampling:
        raise
    except ConfigError as e:
        raise RequestError(f"invalid sampling parameter: {e}") from None


def _token_ids(v):
    """A list of ints (or None if `v` is not one); bools and non-integral floats are refused."""
    if not isinstance(v, (list, tuple)) or not v:
        return None
    out = []
    for t in v:
        if isinstance(t, bool):
            return None
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        if not isinstance(t, int):
            return None
        out.append(t)
    return out


def check_messages(msgs):
    """Parsed messages list, or RequestError saying what is wrong with it."""
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except ValueError:
            raise RequestError("messages is a string but not a JSON list") from None
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise RequestError(f"messages[{i}] has no role")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise RequestError(f"messages[{i}] has non-text content parts (only text is supported)")
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}] content must be a string")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise RequestError("messages are all empty")
    return out


def to_request_spec(element: dict, prompt_column: str, defaults: SamplingParams) -> dict:
    """The validated request spec of a row; raises RequestError(reason)."""
    row = element["row"]
    if not isinstance(row, dict):
        raise RequestError("row is not a record")
    spec = {"id": element["id"], "row": row}
    prompt = row.get(prompt_column)
    if isinstance(prompt, (list, tuple)) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI allows a one-element list of prompts
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RequestError(f"empty prompt in column {prompt_column!r}")
        spec["prompt"] = prompt
    elif isinstance(prompt, (list, tuple)) and prompt:
        ids = _token_ids(prompt)
        if ids is None:
            raise RequestError(f"column {prompt_column!r} must be a string or a list of token ids")
        spec["prompt_token_ids"] = ids
    elif not _missing(prompt) and not isinstance(prompt, (list, tuple)):
        raise RequestError(f"column {prompt_column!r} must be a string, got {type(prompt).__name__}")
    elif not _missing(row.get("prompt_token_ids")):
        ids = _token_ids(row["prompt_token_ids"])
        if ids is None:
            raise RequestError("prompt_token_ids must be a non-empty list of integers")
        spec["prompt_token_ids"] = ids
    elif not _missing(row.get("messages")):
        spec["messages"] = check_messages(row["messages"])
    else:
        raise RequestError(f"missing prompt: no {prompt_column!r}, 'prompt_token_ids' or 'messages' column value")

    spec["sampling"] = sampling_for_row(row, defaults)
    return spec


def spec_to_request(spec: dict, render_chat=None, request_id=None) -> Request:
    """A Request from a validated spec; `render_chat(messages) -> str` renders chat rows."""
    prompt = spec.get("prompt")
    if spec.get("messages") is not None:
        if render_chat is None:
            raise RequestError("chat messages need a model with a chat template")
        prompt = render_chat(spec["messages"])
    return Request(id=spec["id"] if request_id is None else request_id, prompt=prompt,
                   prompt_token_ids=spec.get("prompt_token_ids"), sampling=spec["sampling"],
                   metadata=spec.get("row"))
