"""What goes into the batcher (`Request`) and what comes out (`Result`).

These are the only types the Beam transforms need from the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from engine.settings import ConfigError, check_fields, setting


class RequestError(ValueError):
    """A request that cannot be served; its message becomes the error row's reason."""


class InvalidSampling(RequestError, ConfigError):
    """A sampling setting out of range: a bad row (RequestError) or a bad flag (ConfigError)."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for (vLLM's names and meanings). The defaults here are the defaults of
    every front end; a row's columns of the same names override them."""

    max_tokens: int = setting(64, "Most tokens generated per request", minimum=1)
    temperature: float = setting(0.0, "Sampling temperature; 0 is greedy", minimum=0)
    top_k: int = setting(0, "Sample from the k most likely tokens; 0 is no cut", minimum=0)
    top_p: float = setting(1.0, "Nucleus sampling: the smallest set of tokens holding this much "
                                "probability, in (0, 1]", maximum=1)
    seed: Optional[int] = setting(None, "Sampling seed; none: drawn per request from random_seed",
                                  minimum=0, maximum=2**64 - 1)
    stop: tuple[str, ...] = setting((), "Stop strings (repeatable), excluded from the completion")
    stop_token_ids: tuple[int, ...] = setting((), "Token ids that end a request, beside the model's EOS")
    ignore_eos: bool = setting(False, "Keep generating past EOS, to max_tokens (benchmarks)")
    n: int = setting(1, "Completions per row, each with its sample_index and its own seed derived from "
                        "the row's seed; they share the prompt's prefill", minimum=1, maximum=256)
    logprobs: Optional[int] = setting(
        None, "Per generated token, its log-probability and this many most likely alternatives "
              "(0-20; the model's float32 distribution before temperature, top-k/top-p and constraints); "
              "none: no logprobs", minimum=0, maximum=20)
    prompt_logprobs: Optional[int] = setting(
        None, "Per prompt token after the first, its log-probability given the tokens before it and this "
              "many most likely alternatives (0-20; scoring prompts); none: off", minimum=0, maximum=20)
    json_schema: Optional[str] = setting(
        None, "Constrain the completion to JSON valid under this JSON Schema (its JSON text; a row may "
              "give the object)")
    regex: Optional[str] = setting(None, "Constrain the completion to match this regular expression")
    choice: tuple[str, ...] = setting((), "Constrain the completion to one of these strings (repeatable)")
    prompt_format: str = setting(
        "auto", "How a text prompt reaches the model: auto = as one user message through the model's chat "
                "template when it has one, else as is; chat = always through the template; raw = as is "
                "(rows and engine.generate; LLM.generate sends strings as given)",
        choices=("auto", "chat", "raw"))

    def __post_init__(self):
        if isinstance(self.stop, (str, list)):  # one stop string, or a JSON list
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.choice, (str, list)):
            object.__setattr__(self, "choice", (self.choice,) if isinstance(self.choice, str) else tuple(self.choice))
        if isinstance(self.json_schema, dict):  # key order kept: the JSON's keys come in that order
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        try:
            check_fields(self)
        except ConfigError as e:
            raise InvalidSampling(f"invalid sampling parameter: {e}") from None
        if not self.top_p > 0:
            raise InvalidSampling(f"invalid sampling parameter: top_p: must be in (0, 1], got {self.top_p!r}")
        if not all(self.stop):
            raise InvalidSampling(f"invalid sampling parameter: stop: strings must not be empty, got {self.stop!r}")
        self._check_constraint()
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSampling(f"invalid sampling parameter: stop_token_ids: must be >= 0, "
                                  f"got {self.stop_token_ids!r}")

    def _check_constraint(self):
        given = [n for n, v in (("json_schema", self.json_schema), ("regex", self.regex), ("choice", self.choice))
                 if v not in (None, ())]
        if len(given) > 1:
            raise InvalidSampling(f"invalid sampling parameter: {' and '.join(given)}: give one constraint, not several")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as e:
                raise InvalidSampling(f"invalid sampling parameter: json_schema: not JSON ({e})") from None
            if not isinstance(schema, dict):
                raise InvalidSampling("invalid sampling parameter: json_schema: must be a JSON object")
        if self.regex is not None and not self.regex:
            raise InvalidSampling("invalid sampling parameter: regex: must not be empty")
        if not all(isinstance(c, str) and c for c in self.choice):
            raise InvalidSampling(f"invalid sampling parameter: choice: strings must not be empty, got {self.choice!r}")

    @property
    def constrained(self) -> bool:
        """Whether the completion must follow a json_schema, regex or choice."""
        return self.json_schema is not None or self.regex is not None or bool(self.choice)


@dataclass
class Request:
    """One prompt: text (tokenized with BOS) or token ids (used exactly as given)."""

    id: Any
    prompt: Optional[str] = None
    prompt_token_ids: Optional[Sequence[int]] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    metadata: Any = None  # carried through untouched (e.g. the input row)


@dataclass
class Result:
    """The outcome of one request: a completion, or an error with its reason."""

    id: Any
    completion: str = ""
    completion_token_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length"; None on error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: Optional[float] = None
    latency_s: Optional[float] = None
    error: Optional[str] = None
    metadata: Any = None
    # with SamplingParams.logprobs: one entry per completion token, OpenAI's shape plus ids:
    # {"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token", "logprob"}, ...]}
    logprobs: Optional[list] = None
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then one entry per
    # prompt token, shaped as the logprobs entries
    prompt_logprobs: Optional[list] = None
    sample_index: int = 0
    # with SamplingParams.n > 1: every sample's Result (sample_index 0..n-1); this one is sample 0
    samples: Optional[list] = None

    def all_samples(self) -> list:
        """The request's completions in sample_index order (itself when n is 1)."""
        return self.samples if self.samples else [self]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        """One JSON object per sample is `[r.to_json() for r in result.all_samples()]`."""
        if self.error is not None:
            return {"id": self.id, "error": self.error}
        return {
            "id": self.id,
            "completion": self.completion,
            "completion_token_ids": list(self.completion_token_ids),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": self.ttft_s,
            "latency_s": self.latency_s,
            **({} if self.logprobs is None else {"logprobs": self.logprobs}),
            **({} if self.prompt_logprobs is None else {"prompt_logprobs": self.prompt_logprobs}),
            "sample_index": self.sample_index,
        }
