"""write: completions -> completions-*.parquet, errors -> errors-*.jsonl, then metrics.json/.csv.

Files are written through fsspec/pyarrow (local or gs:// via gcsfs), one per bundle (at
most `max_rows_per_file` rows each) and named `completions-<run id>-<uuid>.parquet` /
`errors-<run id>-<uuid>.jsonl`, so finished bundles are on disk even if the job dies
later (a `--skip_existing` rerun then serves only what is missing). A final step runs once
after every file is written:

  * deletes files of this run that no committed bundle reported (left by retried bundles),
  * deletes earlier runs' errors files (their rows were served again by this run) and,
    unless --skip_existing, earlier runs' completions files (a plain rerun replaces them),
  * writes metrics.json and metrics.csv.

Completions columns: id, prompt, completion, completion_token_ids, finish_reason,
prompt_tokens, completion_tokens, ttft_s, latency_s, model, then the input row's other
columns (an input column whose name clashes with one of these is written as input_<name>).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
import uuid
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from engine.sched_stats import SCHEDULER_STATS, slot_occupancy
from transforms import fs
from transforms.read import COMPLETIONS_PREFIX, ERRORS_PREFIX, NAMESPACE

log = logging.getLogger(__name__)

FIXED_COLUMNS = ("id", "prompt", "completion", "completion_token_ids", "finish_reason", "prompt_tokens",
                 "completion_tokens", "ttft_s", "latency_s", "model")


def _fixed_schema():
    import pyarrow as pa
    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
        ("completion_token_ids", pa.list_(pa.int32())), ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
        ("ttft_s", pa.float64()), ("latency_s", pa.float64()), ("model", pa.string()),
    ])


def _json_default(o):
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


def to_json(o) -> str:
    return json.dumps(o, ensure_ascii=False, default=_json_default)


def completions_table(records: list, id_column: str = "id", prompt_column: str = "prompt"):
    """A pyarrow Table of completion records, with the input rows' other columns passed through."""
    import pyarrow as pa
    schema = _fixed_schema()
    arrays = [pa.array([r.get(f.name) for r in records], type=f.type) for f in schema]
    names = list(schema.names)
    extra: dict = {}  # output column -> values, in order of first appearance
    for i, r in enumerate(records):
        row = r.get("row") or {}
        for k, v in row.items():
            if k == id_column:
                continue
            if k == prompt_column and isinstance(v, str):
                continue
            name = f"input_{k}" if k in FIXED_COLUMNS else k
            if name not in extra:
                extra[name] = [None] * len(records)
            extra[name][i] = v
    for name, values in extra.items():
        try:
            arr = pa.array(values)
            if pa.types.is_null(arr.type):
                arr = arr.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
            arr = pa.array([None if v is None else to_json(v) for v in values], type=pa.string())
        arrays.append(arr)
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _end_of_bundle(value):
    return WindowedValue(value, window.GlobalWindow().max_timestamp(), [window.GlobalWindow()])


class _WriteFilesFn(beam.DoFn):
    """Buffers a bundle's records and writes them as files; outputs one info dict per file."""

    kind = ""
    ext = ""

    def __init__(self, output_dir: str, run_id: str, max_rows_per_file: int = 50_000,
                 id_column: str = "id", prompt_column: str = "prompt"):
        self.output_dir = output_dir
        self.run_id = run_id
        self.max_rows = max(1, int(max_rows_per_file))
        self.id_column = id_column
        self.prompt_column = prompt_column
        self.records: list = []
        self.files = Metrics.counter(NAMESPACE, f"{self.kind}_files")

    def setup(self):
        fs.makedirs(self.output_dir)

    def start_bundle(self):
        self.records = []

    def process(self, record):
        self.records.append(record)
        if len(self.records) >= self.max_rows:
            info = self._write()
            yield info

    def finish_bundle(self):
        if self.records:
            yield _end_of_bundle(self._write())

    def _write(self) -> dict:
        records, self.records = self.records, []
        name = f"{self.kind}-{self.run_id}-{uuid.uuid4().hex[:12]}.{self.ext}"
        path = fs.join(self.output_dir, name)
        data = self._encode(records)
        if fs.is_remote(path):  # object stores publish an object only once fully written
            fs.write_bytes(path, data)
        else:  # local: never leave a half-written file under the final name
            tmp = fs.join(self.output_dir, f".{name}.inprogress")
            fs.write_bytes(tmp, data)
            os.replace(tmp, path)
        self.files.inc()
        info = {"kind": self.kind, "path": path, "name": name, "rows": len(records)}
        info.update(self._summary(records))
        return info

    def _encode(self, records) -> bytes:
        raise NotImplementedError

    def _summary(self, records) -> dict:
        return {}


class WriteCompletionsFn(_WriteFilesFn):
    kind = "completions"
    ext = "parquet"

    def _encode(self, records) -> bytes:
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(completions_table(records, self.id_column, self.prompt_column), buf,
                       compression="zstd")
        return buf.getvalue()

    def _summary(self, records) -> dict:
        return {"prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in records),
                "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in records)}


class WriteErrorsFn(_WriteFilesFn):
    kind = "errors"
    ext = "jsonl"

    def _encode(self, records) -> bytes:
        lines = [to_json({"id": r.get("id"), "stage": r.get("stage"), "reason": r.get("reason"),
                          "row": r.get("row")}) for r in records]
        return ("\n".join(lines) + "\n").encode("utf-8")

    def _summary(self, records) -> dict:
        by_stage: dict = {}
        for r in records:
            by_stage[r.get("stage") or "?"] = by_stage.get(r.get("stage") or "?", 0) + 1
        return {"by_stage": by_stage}


# ---- metrics ----

def _percentile(quantiles: list, p: int) -> Optional[float]:
    """p-th percentile from ApproximateQuantiles' 101 values (0th..100th)."""
    if not quantiles:
        return None
    i = round(p / 100 * (len(quantiles) - 1))
    return float(quantiles[int(i)])


def compute_metrics(*, files: list, stats: list, ttft_q: list, latency_q: list, rows_in: int,
                    skipped: int, launch_time: float, end_time: float, run_id: str,
                    output_dir: str, options: dict) -> dict:
    comp = [f for f in files if f["kind"] == "completions"]
    errs = [f for f in files if f["kind"] == "errors"]
    completed = sum(f["rows"] for f in comp)
    errored = sum(f["rows"] for f in errs)
    prompt_tokens = sum(f.get("prompt_tokens", 0) for f in comp)
    generated = sum(f.get("completion_tokens", 0) for f in comp)
    errors_by_stage: dict = {}
    for f in errs:
        for k, v in (f.get("by_stage") or {}).items():
            errors_by_stage[k] = errors_by_stage.get(k, 0) + v
    if stats:
        gen_wall = max(s["t_end"] for s in stats) - min(s["t_start"] for s in stats)
    else:
        gen_wall = 0.0
    job_wall = max(end_time - launch_time, 0.0)
    engines: dict = {}
    for s in stats:
        engines.setdefault(s["engine"], s)
    first = next(iter(engines.values()), None)
    dev = (first or {}).get("device_info") or {}

    def rate(x, t):
        return round(x / t, 3) if t > 0 else None

    def r6(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 6)

    return {
        "run_id": run_id,
        "output": output_dir,
        "model": (first or {}).get("model") or (options.get("settings") or {}).get("model"),
        "rows_in": rows_in,
        "rows_skipped_existing": skipped,
        "rows_served": rows_in - skipped,
        "completed": completed,
        "errored": errored,
        "errors_by_stage": errors_by_stage,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_time_s": round(gen_wall, 3),
        "job_wall_time_s": round(job_wall, 3),
        "output_tok_per_s": rate(generated, gen_wall),
        "total_tok_per_s": rate(prompt_tokens + generated, gen_wall),
        "requests_per_s": rate(completed, gen_wall),
        "job_output_tok_per_s": rate(generated, job_wall),
        "ttft_p50_s": r6(_percentile(ttft_q, 50)),
        "ttft_p90_s": r6(_percentile(ttft_q, 90)),
        "ttft_p99_s": r6(_percentile(ttft_q, 99)),
        "latency_p50_s": r6(_percentile(latency_q, 50)),
        "latency_p90_s": r6(_percentile(latency_q, 90)),
        "latency_p99_s": r6(_percentile(latency_q, 99)),
        "engines": len(engines),
        "engine_flushes": len(stats),
        "engine_load_time_s": round(max((s.get("load_time_s") or 0) for s in engines.values()), 3) if engines else None,
        "engine_config": (first or {}).get("engine_config"),
        "scheduler": scheduler_metrics(stats, ((first or {}).get("engine_config") or {}).get("batch_size")),
        "device_kind": dev.get("device_kind"),
        "device_count": sum(int((s.get("device_info") or {}).get("device_count") or 0) for s in engines.values()),
        "devices_per_engine": dev.get("device_count"),
        "completions_files": len(comp),
        "errors_files": len(errs),
        "options": options,
    }


def scheduler_metrics(stats: list, batch_size) -> dict:
    """How the decode slots were used, over every flush of every engine: the batcher's counts
    summed, the mean number of slots decoding per call (and as a share of batch_size), and for
    a paged KV cache the most pages any flush held at once against the pool's size. A low
    occupancy with page_waits > 0 says the pool, not the slot count, limits the job."""
    per = [s.get("scheduler") or {} for s in stats]
    out = {k: sum(int(p.get(k, 0)) for p in per) for k in SCHEDULER_STATS}
    out.update(slot_occupancy(out["live_slots"], out["decode_calls"], batch_size))
    peaks = [p["kv_pages_peak"] for p in per if "kv_pages_peak" in p]
    if peaks:
        out["kv_pages_peak"] = max(peaks)
        out["kv_pages"] = max(p["kv_pages"] for p in per if "kv_pages" in p)
    return out


def metrics_csv(metrics: dict) -> str:
    flat = {k: (to_json(v) if isinstance(v, (dict, list)) else v) for k, v in metrics.items()}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flat))
    w.writeheader()
    w.writerow(flat)
    return buf.getvalue()


class FinalizeFn(beam.DoFn):
    """Runs once after all files are written: clean-up, then metrics.json and metrics.csv."""

    def __init__(self, output_dir: str, run_id: str, skip_existing: bool, launch_time: float, options: dict):
        self.output_dir = output_dir
        self.run_id = run_id
        self.skip_existing = skip_existing
        self.launch_time = launch_time
        self.options = options

    def process(self, _, files, stats, ttft_q, latency_q, rows_in, skipped):
        committed = {f["name"] for f in files}
        removed = []
        for prefix, ext in ((COMPLETIONS_PREFIX, ".parquet"), (ERRORS_PREFIX, ".jsonl")):
            for path in fs.list_files(self.output_dir, prefix, ext):
                name = fs.basename(path)
                ours = name.startswith(f"{prefix}{self.run_id}-")
                if ours and name in committed:
                    continue
                if ours:  # written by a bundle attempt that did not commit
                    pass
                elif prefix == COMPLETIONS_PREFIX and self.skip_existing:
                    continue  # earlier completions are kept: this run only added what was missing
                fs.remove(path)
                removed.append(name)
        if removed:
            log.info("jetbeam: removed %d superseded output files: %s", len(removed), removed[:10])
        metrics = compute_metrics(
            files=files, stats=stats, ttft_q=ttft_q or [], latency_q=latency_q or [], rows_in=rows_in,
            skipped=skipped, launch_time=self.launch_time, end_time=time.time(), run_id=self.run_id,
            output_dir=self.output_dir, options=self.options)
        metrics["removed_old_files"] = len(removed)
        fs.write_bytes(fs.join(self.output_dir, "metrics.json"),
                       (json.dumps(metrics, indent=2, default=_json_default) + "\n").encode("utf-8"))
        fs.write_bytes(fs.join(self.output_dir, "metrics.csv"), metrics_csv(metrics).encode("utf-8"))
        log.info("jetbeam: %d rows in, %d completed, %d errors, %d skipped; %d generated tokens, %s tok/s; "
                 "outputs in %s", metrics["rows_in"], metrics["completed"], metrics["errored"],
                 metrics["rows_skipped_existing"], metrics["generated_tokens"], metrics["output_tok_per_s"],
                 self.output_dir)
        yield metrics


def _quantiles(pcoll, field: str, label: str):
    return (pcoll
            | f"{label}Values" >> beam.FlatMap(lambda r: [float(r[field])] if r.get(field) is not None else [])
            | f"{label}Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(101))


class WriteOutputs(beam.PTransform):
    """{completions, errors, stats, rows_in, skipped} -> files + metrics; returns the metrics PCollection."""

    def __init__(self, output_dir: str, run_id: str, skip_existing: bool, launch_time: float,
                 options: dict, id_column: str = "id", prompt_column: str = "prompt",
                 max_rows_per_file: int = 50_000):
        super().__init__()
        self.output_dir = output_dir
        self.run_id = run_id
        self.skip_existing = skip_existing
        self.launch_time = launch_time
        self.options = options
        self.id_column = id_column
        self.prompt_column = prompt_column
        self.max_rows_per_file = max_rows_per_file

    def expand(self, inputs):
        completions, errors = inputs["completions"], inputs["errors"]
        kw = dict(output_dir=self.output_dir, run_id=self.run_id, max_rows_per_file=self.max_rows_per_file,
                  id_column=self.id_column, prompt_column=self.prompt_column)
        comp_files = completions | "WriteCompletions" >> beam.ParDo(WriteCompletionsFn(**kw))
        err_files = errors | "WriteErrors" >> beam.ParDo(WriteErrorsFn(**kw))
        files = (comp_files, err_files) | "AllFiles" >> beam.Flatten()
        ttft_q = _quantiles(completions, "ttft_s", "Ttft")
        latency_q = _quantiles(completions, "latency_s", "Latency")
        # The per-flush stats reach Finalize as one list built by a combiner, not through
        # AsList: Beam's local FnApiRunner (2.77) hands AsList every element a stateful DoFn
        # emitted from process() twice (not those from its timers); ToList sees each once.
        stats = inputs["stats"] | "CollectStats" >> beam.combiners.ToList()
        p = completions.pipeline
        return (p
                | "Once" >> beam.Create([None])
                | "Finalize" >> beam.ParDo(
                    FinalizeFn(self.output_dir, self.run_id, self.skip_existing, self.launch_time, self.options),
                    files=beam.pvalue.AsList(files),
                    stats=beam.pvalue.AsSingleton(stats, default_value=[]),
                    ttft_q=beam.pvalue.AsSingleton(ttft_q, default_value=[]),
                    latency_q=beam.pvalue.AsSingleton(latency_q, default_value=[]),
                    rows_in=beam.pvalue.AsSingleton(inputs["rows_in"], default_value=0),
                    skipped=beam.pvalue.AsSingleton(inputs["skipped"], default_value=0)))
