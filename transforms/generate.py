"""generate: (engine shard, request spec) -> completion records | error records | engine stats.

`GenerateFn` is a stateful DoFn keyed by engine shard. Rows are buffered in a BagState
(with a CombiningValueState count) and fed to the engine all at once, so its continuous
batcher always has requests waiting for a free decode slot. The buffer is flushed

  * when it holds `flush_rows` rows (in `process`),
  * `flush_seconds` after its first row arrived (a processing-time timer; the local
    FnApiRunner fires it as soon as the bundle that set it is done, see key.py), and
  * at the end of the window (an event-time timer at the GlobalWindow's max timestamp),
    which is what empties the last partial buffer of a batch job.

Each worker process holds ONE engine (loaded once, `apache_beam.utils.shared.Shared`,
keyed by model + engine config), shared by every DoFn instance/thread of the process;
a lock serialises the engine between threads. Every input row yields exactly one output:
a completion record, or an error record with the engine's reason.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Optional

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, CombiningValueStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Duration, Timestamp

from engine.sched_stats import SCHEDULER_STATS
from engine.settings import to_mapping
from transforms.read import ERRORS, NAMESPACE, error_record

log = logging.getLogger(__name__)
STATS = "stats"

# ---- one engine per worker process ----

_SHARED = shared.Shared()  # module level: one control block per process
_KEEP: dict = {}  # a strong reference to the current engine: it outlives DoFn teardown/reuse


class EngineHolder:
    """An LLM plus the lock that serialises it (its batcher is single-threaded)."""

    def __init__(self, settings):
        from engine.llm import LLM
        t0 = time.time()
        log.info("jetbeam: loading engine model=%s (pid %d)", settings.source.model or "<default>", os.getpid())
        self.llm = LLM(settings=settings)
        self.load_time_s = time.time() - t0
        self.lock = threading.Lock()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.rows_done = 0
        self.tokens_done = 0
        self.engine_config = to_mapping(self.llm.engine_config)
        try:
            self.device_info = dict(self.llm.device_info())
        except Exception as e:  # informational only
            self.device_info = {"device_kind": f"unknown ({e})", "device_count": 0}
        log.info("jetbeam: engine %s ready in %.1fs: %s on %s", self.name, self.load_time_s,
                 self.llm.model_name, self.device_info)


def engine_tag(settings) -> str:
    """The key an engine is shared under: every setting but the sampling defaults."""
    flat = settings.to_flat()
    keep = {k: v for k, v in flat.items() if settings.keys()[k] != "sampling"}
    return json.dumps(keep, sort_keys=True, default=str)


def acquire_engine(settings) -> EngineHolder:
    """The process's engine for these settings; loaded on first use, reused afterwards."""
    tag = engine_tag(settings)
    holder = _SHARED.acquire(lambda: EngineHolder(settings), tag=tag)
    if _KEEP.get(tag) is not holder:
        _KEEP.clear()
        _KEEP[tag] = holder
    return holder


# ---- the stateful DoFn ----

def build_requests(llm, specs: list):
    """(requests, immediate error records). Chat messages are rendered here (the tokenizer's template)."""
    from engine.request import RequestError
    from engine.rows import spec_to_request
    requests, errors = [], []
    for i, spec in enumerate(specs):
        try:
            req = spec_to_request(spec, render_chat=llm.render_chat, request_id=i)
            req.metadata = i
            spec["prompt"] = req.prompt
            requests.append(req)
        except RequestError as e:
            errors.append(error_record(spec["id"], str(e), "generate", spec.get("row")))
        except Exception as e:
            errors.append(error_record(spec["id"], f"cannot build request: {type(e).__name__}: {e}",
                                       "generate", spec.get("row")))
    return requests, errors


def completion_record(spec: dict, result, model_name: str) -> dict:
    return {
        "id": spec["id"],
        "prompt": spec.get("prompt"),
        "completion": result.completion,
        "completion_token_ids": [int(t) for t in result.completion_token_ids],
        "finish_reason": result.finish_reason,
        "prompt_tokens": int(result.prompt_tokens),
        "completion_tokens": int(result.completion_tokens),
        "ttft_s": result.ttft_s,
        "latency_s": result.latency_s,
        "model": model_name,
        "row": spec.get("row"),
    }


class GenerateFn(beam.DoFn):
    BUFFER = BagStateSpec("buffer", PickleCoder())
    COUNT = CombiningValueStateSpec("count", VarIntCoder(), CountCombineFn())  # rows buffered
    FLUSH_TIMER = TimerSpec("flush", TimeDomain.REAL_TIME)
    END_OF_WINDOW = TimerSpec("end_of_window", TimeDomain.WATERMARK)

    def __init__(self, settings, flush_rows: int = 256, flush_seconds: float = 30.0,
                 progress_seconds: float = 10.0):
        self.settings = settings
        self.flush_rows = max(1, int(flush_rows))
        self.flush_seconds = float(flush_seconds)
        self.progress_seconds = float(progress_seconds)
        self.holder: Optional[EngineHolder] = None
        self.completed = Metrics.counter(NAMESPACE, "completions")
        self.errored = Metrics.counter(NAMESPACE, "generate_errors")
        self.prompt_tokens = Metrics.counter(NAMESPACE, "prompt_tokens")
        self.generated_tokens = Metrics.counter(NAMESPACE, "generated_tokens")
        self.flushes = Metrics.counter(NAMESPACE, "engine_flushes")
        self.decode_calls = Metrics.counter(NAMESPACE, "decode_calls")
        self.page_waits = Metrics.counter(NAMESPACE, "page_waits")
        self.flush_size = Metrics.distribution(NAMESPACE, "flush_rows")
        self.ttft_ms = Metrics.distribution(NAMESPACE, "ttft_ms")
        self.latency_ms = Metrics.distribution(NAMESPACE, "latency_ms")

    def setup(self):
        # The engine is acquired at the first flush, not here: a worker process that never
        # flushes (Beam's local runner instantiates the DoFn in several) loads no model.
        self.holder = None

    def process(self, element, window=beam.DoFn.WindowParam,
                buffer=beam.DoFn.StateParam(BUFFER), count=beam.DoFn.StateParam(COUNT),
                flush_timer=beam.DoFn.TimerParam(FLUSH_TIMER),
                end_of_window=beam.DoFn.TimerParam(END_OF_WINDOW)):
        shard, spec = element
        buffer.add(spec)
        count.add(1)
        n = count.read()
        if n == 1:
            end_of_window.set(window.max_timestamp())
            if self.flush_seconds >= 0:  # < 0: no processing-time flush
                flush_timer.set(Timestamp.now() + Duration(seconds=self.flush_seconds))
        if n >= self.flush_rows:
            yield from self._flush(shard, buffer, count, flush_timer, "rows")

    @on_timer(FLUSH_TIMER)
    def on_flush_timer(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
                       count=beam.DoFn.StateParam(COUNT), flush_timer=beam.DoFn.TimerParam(FLUSH_TIMER)):
        yield from self._flush(key, buffer, count, flush_timer, "processing-time timer")

    @on_timer(END_OF_WINDOW)
    def on_end_of_window(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
                         count=beam.DoFn.StateParam(COUNT), flush_timer=beam.DoFn.TimerParam(FLUSH_TIMER)):
        yield from self._flush(key, buffer, count, flush_timer, "end of window")

    def _flush(self, shard, buffer, count, flush_timer, why):
        specs = list(buffer.read())
        buffer.clear()
        count.clear()
        try:
            flush_timer.clear()
        except Exception:  # older runners without timer clearing: the timer fires on an empty buffer
            pass
        if not specs:
            return
        yield from self._generate(shard, specs, why)

    def _generate(self, shard, specs, why):
        if self.holder is None:
            self.holder = acquire_engine(self.settings)
        holder = self.holder
        llm = holder.llm
        self.flushes.inc()
        self.flush_size.update(len(specs))
        with holder.lock:
            t_start = time.time()
            sched_before = llm.stats()
            requests, errors = build_requests(llm, specs)
            for e in errors:
                self.errored.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, e)
            pending = {r.id for r in requests}
            done = ptok = gtok = 0
            last_log = time.time()
            log.info("jetbeam engine %s shard %s: flushing %d rows (%s)", holder.name, shard, len(specs), why)
            for res in llm.generate(requests):
                idx = res.metadata if res.metadata in pending else res.id
                if idx not in pending:  # not ours: should never happen
                    log.warning("jetbeam: engine returned an unknown result id %r", res.id)
                    continue
                pending.discard(idx)
                spec = specs[idx]
                done += 1
                if res.error is not None:
                    self.errored.inc()
                    yield beam.pvalue.TaggedOutput(ERRORS, error_record(spec["id"], res.error, "generate",
                                                                        spec.get("row")))
                else:
                    self.completed.inc()
                    self.prompt_tokens.inc(res.prompt_tokens)
                    self.generated_tokens.inc(res.completion_tokens)
                    if res.ttft_s is not None:
                        self.ttft_ms.update(int(res.ttft_s * 1000))
                    if res.latency_s is not None:
                        self.latency_ms.update(int(res.latency_s * 1000))
                    ptok += res.prompt_tokens
                    gtok += res.completion_tokens
                    yield completion_record(spec, res, llm.model_name)
                now = time.time()
                if now - last_log >= self.progress_seconds:
                    last_log = now
                    el = max(now - t_start, 1e-9)
                    log.info("jetbeam engine %s shard %s: %d/%d rows, %d tokens generated, %.1f tok/s, "
                             "%.2f rows/s", holder.name, shard, done, len(requests), gtok, gtok / el, done / el)
            for idx in sorted(pending):  # exactly one output per row, whatever the engine did
                self.errored.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_record(
                    specs[idx]["id"], "engine returned no result for this row", "generate", specs[idx].get("row")))
            t_end = time.time()
            after = llm.stats()
            sched = {k: after.get(k, 0) - sched_before.get(k, 0) for k in SCHEDULER_STATS}
            for k in ("kv_pages", "kv_pages_peak"):  # sizes, not running counts
                if k in after:
                    sched[k] = after[k]
            self.decode_calls.inc(sched["decode_calls"])
            self.page_waits.inc(sched["page_waits"])
            holder.rows_done += len(specs)
            holder.tokens_done += gtok
        el = max(t_end - t_start, 1e-9)
        log.info("jetbeam engine %s shard %s: flushed %d rows in %.1fs: %d prompt + %d generated tokens, "
                 "%.1f generated tok/s (engine total: %d rows, %d tokens)", holder.name, shard, len(specs),
                 el, ptok, gtok, gtok / el, holder.rows_done, holder.tokens_done)
        yield beam.pvalue.TaggedOutput(STATS, {
            "engine": holder.name, "shard": shard, "rows": len(specs), "t_start": t_start, "t_end": t_end,
            "prompt_tokens": ptok, "completion_tokens": gtok, "model": llm.model_name,
            "engine_config": holder.engine_config, "device_info": holder.device_info,
            "load_time_s": holder.load_time_s, "scheduler": sched,
        })


class Generate(beam.PTransform):
    """(shard, spec) -> completions (main) | ERRORS | STATS."""

    def __init__(self, settings, flush_rows: int = 256, flush_seconds: float = 30.0):
        super().__init__()
        self.fn = GenerateFn(settings, flush_rows, flush_seconds)

    def expand(self, keyed):
        return keyed | beam.ParDo(self.fn).with_outputs(ERRORS, STATS, main="completions")
