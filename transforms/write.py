"""write: completions and errors -> committed pieces while the job runs, then the run's metrics.

Rows are committed as they finish: each writer buffers its records and publishes a piece
(`completions-<run>-<piece>.parquet`, `errors-<run>-<piece>.jsonl`; transforms/output_dir.py)
every `commit_rows` records or `commit_seconds` after the first buffered one, and at the end
of each bundle. A piece appears whole or not at all, so a killed job keeps every committed row
and a resume serves only the rest.

Finalize runs once after every piece is written:

  * removes pieces of this run that no committed bundle reported (a retried bundle's first
    attempt on Dataflow), so a retry never leaves a second copy of a row,
  * heals the directory (one record per key; transforms/output_dir.heal),
  * with output_format "openai", rewrites the OpenAI batch output file from every committed
    row (transforms/openai_output.py),
  * writes metrics-<run>.json / .csv, updates the run's manifest and the directory summary
    metrics.json / .csv.

Completions columns: id, prompt, completion, completion_token_ids, finish_reason,
prompt_tokens, completion_tokens, ttft_s, latency_s, model, prompt_format (raw, chat or tokens: how
the prompt reached the model), logprobs, sample_index (0..n-1: a row asking for n samples has n
rows, committed in one piece), prompt_logprobs, then the input row's other
columns (an input column whose name clashes with one of these is written as input_<name>).
"""

from __future__ import annotations

import io
import json
import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from transforms import fs
from transforms.metrics import compute_metrics, directory_summary, metrics_csv, summary_csv
from transforms.openai_output import write_openai_output
from transforms.output_dir import (COMPLETIONS, ERRORS, encode_errors, heal, list_pieces, piece_name,
                                   read_manifests, tmp_dir, to_json, write_manifest)
from transforms.read import NAMESPACE

log = logging.getLogger(__name__)

FIXED_COLUMNS = ("id", "prompt", "completion", "completion_token_ids", "finish_reason", "prompt_tokens",
                 "completion_tokens", "ttft_s", "latency_s", "model", "prompt_format", "logprobs",
                 "sample_index", "prompt_logprobs")


def _fixed_schema():
    import pyarrow as pa
    alt = [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]
    logprobs = pa.list_(pa.struct(alt + [("top_logprobs", pa.list_(pa.struct(alt)))]))
    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
        ("completion_token_ids", pa.list_(pa.int32())), ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
        ("ttft_s", pa.float64()), ("latency_s", pa.float64()), ("model", pa.string()),
        ("prompt_format", pa.string()), ("logprobs", logprobs),  # null unless the row asked for them
        ("sample_index", pa.int32()),
        ("prompt_logprobs", logprobs),  # null unless asked for; its first entry null (no context)
    ])


def completions_table(records: list, id_column: str = "id", prompt_column: str = "prompt"):
    """A pyarrow Table of completion records (one row per sample), with the input rows' other
    columns passed through."""
    import pyarrow as pa
    records = [s for r in records for s in (r.get("samples") or [r])]
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
    """Buffers records and commits them as pieces; outputs one info dict per committed piece."""

    kind = ""

    def __init__(self, output_dir: str, run_id: str, commit_rows: int = 256, commit_seconds: float = 30.0,
                 id_column: str = "id", prompt_column: str = "prompt"):
        self.output_dir = output_dir
        self.run_id = run_id
        self.commit_rows = max(1, int(commit_rows))
        self.commit_seconds = float(commit_seconds)
        self.id_column = id_column
        self.prompt_column = prompt_column
        self.records: list = []
        self.first_at = 0.0
        self.pieces = Metrics.counter(NAMESPACE, f"{self.kind}_pieces")

    def setup(self):
        fs.makedirs(self.output_dir)

    def start_bundle(self):
        self.records = []

    def process(self, record):
        if not self.records:
            self.first_at = time.monotonic()
        self.records.append(record)
        if len(self.records) >= self.commit_rows or time.monotonic() - self.first_at >= self.commit_seconds:
            yield self._commit()

    def finish_bundle(self):
        if self.records:
            yield _end_of_bundle(self._commit())

    def _commit(self) -> dict:
        records, self.records = self.records, []
        name = piece_name(self.kind, self.run_id)
        fs.publish(fs.join(self.output_dir, name), self._encode(records), tmp_dir(self.output_dir))
        self.pieces.inc()
        info = {"kind": self.kind, "name": name, "rows": len(records)}
        info.update(self._summary(records))
        return info

    def _encode(self, records) -> bytes:
        raise NotImplementedError

    def _summary(self, records) -> dict:
        return {}


class WriteCompletionsFn(_WriteFilesFn):
    kind = COMPLETIONS

    def _encode(self, records) -> bytes:
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(completions_table(records, self.id_column, self.prompt_column), buf,
                       compression="zstd")
        return buf.getvalue()

    def _summary(self, records) -> dict:
        samples = [s for r in records for s in (r.get("samples") or [r])]
        return {"prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in records),
                "completion_tokens": sum(int(s.get("completion_tokens") or 0) for s in samples),
                "completion_rows": len(samples)}


class WriteErrorsFn(_WriteFilesFn):
    kind = ERRORS

    def _encode(self, records) -> bytes:
        return encode_errors(records)

    def _summary(self, records) -> dict:
        by_stage: dict = {}
        for r in records:
            by_stage[r.get("stage") or "?"] = by_stage.get(r.get("stage") or "?", 0) + 1
        return {"by_stage": by_stage}


class FinalizeFn(beam.DoFn):
    """Runs once after every piece is committed: drop retry leftovers, heal, write the metrics."""

    def __init__(self, output_dir: str, run_id: str, launch_time: float, options: dict,
                 output_format: str = "parquet", id_column: str = "id"):
        self.output_dir = output_dir
        self.run_id = run_id
        self.launch_time = launch_time
        self.options = options
        self.output_format = output_format
        self.id_column = id_column

    def process(self, _, files, stats, ttft_q, latency_q, rows_in, skipped):
        reported = {f["name"] for f in files}
        unreported = [p for p in list_pieces(self.output_dir)
                      if p.run_id == self.run_id and p.name not in reported]
        for p in unreported:  # written by a bundle attempt whose outputs Beam discarded
            fs.remove(p.path)
        if unreported:
            log.info("jetbeam: removed %d pieces of retried bundles", len(unreported))
        scan = heal(self.output_dir)
        if scan.removed_records:
            log.warning("jetbeam: %s: removed %d duplicate records (%s)", self.output_dir, scan.removed_records,
                        ", ".join(scan.removed_pieces[:5]))
        end = time.time()
        metrics = compute_metrics(
            files=files, stats=stats, ttft_q=ttft_q or [], latency_q=latency_q or [], rows_in=rows_in,
            skipped=skipped, launch_time=self.launch_time, end_time=end, run_id=self.run_id,
            output_dir=self.output_dir, options=self.options)
        metrics["retry_pieces_removed"] = len(unreported)
        metrics["duplicates_removed"] = scan.removed_records
        if self.output_format == "openai":
            metrics["openai_output_lines"] = write_openai_output(self.output_dir, self.id_column)
        fs.write_bytes(fs.join(self.output_dir, f"metrics-{self.run_id}.json"),
                       (json.dumps(metrics, indent=2, default=str) + "\n").encode("utf-8"))
        fs.write_bytes(fs.join(self.output_dir, f"metrics-{self.run_id}.csv"), metrics_csv(metrics).encode("utf-8"))
        manifests = read_manifests(self.output_dir)
        mine = next((m for m in manifests if m["run_id"] == self.run_id), None)
        if mine is None:
            mine = {"run_id": self.run_id, "started": self.launch_time}
            manifests.append(mine)
        mine.update(status="finished", ended=end, metrics={k: metrics.get(k) for k in metrics
                                                            if not isinstance(metrics[k], (dict, list))})
        write_manifest(self.output_dir, self.run_id, mine)
        summary = directory_summary(self.output_dir, manifests, scan, end)
        fs.write_bytes(fs.join(self.output_dir, "metrics.json"),
                       (json.dumps(summary, indent=2, default=str) + "\n").encode("utf-8"))
        fs.write_bytes(fs.join(self.output_dir, "metrics.csv"), summary_csv(summary).encode("utf-8"))
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
    """{completions, errors, stats, rows_in, skipped} -> committed pieces + metrics; returns the metrics."""

    def __init__(self, output_dir: str, run_id: str, launch_time: float, options: dict, *,
                 commit_rows: int = 256, commit_seconds: float = 30.0, id_column: str = "id",
                 prompt_column: str = "prompt", output_format: str = "parquet"):
        super().__init__()
        self.output_dir = output_dir
        self.run_id = run_id
        self.launch_time = launch_time
        self.options = options
        self.output_format = output_format
        self.id_column = id_column
        self.kw = dict(output_dir=output_dir, run_id=run_id, commit_rows=commit_rows,
                       commit_seconds=commit_seconds, id_column=id_column, prompt_column=prompt_column)

    def expand(self, inputs):
        completions, errors = inputs["completions"], inputs["errors"]
        comp_files = completions | "WriteCompletions" >> beam.ParDo(WriteCompletionsFn(**self.kw))
        err_files = errors | "WriteErrors" >> beam.ParDo(WriteErrorsFn(**self.kw))
        files = (comp_files, err_files) | "AllFiles" >> beam.Flatten()
        ttft_q = _quantiles(completions, "ttft_s", "Ttft")
        latency_q = _quantiles(completions, "latency_s", "Latency")
        # The per-flush stats reach Finalize as one list built by a combiner, not through
        # AsList: Beam's local FnApiRunner hands AsList every element a stateful DoFn emitted
        # from process() twice (not those from its timers); ToList sees each once.
        stats = inputs["stats"] | "CollectStats" >> beam.combiners.ToList()
        p = completions.pipeline
        return (p
                | "Once" >> beam.Create([None])
                | "Finalize" >> beam.ParDo(
                    FinalizeFn(self.output_dir, self.run_id, self.launch_time, self.options,
                               self.output_format, self.id_column),
                    files=beam.pvalue.AsList(files),
                    stats=beam.pvalue.AsSingleton(stats, default_value=[]),
                    ttft_q=beam.pvalue.AsSingleton(ttft_q, default_value=[]),
                    latency_q=beam.pvalue.AsSingleton(latency_q, default_value=[]),
                    rows_in=beam.pvalue.AsSingleton(inputs["rows_in"], default_value=0),
                    skipped=beam.pvalue.AsSingleton(inputs["skipped"], default_value=0)))
