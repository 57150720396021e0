"""generate: (engine shard, ValidRequest) -> completion records | error records | engine stats.

`GenerateFn` is a stateful DoFn keyed by engine shard. ValidRequests (already rendered,
tokenized and checked by the validate step) are buffered in a BagState (ValidRequestCoder, with
a CombiningValueState count) and fed to the engine all at once, so its continuous batcher always
has requests waiting for a free decode slot. The buffer is flushed

  * when it holds `flush_rows` rows (in `process`),
  * `flush_seconds` after its first row arrived (a processing-time timer; the local
    FnApiRunner fires it as soon as the bundle that set it is done, see key.py), and
  * at the end of the window (an event-time timer at the GlobalWindow's max timestamp),
    which is what empties the last partial buffer of a batch job.

A flush is one `EngineCall` on the process's engine (transforms/serving.py, shared with the
RunInference handler): every input row yields exactly one output, a completion record or an
error record with the engine's reason, and each flush one STATS record.
"""

from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, CombiningValueStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.utils.timestamp import Duration, Timestamp

from engine.config import Settings
from transforms.read import ERRORS, NAMESPACE
from transforms.requests import ValidRequestCoder
from transforms.serving import EngineCall, EngineHolder, EngineMetrics, acquire_engine

log = logging.getLogger(__name__)
STATS = "stats"


class GenerateFn(beam.DoFn):
    BUFFER = BagStateSpec("buffer", ValidRequestCoder())
    COUNT = CombiningValueStateSpec("count", VarIntCoder(), CountCombineFn())  # rows buffered
    FLUSH_TIMER = TimerSpec("flush", TimeDomain.REAL_TIME)
    END_OF_WINDOW = TimerSpec("end_of_window", TimeDomain.WATERMARK)

    def __init__(self, settings: Settings, flush_rows: int = 256, flush_seconds: float = 30.0,
                 progress_seconds: float = 10.0):
        self.settings = settings
        self.flush_rows = max(1, int(flush_rows))
        self.flush_seconds = float(flush_seconds)
        self.progress_seconds = float(progress_seconds)
        self.holder: Optional[EngineHolder] = None
        self.metrics = EngineMetrics()
        self.flushes = Metrics.counter(NAMESPACE, "engine_flushes")
        self.flush_size = Metrics.distribution(NAMESPACE, "flush_rows")

    def setup(self):
        # The engine is acquired at the first flush, not here: a worker process that never
        # flushes (Beam's local runner instantiates the DoFn in several) loads no model.
        self.holder = None

    def process(self, element, window=beam.DoFn.WindowParam,
                buffer=beam.DoFn.StateParam(BUFFER), count=beam.DoFn.StateParam(COUNT),
                flush_timer=beam.DoFn.TimerParam(FLUSH_TIMER),
                end_of_window=beam.DoFn.TimerParam(END_OF_WINDOW)):
        shard, request = element
        buffer.add(request)
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
        requests = list(buffer.read())
        buffer.clear()
        count.clear()
        try:
            flush_timer.clear()
        except Exception:  # older runners without timer clearing: the timer fires on an empty buffer
            pass
        if not requests:
            return
        yield from self._generate(shard, requests, why)

    def _generate(self, shard, requests, why):
        if self.holder is None:
            self.holder = acquire_engine(self.settings)
        self.flushes.inc()
        self.flush_size.update(len(requests))
        log.info("jetbeam engine %s shard %s: flushing %d rows (%s)", self.holder.name, shard, len(requests), why)
        call = EngineCall(self.holder, requests, self.metrics, f"shard {shard}", self.progress_seconds)
        for _, ok, record in call:
            yield record if ok else beam.pvalue.TaggedOutput(ERRORS, record)
        yield beam.pvalue.TaggedOutput(STATS, {"shard": shard, **call.stats})


class Generate(beam.PTransform):
    """(shard, ValidRequest) -> completions (main) | ERRORS | STATS."""

    def __init__(self, settings: Settings, flush_rows: int = 256, flush_seconds: float = 30.0):
        super().__init__()
        self.fn = GenerateFn(settings, flush_rows, flush_seconds)

    def expand(self, keyed):
        return keyed | beam.ParDo(self.fn).with_outputs(ERRORS, STATS, main="completions")
