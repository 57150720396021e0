"""Validated requests in Beam: the coder of `engine.rows.ValidRequest`, the per-process tokenizer,
and the one validation function the validate step and the RunInference handler share.

A PCollection of ValidRequests is typed (`with_output_types(ValidRequest)`) and encoded by
`ValidRequestCoder`: the request's own fields as canonical JSON, then the input row pickled, so
any Parquet value it carries (datetimes, bytes, decimals, nested lists) passes through unchanged.
"""

from __future__ import annotations

import json
import pickle
import struct
import threading
from dataclasses import asdict
from typing import Optional, Union

import apache_beam as beam
from apache_beam.metrics import Metrics

from engine.config import Settings
from engine.request import RequestError, SamplingParams
from engine.rows import RowValidator, ValidRequest
from transforms.read import NAMESPACE, error_record

__all__ = ["ValidRequest", "ValidRequestCoder", "process_tokenizer", "row_validator", "validate"]

_HEAD = struct.Struct(">I")


class ValidRequestCoder(beam.coders.Coder):
    """ValidRequest <-> bytes: a length-prefixed JSON header (id, prompt, ids, sampling, kind,
    source) and the pickled row. Not deterministic (pickle), so never a key."""

    def encode(self, value: ValidRequest) -> bytes:
        head = json.dumps([value.id, value.prompt, list(value.prompt_token_ids), asdict(value.sampling),
                           value.kind, value.source], sort_keys=True, separators=(",", ":")).encode("utf-8")
        return _HEAD.pack(len(head)) + head + pickle.dumps(value.row, protocol=4)

    def decode(self, encoded: bytes) -> ValidRequest:
        (n,) = _HEAD.unpack_from(encoded)
        rid, prompt, ids, sampling, kind, source = json.loads(encoded[_HEAD.size:_HEAD.size + n])
        return ValidRequest(id=rid, row=pickle.loads(encoded[_HEAD.size + n:]), prompt=prompt,
                            prompt_token_ids=tuple(ids), sampling=SamplingParams(**sampling), kind=kind,
                            source=source)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return ValidRequest


beam.coders.registry.register_coder(ValidRequest, ValidRequestCoder)

# ---- one tokenizer per worker process ----

_TOKENIZERS: dict = {}  # ModelSource -> Tokenizer | None
_TOKENIZERS_LOCK = threading.Lock()


def process_tokenizer(settings: Settings):
    """The tokenizer of `settings`' model, loaded once per process (no weight is read)."""
    from engine.model_files import load_tokenizer_for
    with _TOKENIZERS_LOCK:
        if settings.source not in _TOKENIZERS:
            _TOKENIZERS[settings.source] = load_tokenizer_for(settings)
        return _TOKENIZERS[settings.source]


def row_validator(settings: Settings, prompt_column: str = "prompt",
                  defaults: Optional[SamplingParams] = None) -> RowValidator:
    """The validator of rows for `settings`: its tokenizer, context_size and sampling defaults
    (`defaults` replaces the settings' for RunInference's inference_args)."""
    return RowValidator(process_tokenizer(settings), settings.engine.context_size,
                        settings.sampling if defaults is None else defaults, prompt_column)


_VALID = Metrics.counter(NAMESPACE, "rows_valid")
_INVALID = Metrics.counter(NAMESPACE, "rows_invalid")


def validate(validator: RowValidator, element: dict) -> Union[ValidRequest, dict]:
    """A ValidRequest, or an error record of stage "validate" whose reason names the problem;
    counted in the Beam metrics rows_valid / rows_invalid."""
    try:
        valid = validator(element)
        _VALID.inc()
        return valid
    except RequestError as e:
        reason = str(e)
    except Exception as e:  # anything unexpected about a row is that row's problem
        reason = f"invalid row: {type(e).__name__}: {e}"
    _INVALID.inc()
    return error_record(element.get("id"), reason, "validate", element.get("row"), element.get("source"))
