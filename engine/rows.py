"""Rows (dicts from JSONL, Parquet or an OpenAI batch file) -> validated requests, or the reason not.

Shared by the engine CLI, the Beam validate step and the RunInference handler, so all accept the
same rows and give the same reasons. `RowValidator` checks everything up front: the prompt comes
from the prompt column (text, or a list of token ids), else a `prompt_token_ids` column, else a
chat `messages` column rendered with the tokenizer's chat template; text is tokenized (BOS as the
tokenizer adds it) and its length checked against context_size by the engine's own rule
(engine/admission.py). Per-row columns named like the SamplingParams settings (max_tokens,
temperature, top_k, top_p, seed, stop, stop_token_ids, ignore_eos) override the defaults;
null/NaN means "use the default". The result is a frozen `ValidRequest`; what only a loaded
engine knows (token ids beyond the model's vocabulary, a page pool too small) is still refused
by the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from engine.admission import check_prompt_length, encode_prompt
from engine.request import InvalidSampling, Request, RequestError, SamplingParams
from engine.settings import ConfigError, fields_of, from_mapping

# Per-row columns that override the job's sampling defaults: every SamplingParams setting.
SAMPLING_COLUMNS = tuple(f.name for f in fields_of(SamplingParams))


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _coerce(name, v):
    """Row spellings beyond a flag's: a stop list written as JSON text (CSV/Parquet string columns)."""
    if name == "json_schema" and isinstance(v, dict):  # the schema object itself (JSONL, Parquet struct)
        return json.dumps(v)
    if name in ("stop", "choice") and isinstance(v, str) and v.strip().startswith("["):
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
    """A row's parts, checked: `{"id", "row", "prompt" | "prompt_token_ids" | "messages", "sampling"}`;
    raises RequestError(reason). RowValidator goes on to render, tokenize and check the length."""
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


def render_messages(tokenizer, messages: list[dict]) -> str:
    """Messages rendered with the tokenizer's chat template; RequestError(reason) if they cannot be."""
    if tokenizer is None:
        raise RequestError("this model has no tokenizer, so it cannot render chat messages")
    try:
        return tokenizer.render_chat(messages)
    except RequestError:
        raise
    except Exception as e:  # no template, or a template error: a bad row, not a crash
        raise RequestError(f"cannot render messages with the chat template: {e}") from None


PROMPT_KINDS = ("raw", "chat", "tokens")


@dataclass(frozen=True)
class ValidRequest:
    """A row that passed every check: what an engine serves, and the row it came from.

    `prompt` is the text as rendered (None for a token-id prompt); `prompt_token_ids` are the ids
    the engine prefills; `kind` says how the prompt was made: "raw" (text as given), "chat" (messages, or a
    text prompt rendered as one user message: prompt_format) or "tokens"."""

    id: str
    row: Any
    prompt: Optional[str]
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    kind: str
    source: Optional[str] = None  # <file>:<row> of the input row, where known

    def __post_init__(self):
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"ValidRequest.kind must be one of {PROMPT_KINDS}, got {self.kind!r}")

    def to_request(self, request_id: Any = None, metadata: Any = None) -> Request:
        """The engine Request: its prompt ids as validated, never tokenized again."""
        return Request(id=self.id if request_id is None else request_id, prompt=self.prompt,
                       prompt_token_ids=self.prompt_token_ids, sampling=self.sampling, metadata=metadata)


def _as_chat(prompt_format: str, tokenizer) -> bool:
    """Whether a text prompt goes through the chat template (prompt_format "auto": if there is one)."""
    if prompt_format == "chat":
        return True
    return prompt_format == "auto" and getattr(tokenizer, "chat_template", None) is not None


@dataclass(frozen=True)
class RowValidator:
    """Rows -> ValidRequest, with a model's tokenizer (None: token-id prompts only), the engine's
    context_size and the sampling defaults; raises RequestError(reason) for a row that is refused."""

    tokenizer: Any
    context_size: int
    defaults: SamplingParams
    prompt_column: str = "prompt"

    def __call__(self, element: dict) -> ValidRequest:
        """`element` is `{"id", "row"[, "source"]}`, as the read step makes it."""
        spec = to_request_spec(element, self.prompt_column, self.defaults)
        if "prompt_token_ids" in spec:
            kind, prompt, ids = "tokens", None, spec["prompt_token_ids"]
        else:
            if "messages" in spec:
                kind, prompt = "chat", render_messages(self.tokenizer, spec["messages"])
            elif _as_chat(spec["sampling"].prompt_format, self.tokenizer):
                kind, prompt = "chat", render_messages(self.tokenizer, [{"role": "user", "content": spec["prompt"]}])
            else:
                kind, prompt = "raw", spec["prompt"]
            ids = encode_prompt(prompt, self.tokenizer, self.context_size)
        check_prompt_length(ids, self.context_size)
        if spec["sampling"].constrained:  # a constraint that cannot compile is this row's error
            from engine.constraints import check
            check(spec["sampling"], self.tokenizer, self.tokenizer.vocab_size if self.tokenizer is not None else 0)
        return ValidRequest(id=str(element["id"]), row=spec["row"], prompt=prompt,
                            prompt_token_ids=tuple(int(t) for t in ids), sampling=spec["sampling"],
                            kind=kind, source=element.get("source"))
