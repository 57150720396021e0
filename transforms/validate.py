"""validate: rows -> requests ready for the engine, or error records with a reason.

A row becomes `{"id", "row", "prompt" | "prompt_token_ids" | "messages", "sampling"}`.
The prompt comes from the prompt column (text, or a list of token ids), else a
`prompt_token_ids` column, else a chat `messages` column (rendered with the model's chat
template in the generate step, where the tokenizer lives). Per-row columns named like the
sampling flags (max_tokens, temperature, top_k, top_p, seed, stop) override the defaults;
null/NaN means "use the default". Prompt length is checked by the engine (it needs the
tokenizer): such rows come back from generate as error records.
"""

from __future__ import annotations

import json
import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from engine.request import RequestError, SamplingParams
from transforms.read import ERRORS, NAMESPACE, error_record

SAMPLING_COLUMNS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")
_INT_FIELDS = ("max_tokens", "top_k", "seed")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _coerce(name, v):
    """Column value -> SamplingParams field value; integral floats become ints (pandas/JSON)."""
    if name in _INT_FIELDS and isinstance(v, float) and v.is_integer():
        return int(v)
    if name in _INT_FIELDS and isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    if name in ("temperature", "top_p") and isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    if name == "stop":
        if isinstance(v, str):
            s = v.strip()
            if s.startswith("["):
                try:
                    return tuple(json.loads(s))
                except ValueError:
                    pass
            return (v,)
        if isinstance(v, (list, tuple)):
            return tuple(v)
    return v


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


def to_request_spec(element: dict, prompt_column: str, defaults: dict) -> dict:
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

    sampling = dict(defaults)
    for name in SAMPLING_COLUMNS:
        if name in row and not _missing(row[name]):
            sampling[name] = _coerce(name, row[name])
    sampling["stop"] = tuple(sampling.get("stop") or ())
    SamplingParams(**sampling).validate()  # raises RequestError with the reason
    sampling["stop"] = list(sampling["stop"])
    spec["sampling"] = sampling
    return spec


class ValidateFn(beam.DoFn):
    """rows -> request specs (main) | error records (ERRORS)."""

    def __init__(self, prompt_column: str, sampling_defaults: dict):
        self.prompt_column = prompt_column
        self.defaults = dict(sampling_defaults)
        self.valid = Metrics.counter(NAMESPACE, "rows_valid")
        self.invalid = Metrics.counter(NAMESPACE, "rows_invalid")

    def process(self, element):
        try:
            spec = to_request_spec(element, self.prompt_column, self.defaults)
        except RequestError as e:
            self.invalid.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(element.get("id"), str(e), "validate",
                                                                element.get("row")))
            return
        except Exception as e:  # anything unexpected about a row is that row's problem
            self.invalid.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(
                element.get("id"), f"invalid row: {type(e).__name__}: {e}", "validate", element.get("row")))
            return
        self.valid.inc()
        yield spec


class Validate(beam.PTransform):
    def __init__(self, prompt_column: str, sampling_defaults: dict):
        super().__init__()
        self.prompt_column = prompt_column
        self.defaults = sampling_defaults

    def expand(self, rows):
        return rows | beam.ParDo(ValidateFn(self.prompt_column, self.defaults)).with_outputs(
            ERRORS, main="valid")
