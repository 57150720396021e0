"""What goes into the batcher (`Request`) and what comes out (`Result`).

These are the only types the Beam transforms need from the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


class RequestError(ValueError):
    """A request that cannot be served; its message becomes the error row's reason."""


@dataclass
class SamplingParams:
    """Per-request generation settings (vLLM names and meanings)."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    seed: Optional[int] = None  # None: drawn from the batcher's own generator
    stop: Sequence[str] = ()  # stop strings, excluded from the completion
    stop_token_ids: Sequence[int] = ()  # extra stop ids, beside the model's EOS
    ignore_eos: bool = False  # benchmarks: always produce max_tokens

    def validate(self) -> "SamplingParams":
        """Raise RequestError with a clear reason for any invalid field."""
        def bad(msg):
            raise RequestError(f"invalid sampling parameter: {msg}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        return self


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

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
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
        }
