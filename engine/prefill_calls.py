"""What a refill asks of the engine's prefill: work items grouped into calls, each call's arrays,
and the samples of a request gathered back into one Result.

A request with `n` samples is n work items (`WorkItem`), each taking a slot. `plan_calls` splits
the items a refill admits into prefill calls; `PrefillCall.build` makes one call's arrays: one
prompt row per request (its samples share it through `sample_rows`), the tokens left after the
prompt's cached pages (prefix caching) and those pages. With packing on, `plan_packed` and
`PackedCall` put the items that allow it back to back in rows of a few packed sizes instead. `SampleGroups` holds finished samples
until their request's last one is done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from engine.engine_api import CachedPrompt, EngineGeometry
from engine.request import Request, Result

# A prefill call may pad shorter prompts up to its bucket while its padded tokens stay within this.
MERGE_TOKENS = 1024


@dataclass(frozen=True)
class WorkItem:
    """One sample of a request, waiting for a slot."""

    request: Request
    ids: list  # prompt token ids
    sample: int = 0
    hashes: tuple = ()  # prefix hashes of its whole prompt pages (prefix caching)


def sample_seed(seed: int, k: int) -> int:
    """Sample k's seed: the row's own for sample 0, a hash of (seed, k) for the others."""
    if k == 0:
        return seed
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> 1)


def plan_calls(items: list, cached: dict, geo: EngineGeometry) -> Iterator[tuple[int, int, list]]:
    """Split admitted WorkItems into prefill calls: (bucket, context bucket, items) triples.
    `cached[id(item)]`: its prompt tokens already in cached pages; a call takes items of one
    context bucket (0: none cached), bucketed by the tokens left to prefill.

    Longest prompts first. A call takes prompts of its own bucket, and shorter ones too while
    its padded size stays within MERGE_TOKENS: on a GPU a 7B prefill call of a few hundred
    tokens costs about as much as one of a thousand (too few GEMM tiles to fill it), and a
    length mix frees slots a few at a time across several buckets. Call sizes come from
    geometry.prefill_sizes (powers of two), so no row is padding.
    """
    sizes = geo.prefill_sizes
    ctx = lambda it: geo.bucket_for(cached[id(it)]) if cached[id(it)] else 0
    todo = sorted(((geo.bucket_for(len(it.ids) - cached[id(it)]), it) for it in items),
                  key=lambda item: -(len(item[1].ids) - cached[id(item[1])]))
    while todo:
        bucket, context = todo[0][0], ctx(todo[0][1])
        take = []
        for item in todo:
            if len(take) == sizes[-1]:
                break
            if ctx(item[1]) == context and (item[0] == bucket or (len(take) + 1) * bucket <= MERGE_TOKENS):
                take.append(item)
        n = max(s for s in sizes if s <= len(take))  # sizes hold 1: never padded
        picked = {id(item) for item in take[:n]}
        todo = [item for item in todo if id(item) not in picked]
        yield bucket, context, [it for _, it in take[:n]]


def defer_shared_prefixes(items: list, hit, page_size: int) -> tuple[list, list]:
    """(admit now, admit at the next refill): of prompts that start with the same uncached page
    (hit(item): its cached pages), only the first request's prefill runs now; the others wait one
    decode call and then find its pages cached, instead of all prefilling the same prefix."""
    first_page: dict = {}
    now, later = [], []
    for it in items:
        matchable = it.hashes[:(len(it.ids) - 1) // page_size]
        if matchable and it.request.sampling.prompt_logprobs is None and not hit(it):
            if first_page.setdefault(matchable[0], id(it.request)) != id(it.request):
                later.append(it)
                continue
        now.append(it)
    return now, later


def plan_packed(items: list, geo: EngineGeometry) -> Iterator[tuple[int, list]]:
    """Split WorkItems into packed prefill calls: (row length, items) pairs. In the given order,
    a call takes prompts while their tokens fit the largest packed size and its rows last; its
    row is the smallest packed size that holds them."""
    if not items:
        return
    top, group, total = geo.packed_sizes[-1], [], 0
    for it in items:
        if group and (total + len(it.ids) > top or len(group) == geo.packed_rows):
            yield min(t for t in geo.packed_sizes if t >= total), group
            group, total = [], 0
        group.append(it)
        total += len(it.ids)
    if group:
        yield min(t for t in geo.packed_sizes if t >= total), group


def packable(it: WorkItem, cached_tokens: int, geo: EngineGeometry) -> bool:
    """Whether an item may go into a packed call: packing is on, and its prompt has no cached
    pages, no samples sharing it and no prompt logprobs (those take bucketed calls)."""
    sp = it.request.sampling
    return bool(geo.packed_sizes) and not cached_tokens and sp.n == 1 and sp.prompt_logprobs is None


@dataclass
class PackedCall:
    """One packed prefill call: the items' prompts back to back in tokens [T], lengths
    [packed_rows] (rows past the items unused)."""

    items: list
    prompt_row: dict  # id(request) -> its row
    tokens: np.ndarray  # [T]
    lengths: np.ndarray  # [packed_rows]

    @classmethod
    def build(cls, items: list, size: int, geo: EngineGeometry) -> "PackedCall":
        tokens, lengths = np.zeros(size, np.int32), np.zeros(geo.packed_rows, np.int32)
        at = 0
        for row, it in enumerate(items):
            tokens[at:at + len(it.ids)] = it.ids
            lengths[row] = len(it.ids)
            at += len(it.ids)
        return cls(items, {id(it.request): row for row, it in enumerate(items)}, tokens, lengths)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def engine_kwargs(self, decode_state) -> dict:
        return {}

    def run(self, engine, params, sampling, **kw):
        return engine.prefill_packed(params=params, tokens=self.tokens, lengths=self.lengths, sampling=sampling,
                                     **kw)


@dataclass
class PrefillCall:
    """One prefill call's arrays: prompt rows (padded to a call size when samples share them),
    and for each of its R item rows the prompt row it samples from."""

    items: list  # WorkItems, one per row (R)
    prompt_row: dict  # id(request) -> its prompt row
    tokens: np.ndarray  # [N, bucket]: the tokens after each prompt's cached pages
    lengths: np.ndarray  # [N]
    sample_rows: Optional[np.ndarray]  # [R]; None when every row has its own prompt
    ctx_pages: np.ndarray  # [N, context bucket / page]: each prompt's cached pages (trash-padded)
    ctx_len: np.ndarray  # [N]: its cached tokens

    @classmethod
    def build(cls, items: list, bucket: int, context: int, cached: dict, hits: dict,
              geo: EngineGeometry) -> "PrefillCall":
        prompts: dict = {}
        for it in items:
            prompts.setdefault(id(it.request), len(prompts))
        n, sample_rows = len(items), None
        if len(prompts) < n:
            n = min(s for s in geo.prefill_sizes if s >= len(prompts))
            sample_rows = np.asarray([prompts[id(it.request)] for it in items], np.int32)
        tokens, lengths = np.zeros((n, bucket), np.int32), np.ones(n, np.int32)
        page = geo.kv_page_size
        ctx_pages = np.full((n, -(-context // page) if context else 0), geo.num_kv_pages, np.int32)
        ctx_len = np.zeros(n, np.int32)
        for it in items:
            row, done = prompts[id(it.request)], cached[id(it)]
            tokens[row, :len(it.ids) - done] = it.ids[done:]
            lengths[row] = len(it.ids) - done
            ctx_len[row] = done
            ctx_pages[row, :len(hits[id(it)])] = hits[id(it)]
        return cls(items, prompts, tokens, lengths, sample_rows, ctx_pages, ctx_len)

    @property
    def rows(self) -> int:
        return len(self.items)

    def run(self, engine, params, sampling, **kw):
        return engine.prefill(params=params, padded_tokens=self.tokens, true_length=self.lengths, sampling=sampling,
                              **kw)

    def engine_kwargs(self, decode_state) -> dict:
        """The prefill keywords beyond tokens and sampling: sample_rows, existing_prefix,
        prompt_logprobs, each only when the call needs it (each is its own program)."""
        kw = {}
        if self.sample_rows is not None:
            kw["sample_rows"] = self.sample_rows
        if self.ctx_pages.shape[1]:
            kw["existing_prefix"] = CachedPrompt(decode_state, self.ctx_pages, self.ctx_len)
        if any(it.request.sampling.prompt_logprobs is not None for it in self.items):
            kw["prompt_logprobs"] = True
        return kw


class SampleGroups:
    """The finished samples of requests with n > 1, until each request's last one is done."""

    def __init__(self):
        self._done: dict[int, list] = {}  # id(request) -> its finished sample Results

    def __len__(self) -> int:
        return len(self._done)

    def add(self, result: Result, request: Request) -> Optional[Result]:
        """The request's Result once all its samples are done (at once when n is 1): sample 0
        holding every sample, or one error naming the first sample that failed."""
        n = request.sampling.n
        if n == 1:
            return result
        done = self._done.setdefault(id(request), [])
        done.append(result)
        if len(done) < n:
            return None
        del self._done[id(request)]
        done.sort(key=lambda r: r.sample_index)
        bad = next((r for r in done if r.error is not None), None)
        if bad is not None:
            return Result(id=request.id, error=f"sample {bad.sample_index}: {bad.error}", metadata=request.metadata)
        return dataclasses.replace(done[0], samples=done)
