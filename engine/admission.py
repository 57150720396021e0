"""Admission: requests -> (request, prompt ids) in serving order, or the reason one cannot be served.

The batcher admits what this module lets through: a prompt that tokenizes, fits context_size
and, with a paged cache, fits the page pool with its max_tokens. Offline batches know every
request's max_tokens up front, so `serving_order` can serve each window of requests longest
first (SchedulerConfig.schedule): in a length mix the longest requests decide when a job ends,
and started last they decode alone while the other slots idle.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Union

from engine.config import SchedulerConfig
from engine.engine_api import EngineGeometry
from engine.kv_pages import PagePool
from engine.request import Request, RequestError, Result, SamplingParams


def max_tokens(geo: EngineGeometry, ids: list, req: Request) -> int:
    """Tokens the request can generate: its max_tokens, cut to what the slot's cache holds."""
    return min(req.sampling.max_tokens, geo.max_cache_length - len(ids))


def cache_tokens(geo: EngineGeometry, ids: list, req: Request) -> int:
    """Cache positions a request can write: its prompt and every token but the last."""
    return len(ids) + max_tokens(geo, ids, req) - 1


# Slack on the characters-per-token bound: Unicode normalization (NFKC) may fold a few code
# points into one before the vocabulary sees them.
NORMALIZATION_SLACK = 4


def encode_prompt(prompt, tokenizer, context_size: Optional[int] = None) -> list:
    """Token ids of a text prompt, BOS added as the tokenizer adds it; RequestError if it cannot be.
    With `context_size`, a prompt with more characters than that many tokens can hold is refused
    before tokenizing (a multi-megabyte cell would take seconds and gigabytes to tokenize)."""
    if prompt is None or not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("missing or empty prompt")
    if tokenizer is None:
        raise RequestError("this model has no tokenizer: send prompt_token_ids instead of text")
    if context_size is not None:
        most = NORMALIZATION_SLACK * context_size * tokenizer.max_token_chars()
        if len(prompt) > most:
            raise RequestError(f"prompt has {len(prompt):,} characters, more than context_size {context_size} "
                               f"tokens can hold (at most {most:,} characters with this tokenizer)")
    return tokenizer.encode(prompt)


def check_prompt_length(ids, context_size: int) -> None:
    """The length rule of every prompt: at least one token and at most `context_size`
    (EngineConfig.context_size); RequestError with the reason otherwise. The Beam validate step
    applies this same rule before a row reaches an engine."""
    if not ids:
        raise RequestError("missing or empty prompt")
    if len(ids) > context_size:
        raise RequestError(f"prompt has {len(ids)} tokens, longer than context_size {context_size}")


def prompt_ids(req: Request, geo: EngineGeometry, tokenizer=None, pages: Optional[PagePool] = None) -> list:
    """Token ids of a request's prompt; RequestError with the reason if it cannot be served."""
    if not isinstance(req.sampling, SamplingParams):
        raise RequestError(f"sampling must be a SamplingParams, got {type(req.sampling).__name__}")
    if req.prompt_token_ids is not None:
        ids = [int(t) for t in req.prompt_token_ids]
        bad = [t for t in ids if not 0 <= t < geo.vocab_size]
        if bad:
            raise RequestError(f"prompt_token_ids contains ids outside [0, {geo.vocab_size}): {bad[:5]}")
    else:
        ids = encode_prompt(req.prompt, tokenizer, geo.context_size)
    check_prompt_length(ids, geo.context_size)
    if req.sampling.constrained:
        from engine.constraints import check
        check(req.sampling, tokenizer, geo.vocab_size)
    if pages is not None:
        need = pages.pages_for(cache_tokens(geo, ids, req))
        if need > pages.num_pages:
            raise RequestError(
                f"prompt ({len(ids)} tokens) plus max_tokens needs {need} KV cache pages of "
                f"{geo.kv_page_size} tokens; the pool holds {pages.num_pages} (kv_cache_tokens)")
    return ids


def serving_order(requests: Iterable[Request], scheduler: SchedulerConfig, geo: EngineGeometry, prepare
                  ) -> Iterator[Union[tuple, Result]]:
    """(request, prompt ids) pairs in serving order, and an error Result for each request that
    `prepare` refuses. With schedule "longest_first" requests are read `schedule_window` at a
    time and each window is served longest max_tokens first, then longest prompt; requests equal
    in both keep arrival order."""
    window = scheduler.schedule_window if scheduler.schedule == "longest_first" else 1
    source = iter(requests)
    while True:
        chunk = []
        for req in source:
            try:
                chunk.append((req, prepare(req)))
            except RequestError as e:
                yield Result(id=req.id, error=str(e), metadata=req.metadata)
            if len(chunk) >= window:
                break
        if not chunk:
            return
        if window > 1:
            chunk.sort(key=lambda item: (-max_tokens(geo, item[1], item[0]), -len(item[1])))
        yield from chunk
