"""Continuous batching over the Engine API.

A fixed set of decode slots; whenever a sequence finishes its slot is refilled from the
request stream before the next decode call. The host never waits on the device without
work queued behind it: decode call k+1 is dispatched before the tokens of call k are read,
and refills are dispatched right behind it.

When a slot frees:
- A request that reaches its max_tokens within the calls already dispatched is certain to be
  done once they run, whatever tokens they return. Its slot is refilled right after the
  dispatch (`SchedulerConfig.early_refill`): the new request's prefill and insert queue behind
  that call on the device, and the old request's last tokens are read later from its results.
  Without this, a slot freed by call k's tokens would also run call k+1 for nothing; with
  fixed output lengths every slot frees at once, and that wasted call idled the whole batch.
- A request stopped by EOS or a stop sequence frees its slot when its tokens are read (call
  k+1 still ran it; those tokens are dropped).
- Free slots are refilled once at least `SchedulerConfig.min_refill` of them are free, or when no
  slot is left decoding, or when no requests are left to wait for: a 7B prefill call of one
  prompt costs nearly as much as one of eight, so refilling slots one at a time as a length
  mix frees them spends more on prefill than the idle slots cost.

Requests are read a window at a time (`SchedulerConfig.schedule_window`) and each window is
served longest max_tokens first (`SchedulerConfig.schedule`): in a length mix served in arrival
order, the longest requests started last and decoded nearly alone at the end of the job.

With a paged KV cache (`EngineGeometry.kv_page_size`) a request is admitted only once the pool
has the pages for its prompt plus max_tokens (first come, first served), and a slot's pages
go back to the pool when the device drops its page-table row: at its next insert, or when
the slot is parked. Device work runs in dispatch order, so a page handed to a new request
is written only after every decode call that the old owner's row was in.

Structured-output requests (engine/constraints.py) get each step's token mask from their
grammar; while one decodes, each call is one step in two halves (`_masked_step`): the forward
pass is dispatched, the previous tokens are read and the masks built on the host while it
runs, then the masked sampling is dispatched.

With prefix caching (SchedulerConfig.prefix_caching, paged caches; engine/kv_pages.py) a
request whose prompt starts with cached pages holds them and prefills only the rest, in a
prefill call of its own kind (`existing_prefix`); its own whole prompt pages are indexed once
that call is dispatched.

A request with `n` samples is n work items (engine/prefill_calls.py), each taking a slot; the
samples admitted together share one prefill row (`sample_rows`), and the request's Result comes
out once all n are done (sample 0 with every sample in `Result.samples`; any sample's error makes
the whole request an error, so each request still gives exactly one Result).
(A little over 400 lines: the one scheduling loop with its admission, refill, masked steps and
per-request token bookkeeping, which read best together; what a prefill call holds is in
engine/prefill_calls.py.)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from engine.admission import cache_tokens, max_tokens, prompt_ids, serving_order
from engine.config import SchedulerConfig
from engine.constraints import Matcher, open_mask
from engine.engine_api import Engine
from engine.kv_pages import PagePool, prefix_hashes
from engine.logprobs import logprob_at, logprob_entries
from engine.prefill_calls import (PackedCall, PrefillCall, SampleGroups, WorkItem, defer_shared_prefixes,
                                  packable, plan_calls, plan_packed, sample_seed)
from engine.request import Request, RequestError, Result
from engine.sampling import SlotSampling
from engine.sched_stats import SCHEDULER_STATS
from engine.stop_strings import stop_cut, tail_tokens

log = logging.getLogger(__name__)

@dataclass
class _Active:
    """A request (one of its samples) that holds a slot."""

    request: Request
    prompt_ids: list
    max_tokens: int
    start_call: int  # first generate call whose tokens belong to this request
    start_step: int  # decode steps dispatched before that call
    slot: int
    t_admit: float
    end_call: Optional[int] = None  # set on early refill: the last call that runs this request
    first: object = None  # (ResultTokens on device, row) of the prefill's first token, until read
    tokens: list = field(default_factory=list)
    logprobs: Optional[list] = None  # per token (logprob, top ids, top logprobs), when asked for
    matcher: object = None  # engine.constraints.Matcher of a structured-output request
    error: Optional[str] = None
    t_first: Optional[float] = None
    text: str = ""
    finish: Optional[str] = None
    sample: int = 0
    prompt_row: int = 0  # its prompt's row in the prefill call (samples share one)
    prompt_logprobs: Optional[list] = None  # Result.prompt_logprobs, once the prefill is read


class ContinuousBatcher:
    """Feeds any iterable of Requests through an engine; yields each Result when it finishes.

    It uses only the Engine API (engine/engine_api.py), so any engine serves: the JAX engine,
    or the fake one of engine/fake_engine.py. `seed` draws the seeds of requests that give none.
    """

    def __init__(self, engine: Engine, params, tokenizer=None, scheduler: Optional[SchedulerConfig] = None,
                 seed: int = 0):
        self.engine = engine
        self.params = params
        self.tokenizer = tokenizer
        self.scheduler = scheduler or SchedulerConfig()
        self.rng = np.random.default_rng(seed)
        self.state = engine.init_decode_state()
        self.geo = geo = engine.geometry  # final once the decode state exists
        eos = set(geo.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_ids:
            eos |= set(tokenizer.eos_ids)
        self.eos_ids = frozenset(eos)
        self.stats = defaultdict(float)
        self.steps = 0  # decode steps dispatched (a structured-output call runs one)
        self.pages = PagePool(geo.num_kv_pages, geo.kv_page_size, geo.pages_per_slot) if geo.paged else None
        self.slot_pages: dict[int, list] = {}  # pages named by each slot's row on the device
        self.samples = SampleGroups()  # finished samples of requests with n > 1

    def set_scheduler(self, scheduler: SchedulerConfig) -> None:
        """Serve the next runs under another SchedulerConfig (no recompilation: the engine's
        programs do not depend on it)."""
        self.scheduler = scheduler

    def warmup(self, prefill_shapes=None) -> None:
        """Compile every program the runs can call, or of prefill only the (prompt count,
        bucket) pairs given (Engine.warmup)."""
        self.state = self.engine.warmup(self.params, self.state, prefill_shapes)

    def scheduler_stats(self) -> dict:
        """The scheduling counters so far (subtract an earlier snapshot for one run), and for a
        paged cache the pool's size and the most pages in use since the last run started."""
        out = {k: int(self.stats.get(k, 0)) for k in SCHEDULER_STATS}
        if self.pages is not None:
            out.update(kv_pages=self.pages.num_pages, kv_pages_peak=self.pages.peak_used)
        return out

    def _timed(self, key: str, t0: float, out):
        """With scheduler.sync_timing, wait for `out` and add the call's time to stats[key]."""
        if self.scheduler.sync_timing:
            self.engine.sync(out)
            self.stats[key] += time.perf_counter() - t0
        return out

    # ---- admission (engine/admission.py) ----
    def prepare(self, req: Request) -> list:
        """Token ids of a request's prompt; RequestError with the reason if it cannot be served."""
        return prompt_ids(req, self.geo, self.tokenizer, self.pages)

    def _prepared(self, requests: Iterable[Request]):
        """WorkItems in serving order (n per request), and error Results of refused requests."""
        for item in serving_order(requests, self.scheduler, self.geo, self.prepare):
            if isinstance(item, Result):
                self.stats["errors"] += 1
                yield item
            else:
                req, ids = item
                hashes = prefix_hashes(ids, self.geo.kv_page_size) if self._caching() else ()
                for k in range(req.sampling.n):
                    yield WorkItem(req, ids, k, hashes)

    def _caching(self) -> bool:
        return self.pages is not None and self.scheduler.prefix_caching

    def _hit(self, it: WorkItem) -> list:
        """The cached pages the item's prompt can start with (prefix caching)."""
        if not (self._caching() and it.hashes) or it.request.sampling.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        return self.pages.match(it.hashes, len(it.ids))

    def _max_tokens(self, ids, req) -> int:
        return max_tokens(self.geo, ids, req)

    def _cache_tokens(self, ids, req) -> int:
        return cache_tokens(self.geo, ids, req)

    def _fitting(self, waiting, limit: int) -> int:
        """How many requests at the head of `waiting` (at most `limit`) the free pages hold."""
        if self.pages is None:
            return limit
        return self.pages.count_fitting(
            ((self._cache_tokens(it.ids, it.request), self._hit(it)) for it in waiting), limit)

    # ---- the loop ----
    def run(self, requests: Iterable[Request]) -> Iterator[Result]:
        engine = self.engine
        sched = self.scheduler
        steps = self.geo.decode_steps
        source = self._prepared(requests)
        if self.pages is not None:
            self.pages.peak_used = self.pages.used_pages  # this run's peak from here
        exhausted = False
        free = list(range(self.geo.slots))[::-1]
        active: dict[int, _Active] = {}  # slot -> request that may still need decode calls
        retiring: list[_Active] = []  # slot already refilled; last tokens still to be read
        waiting: deque = deque()  # (request, prompt ids) pulled from the source, not admitted
        # Free slots already released on the device. Empty at first, so every slot left free
        # is released once: a state reused from an earlier run may hold slots that finished
        # last and kept decoding.
        parked: set = set()
        calls = 0
        pending = None  # (call index, ResultTokens on device)
        while True:
            # 1. Pull requests (bad ones become error results at once) and refill free slots.
            while len(waiting) < len(free) and not exhausted:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if isinstance(item, Result):
                    yield item
                else:
                    waiting.append(item)
            if waiting and (len(free) >= sched.min_refill or not active
                            or (exhausted and len(waiting) <= len(free))):
                if self.pages is not None:
                    self._park(free, parked)  # the free slots' pages back to the pool first
                n = self._fitting(waiting, min(len(free), len(waiting)))
                if n < min(len(free), len(waiting)):
                    self.stats["page_waits"] += 1  # refills held back by a full page pool
                if n:
                    batch = [waiting.popleft() for _ in range(n)]
                    if self._caching():
                        batch, later = defer_shared_prefixes(batch, self._hit, self.geo.kv_page_size)
                        waiting.extendleft(reversed(later))
                    self.stats["refills"] += 1
                    self._admit(batch, free, active, calls, parked)
                    self._retire(active, retiring, free, calls)  # max_tokens=1: the prefill is all
            if not active and not retiring and pending is None:
                if exhausted and not waiting:
                    return
                if waiting and self.pages is not None and not self._fitting(waiting, 1):
                    raise RuntimeError("page pool stuck: nothing decodes and the next request does not fit")
                continue
            # 2. Dispatch the next decode call, then read the previous one while it runs.
            current = None
            if any(a.matcher is not None for a in active.values()):
                pending = yield from self._masked_step(pending, calls, active, retiring, free, parked)
                calls += 1
                self._retire(active, retiring, free, calls)
                continue
            if active:
                self._park(free, parked)
                bound = self._bound(active)
                t0 = time.perf_counter()
                kw = {}
                if any(a.request.sampling.logprobs is not None for a in active.values()):
                    kw["logprobs"] = True
                self.state, res = engine.generate(self.params, self.state, max_length=bound, **kw)
                self.steps += steps
                self._timed("decode_s", t0, res.tokens)
                self.stats["decode_calls"] += 1
                self.stats["live_slots"] += len(active)  # per call
                current = (calls, res)
                calls += 1
                self._retire(active, retiring, free, calls)
            if pending is not None:
                yield from self._consume(pending, active, retiring, free)
            elif current is None:  # only first tokens remain to be read
                yield from self._consume((calls, None), active, retiring, free)
            pending = current

    def _masked_step(self, pending, calls, active, retiring, free, parked):
        """One decode step while structured-output requests decode: their next masks need their
        last tokens, so the step is split. Its forward pass is dispatched first; the previous
        call's tokens are read and the masks built on the host while it runs; then the sampling
        under those masks is dispatched. Returns the step's (call, ResultTokens), to read next."""
        self._park(free, parked)
        bound = self._bound(active)
        logprobs = any(a.request.sampling.logprobs is not None for a in active.values())
        t0 = time.perf_counter()
        self.state, logits = self.engine.decode_logits(self.params, self.state, max_length=bound)
        yield from self._consume(pending or (calls, None), active, retiring, free)  # tokens before this step
        mask = open_mask(self.geo.slots, self.geo.vocab_size)
        for a in active.values():
            if a.matcher is not None and a.finish is None:
                a.matcher.fill_mask(mask, a.slot)
        self.state, res = self.engine.sample_logits(self.state, logits, mask, logprobs=logprobs)
        self.steps += 1
        self._timed("decode_s", t0, res.tokens)
        self.stats["decode_calls"] += 1
        self.stats["live_slots"] += len(active)
        return (calls, res)

    def _bound(self, active) -> int:
        """A bound on every live slot's position through the call about to be dispatched: the
        call just dispatched, the one in flight and this one (3 calls of decode_steps), plus the
        first token."""
        return max(len(a.prompt_ids) + len(a.tokens) for a in active.values()) + 3 * self.geo.decode_steps + 2

    def _park(self, free, parked):
        """Release free slots that no refill took, so the next decode call does not read their
        stale caches: a finished request's slot would otherwise keep decoding, its length
        growing to the end of the cache, while it waits (min_refill) or the stream drains.
        A paged cache always parks: that is how a free slot's pages return to the pool."""
        if not self.scheduler.park_free_slots and self.pages is None:
            return
        now_free = set(free)
        parked &= now_free  # refilled slots are live again
        idle = now_free - parked
        if idle:
            mask = np.zeros(self.geo.slots, bool)
            mask[list(idle)] = True
            self.state = self.engine.release_slots(self.state, mask)
            parked |= idle
            self.stats["released_slots"] += len(idle)
            for slot in idle:
                self._return_pages(slot)

    def _return_pages(self, slot: int) -> None:
        if self.pages is not None:
            self.pages.give(self.slot_pages.pop(slot, []))

    def _retire(self, active, retiring, free, calls):
        """Early refill: free the slots of requests that the `calls` decode calls dispatched so
        far carry to max_tokens (the prefill's token plus the steps dispatched since start_call)."""
        if not self.scheduler.early_refill:
            return
        for slot, a in list(active.items()):
            if 1 + (self.steps - a.start_step) >= a.max_tokens:
                a.end_call = calls - 1
                del active[slot]
                retiring.append(a)
                free.append(slot)

    def _admit(self, admitted, free, active, calls, parked):
        engine = self.engine
        now = time.perf_counter()
        page = self.geo.kv_page_size
        hits = {id(it): self._hit(it) for it in admitted}
        for hit in hits.values():  # held before any new page is taken: none of them is evicted
            if hit:
                self.pages.hold(hit)
        cached = {i: len(hit) * page for i, hit in hits.items()}
        packed, rest = [], []
        for it in admitted:
            (packed if packable(it, cached[id(it)], self.geo) else rest).append(it)
        planned = [PackedCall.build(chunk, size, self.geo) for size, chunk in plan_packed(packed, self.geo)]
        planned += [PrefillCall.build(chunk, bucket, context, cached, hits, self.geo)
                    for bucket, context, chunk in plan_calls(rest, cached, self.geo)]
        for call in planned:
            chunk, r = call.items, call.rows
            slots = np.full(r, -1, np.int32)
            params, page_lists = [], []
            for row, it in enumerate(chunk):
                req = it.request
                slots[row] = slot = free.pop()
                parked.discard(slot)
                if self.pages is not None:  # the slot's old pages go with its old row
                    self._return_pages(slot)
                    self.slot_pages[slot] = self.pages.take(self._cache_tokens(it.ids, req), hits[id(it)])
                    page_lists.append(self.slot_pages[slot])
                sp = req.sampling
                if sp.seed is None:  # the request keeps its own settings; the slot gets a seed
                    sp = dataclasses.replace(sp, seed=int(self.rng.integers(0, 2**31 - 1)))
                elif it.sample:
                    sp = dataclasses.replace(sp, seed=sample_seed(sp.seed, it.sample))
                params.append(sp)
            matchers = [Matcher(it.request.sampling, self.tokenizer, self.geo.vocab_size)
                        if it.request.sampling.constrained else None for it in chunk]
            kw = call.engine_kwargs(self.state)
            if any(m is not None for m in matchers):
                kw["token_mask"] = open_mask(r, self.geo.vocab_size)
                for row, m in enumerate(matchers):
                    if m is not None:
                        m.fill_mask(kw["token_mask"], row)
            sampling = SlotSampling.from_params(params)
            if len(chunk) < r:  # a packed call's unused rows
                sampling = sampling.padded_to(r)
                page_lists += [[]] * (r - len(chunk))
            t0 = time.perf_counter()
            prefix, first = call.run(engine, self.params, sampling, **kw)
            self._timed("prefill_s", t0, prefix)
            t0 = time.perf_counter()
            if self.pages is not None:
                self.state = engine.insert(prefix, self.state, slots, self.pages.rows(page_lists))
            else:
                self.state = engine.insert(prefix, self.state, slots)
            self._timed("insert_s", t0, self.state)
            if self._caching():  # later prefill calls read these pages after this insert wrote them
                for row, it in enumerate(chunk):
                    self.pages.index(it.hashes, page_lists[row])
            for row, it in enumerate(chunk):
                req = it.request
                active[int(slots[row])] = _Active(
                    request=req, prompt_ids=it.ids, max_tokens=self._max_tokens(it.ids, req),
                    start_call=calls, start_step=self.steps, slot=int(slots[row]), t_admit=now, first=(first, row),
                    logprobs=None if req.sampling.logprobs is None else [], matcher=matchers[row],
                    sample=it.sample, prompt_row=call.prompt_row[id(req)])
            self.stats["prefill_calls"] += 1
            self.stats["prefill_rows"] += len(chunk)
            self.stats["prompt_tokens"] += sum(len(it.ids) for it in chunk if it.sample == 0)
            self.stats["cached_prompt_tokens"] += sum(cached[id(it)] for it in chunk if it.sample == 0)
            self.stats["prefill_tokens"] += int(call.tokens.size)

    def _consume(self, pending, active, retiring, free):
        call, res = pending
        host = res.to_host() if res is not None else None
        now = time.perf_counter()
        for a in list(retiring):
            self._take(a, call, host, now)
            if a.finish is None and call >= a.end_call:
                raise RuntimeError(f"request {a.request.id!r} retired at call {a.end_call} is unfinished")
            if a.finish is not None:
                retiring.remove(a)
                yield from self._emit(a, now)
        for slot, a in list(active.items()):
            self._take(a, call, host, now)
            if a.finish is not None:
                del active[slot]
                free.append(slot)
                yield from self._emit(a, now)

    def _take(self, a: _Active, call: int, host, now: float) -> None:
        """Push a request's first token (once) and its tokens from decode call `call`."""
        if a.first is not None:
            first, row = a.first
            a.first = None
            a.t_first = now
            k = a.request.sampling.prompt_logprobs
            if k is not None:
                lp, ids, top = (np.asarray(x)[a.prompt_row] for x in first.prompt)
                items = [(float(lp[j]), ids[j], top[j]) for j in range(len(a.prompt_ids) - 1)]
                a.prompt_logprobs = [None] + logprob_entries(a.prompt_ids[1:], items, k, self.tokenizer,
                                                             a.request.id)
            lp = logprob_at(first, row, 0) if a.logprobs is not None else None
            self._push(a, int(np.asarray(first.tokens)[row, 0]), lp)
        if a.finish is None and host is not None and call >= a.start_call:
            for j, tok in enumerate(host.tokens[a.slot]):
                lp = logprob_at(host, a.slot, j) if a.logprobs is not None else None
                if self._push(a, int(tok), lp):
                    break

    def _push(self, a: _Active, tok: int, logprob=None) -> bool:
        """Append one generated token (and its logprobs); return True when the request is finished."""
        sp = a.request.sampling
        if (tok in self.eos_ids and not sp.ignore_eos) or tok in sp.stop_token_ids:
            a.finish = "stop"
            return True
        a.tokens.append(tok)
        if a.logprobs is not None:
            a.logprobs.append(logprob)
        if a.matcher is not None:
            try:
                a.matcher.consume(tok)
            except RequestError as e:
                a.error, a.finish = str(e), "error"
                return True
            if a.matcher.done:  # the grammar is complete: nothing but EOS may follow
                a.finish = "stop"
                return True
        if sp.stop and self.tokenizer is not None:
            cut = stop_cut(self.tokenizer, a.tokens, sp.stop, tail_tokens(sp.stop))
            if cut is not None:
                a.text = cut
                a.finish = "stop"
                return True
        if len(a.tokens) >= a.max_tokens:
            a.finish = "length"
            return True
        return False

    def _emit(self, a: _Active, now: float) -> Iterator[Result]:
        """A finished request's Result; with n samples, once its last sample is done."""
        out = self.samples.add(self._result(a, now), a.request)
        if out is not None:
            yield out

    def _result(self, a: _Active, now: float) -> Result:
        if not a.text and self.tokenizer is not None and a.tokens:
            a.text = self.tokenizer.decode(a.tokens)
        if a.error is not None:
            self.stats["errors"] += 1
            return Result(id=a.request.id, error=a.error, metadata=a.request.metadata, sample_index=a.sample)
        self.stats["completed"] += 1
        self.stats["generated_tokens"] += len(a.tokens)
        return Result(
            id=a.request.id, completion=a.text, completion_token_ids=list(a.tokens),
            finish_reason=a.finish, prompt_tokens=len(a.prompt_ids), completion_tokens=len(a.tokens),
            ttft_s=(a.t_first - a.t_admit) if a.t_first else None, latency_s=now - a.t_admit,
            metadata=a.request.metadata, sample_index=a.sample, prompt_logprobs=a.prompt_logprobs,
            logprobs=None if a.logprobs is None else logprob_entries(
                a.tokens, a.logprobs, a.request.sampling.logprobs, self.tokenizer, a.request.id))
