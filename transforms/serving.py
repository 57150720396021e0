"""The one Beam integration of the engine, shared by the batch job's stateful `GenerateFn`
(transforms/generate.py) and RunInference's `JetbeamModelHandler` (transforms/model_handler.py).

Each worker process holds ONE engine (`acquire_engine`: `apache_beam.utils.shared.Shared`, keyed
by every setting but the sampling defaults), shared by every DoFn instance and thread of the
process; its lock serialises the engine, whose batcher is single-threaded. With platform
"gpu=N/M" that engine is N/M engines of M devices each (engine/data_parallel.py) drawing every
call's rows from one source, so one shard's flush keeps all the process's devices busy. `EngineCall` serves a
list of ValidRequests under that lock and gives exactly one record per request, a completion
record or an error record of stage "generate", counting both in the same Beam metrics
(namespace "jetbeam") whichever integration called it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from typing import Iterator, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from engine.config import Settings
from engine.sched_stats import SCHEDULER_STATS
from engine.settings import to_mapping
from transforms.read import NAMESPACE, error_record
from transforms.requests import ValidRequest

log = logging.getLogger(__name__)

_SHARED = shared.Shared()  # module level: one control block per process
_KEEP: dict = {}  # a strong reference to the current engine: it outlives DoFn teardown/reuse

LOAD_FAILED = "jetbeam engine could not load"


class EngineLoadError(RuntimeError):
    """A worker's engine could not load (devices the platform names are missing, a checkpoint
    that fails past its headers, out of memory): no row can be served there, so the job stops
    with this one line instead of one error row per input row."""


class _DropLoadTraceback(logging.Filter):
    """Beam logs a failed DoFn's traceback where it runs it, in the SDK worker, and again where
    the runner relays worker logs; an EngineLoadError is already logged as its one line, and an
    interrupt (Ctrl-C) is reported by the launcher."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return LOAD_FAILED not in message and not message.startswith("KeyboardInterrupt")


for _name in ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
              "apache_beam.runners.portability.local_job_service"):
    logging.getLogger(_name).addFilter(_DropLoadTraceback())


def _chain(exc: Optional[BaseException]) -> Iterator[BaseException]:
    """A failed job's exception, then each one it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def interrupted(exc: BaseException) -> bool:
    """Whether a failed job's exception is, or was raised while handling, a KeyboardInterrupt
    (Beam re-raises one inside a DoFn as a RuntimeError naming it)."""
    return any(isinstance(e, KeyboardInterrupt) or str(e).startswith("KeyboardInterrupt") for e in _chain(exc))


def load_failure(exc: BaseException) -> Optional[str]:
    """The one-line EngineLoadError message carried by a failed job's exception (in-process, or
    the text of a worker process's traceback), Beam's step annotation removed; None if the job
    failed otherwise."""
    for e in _chain(exc):
        found = re.search(re.escape(LOAD_FAILED) + r"[^\n]*", str(e))
        if found:
            return re.sub(r"( \[while running '[^']*'\])+$", "", found.group(0).rstrip())
    return None


def _one_line(e: BaseException, limit: int = 600) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


class EngineHolder:
    """An LLM plus the lock that serialises it, and what the STATS records report about it."""

    def __init__(self, settings: Settings):
        t0 = time.time()  # the load counts importing JAX and the engine (~1 s on a CPU): they come with it
        from engine.data_parallel import serving_llm
        log.info("jetbeam: loading engine model=%s (pid %d)", settings.source.model or "<default>", os.getpid())
        try:
            self.llm = serving_llm(settings)  # one LLM, or one per engine group ("gpu=8/2")
        except Exception as e:
            log.debug("jetbeam: engine load failed", exc_info=True)
            why = f"{LOAD_FAILED} on {socket.gethostname()}:{os.getpid()}: {type(e).__name__}: {_one_line(e)}"
            log.error("%s", why)
            raise EngineLoadError(why) from None
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


def engine_tag(settings: Settings) -> str:
    """The key an engine is shared under: every setting but the sampling defaults."""
    flat = settings.to_flat()
    keep = {k: v for k, v in flat.items() if settings.keys()[k] != "sampling"}
    return json.dumps(keep, sort_keys=True, default=str)


def acquire_engine(settings: Settings) -> EngineHolder:
    """The process's engine for these settings; loaded on first use, reused afterwards."""
    tag = engine_tag(settings)
    holder = _SHARED.acquire(lambda: EngineHolder(settings), tag=tag)
    if _KEEP.get(tag) is not holder:
        _KEEP.clear()
        _KEEP[tag] = holder
    return holder


def completion_record(request: ValidRequest, result, model_name: str) -> dict:
    """The completions-output record of a served request ("prompt": the text as rendered). With
    n samples it is sample 0's record holding every sample's under "samples": the writer puts
    them in one piece, one row each, so a row's samples are committed together or not at all."""
    records = [_sample_record(request, s, model_name) for s in result.all_samples()]
    if len(records) == 1:
        return records[0]
    return {**records[0], "samples": records}


def _sample_record(request: ValidRequest, result, model_name: str) -> dict:
    return {
        "id": request.id,
        "prompt": request.prompt,
        "completion": result.completion,
        "completion_token_ids": [int(t) for t in result.completion_token_ids],
        "finish_reason": result.finish_reason,
        "prompt_tokens": int(result.prompt_tokens),
        "completion_tokens": int(result.completion_tokens),
        "ttft_s": result.ttft_s,
        "latency_s": result.latency_s,
        "model": model_name,
        "prompt_format": request.kind,
        "logprobs": result.logprobs,
        "sample_index": int(result.sample_index),
        "prompt_logprobs": result.prompt_logprobs,
        "row": request.row,
    }


def generate_error(request: ValidRequest, reason: str) -> dict:
    return error_record(request.id, reason, "generate", request.row, request.source)


class EngineMetrics:
    """The Beam metrics of engine work, the same names from either integration."""

    def __init__(self):
        self.completed = Metrics.counter(NAMESPACE, "completions")
        self.errored = Metrics.counter(NAMESPACE, "generate_errors")
        self.prompt_tokens = Metrics.counter(NAMESPACE, "prompt_tokens")
        self.generated_tokens = Metrics.counter(NAMESPACE, "generated_tokens")
        self.decode_calls = Metrics.counter(NAMESPACE, "decode_calls")
        self.page_waits = Metrics.counter(NAMESPACE, "page_waits")
        self.ttft_ms = Metrics.distribution(NAMESPACE, "ttft_ms")
        self.latency_ms = Metrics.distribution(NAMESPACE, "latency_ms")

    def served(self, result) -> None:
        self.completed.inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(sum(s.completion_tokens for s in result.all_samples()))
        if result.ttft_s is not None:
            self.ttft_ms.update(int(result.ttft_s * 1000))
        if result.latency_s is not None:
            self.latency_ms.update(int(result.latency_s * 1000))


class EngineCall:
    """One call of a process's engine on ValidRequests, under its lock.

    Iterating yields `(index, ok, record)` exactly once per request, in completion order: the
    request's completion record (ok) or a "generate" error record. Afterwards `stats` holds the
    call's times, tokens and scheduler counters, as a STATS record reports them."""

    def __init__(self, holder: EngineHolder, requests: Sequence[ValidRequest], metrics: EngineMetrics,
                 label: str = "", progress_seconds: float = 10.0):
        self.holder, self.requests, self.metrics = holder, list(requests), metrics
        self.label = label
        self.progress_seconds = progress_seconds
        self.stats: dict = {}

    def __iter__(self) -> Iterator[tuple[int, bool, dict]]:
        holder, llm, reqs, m = self.holder, self.holder.llm, self.requests, self.metrics
        with holder.lock:
            t_start = last_log = time.time()
            before = llm.stats()
            pending = set(range(len(reqs)))
            ptok = gtok = 0
            for res in llm.generate(r.to_request(request_id=i, metadata=i) for i, r in enumerate(reqs)):
                i = res.metadata
                if i not in pending:  # not ours: should never happen
                    log.warning("jetbeam: engine returned an unknown result id %r", res.id)
                    continue
                pending.discard(i)
                if res.error is not None:
                    m.errored.inc()
                    yield i, False, generate_error(reqs[i], res.error)
                else:
                    m.served(res)
                    ptok += res.prompt_tokens
                    gtok += sum(s.completion_tokens for s in res.all_samples())
                    yield i, True, completion_record(reqs[i], res, llm.model_name)
                now = time.time()
                if now - last_log >= self.progress_seconds:
                    last_log, el, done = now, max(now - t_start, 1e-9), len(reqs) - len(pending)
                    log.info("jetbeam engine %s %s: %d/%d rows, %d tokens generated, %.1f tok/s, %.2f rows/s",
                             holder.name, self.label, done, len(reqs), gtok, gtok / el, done / el)
            for i in sorted(pending):  # exactly one output per row, whatever the engine did
                m.errored.inc()
                yield i, False, generate_error(reqs[i], "engine returned no result for this row")
            t_end = time.time()
            after = llm.stats()
            sched = {k: after.get(k, 0) - before.get(k, 0) for k in SCHEDULER_STATS}
            for k in ("kv_pages", "kv_pages_peak"):  # sizes, not running counts
                if k in after:
                    sched[k] = after[k]
            m.decode_calls.inc(sched["decode_calls"])
            m.page_waits.inc(sched["page_waits"])
            holder.rows_done += len(reqs)
            holder.tokens_done += gtok
        el = max(t_end - t_start, 1e-9)
        log.info("jetbeam engine %s %s: served %d rows in %.1fs: %d prompt + %d generated tokens, "
                 "%.1f generated tok/s (engine total: %d rows, %d tokens)", holder.name, self.label, len(reqs),
                 el, ptok, gtok, gtok / el, holder.rows_done, holder.tokens_done)
        self.stats = {
            "engine": holder.name, "rows": len(reqs), "t_start": t_start, "t_end": t_end,
            "prompt_tokens": ptok, "completion_tokens": gtok, "model": llm.model_name,
            "engine_config": holder.engine_config, "device_info": holder.device_info,
            "load_time_s": holder.load_time_s, "scheduler": sched,
        }
