"""read: input files -> rows `{"id": str, "row": dict}`, plus error records for what cannot be read.

Formats: Parquet (pyarrow, streamed by record batch), JSONL (one JSON object per line; a
bare JSON string is a prompt; a `.json` file may also hold one JSON array; `.gz`, `.bz2`, `.xz`
and `.zst` files are decompressed as they stream) and OpenAI batch files (JSONL lines with
`custom_id` and a `body` holding `prompt` or `messages`, `max_tokens`, `temperature`, ...).

Every row gets a stable id: the value of the id column, else `<file name>:<row number>` (0-based;
for JSONL the line index), the file named relative to its --input entry (fs.expand_inputs). A
file that cannot be opened or parsed yields an error record instead of failing the job; a bad
JSONL line yields an error record for that line.
"""

from __future__ import annotations

import io
import json
import logging
import math
import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import fs

log = logging.getLogger(__name__)
NAMESPACE = "jetbeam"
ERRORS = "errors"

# OpenAI batch `body` fields we understand (others are ignored, like `model` and `n`).
_OPENAI_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n")


def error_record(id_, reason: str, stage: str, row=None, source=None) -> dict:
    """An errors-output record; `source` (<file>:<row>) names the input row where it is known.
    The reason is kept to one line."""
    return {"id": str(id_), "reason": " ".join(str(reason).split()), "stage": stage, "row": row, "source": source}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def row_id(row: dict, id_column: str, source: str, index: int) -> str:
    v = row.get(id_column) if isinstance(row, dict) else None
    if _missing(v) or (isinstance(v, str) and not v.strip()):
        return f"{source}:{index}"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def normalize_openai(row: dict, id_column: str, prompt_column: str) -> dict:
    """An OpenAI batch line -> a flat row (id, prompt or messages, sampling columns, url)."""
    body = row.get("body") or {}
    out = {id_column: row.get("custom_id"), "custom_id": row.get("custom_id")}
    if row.get("url") is not None:
        out["url"] = row["url"]
    if "messages" in body:
        out["messages"] = body["messages"]
    if "prompt" in body:
        out[prompt_column] = body["prompt"]
    for k in _OPENAI_SAMPLING:
        if k in body:
            out[k] = body[k]
    if "max_completion_tokens" in body and "max_tokens" not in body:
        out["max_tokens"] = body["max_completion_tokens"]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        out["json_schema"] = spec.get("schema") if isinstance(spec, dict) else spec
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["json_schema"] = {"type": "object"}
    lp = body.get("logprobs")
    if "messages" in body and lp is True:  # chat: logprobs true, top_logprobs 0-20
        out["logprobs"] = body.get("top_logprobs") or 0
    elif "messages" not in body and lp is not None and lp is not False:  # completions: logprobs 0-5
        out["logprobs"] = lp
    return out


def is_openai_line(obj) -> bool:
    return isinstance(obj, dict) and "custom_id" in obj and isinstance(obj.get("body"), dict)


class ReadFileFn(beam.DoFn):
    """One input file -> its rows (main output) and error records (ERRORS)."""

    def __init__(self, id_column: str = "id", prompt_column: str = "prompt",
                 batch_rows: int = 1024):
        self.id_column = id_column
        self.prompt_column = prompt_column
        self.batch_rows = batch_rows
        self.rows_read = Metrics.counter(NAMESPACE, "rows_read")
        self.read_errors = Metrics.counter(NAMESPACE, "read_errors")
        self.files_read = Metrics.counter(NAMESPACE, "files_read")

    def process(self, numbered):
        file_no, (path, source) = numbered
        kind = "parquet" if fs.is_parquet(path) else "jsonl"
        index = -1
        try:
            reader = self._parquet(path, source) if kind == "parquet" else self._jsonl(path)
            for index, row in reader:
                if isinstance(row, dict) and "__error__" in row:
                    self.read_errors.inc()
                    yield beam.pvalue.TaggedOutput(ERRORS, error_record(
                        row.get("__id__") or f"{source}:{index}", row["__error__"], "read",
                        {"file": path, "line": row.get("__line__")}, f"{path}:{index}"))
                    continue
                self.rows_read.inc()
                yield {"id": row_id(row, self.id_column, source, index), "row": row,
                       "source": f"{path}:{index}", "order": (file_no, index)}
            self.files_read.inc()
        except Exception as e:  # unreadable file: one error record, the job goes on
            self.read_errors.inc()
            where = "file" if index < 0 else f"after-row-{index}"
            log.error("jetbeam: cannot read %s: %s", path, e)
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(
                f"{source}:{where}", f"unreadable {kind} input file {path}: {type(e).__name__}: {e}",
                "read", {"file": path}, path))

    def _parquet(self, path: str, source: str):
        """Rows of each row group; a row group that cannot be decoded becomes one error record
        (its rows keep their numbers, from the footer, so later row groups' ids do not shift)."""
        import pyarrow.parquet as pq
        with fs.open_file(path, "rb") as f:
            pf = pq.ParquetFile(f)
            start = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                index = start
                try:
                    for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[group]):
                        for row in batch.to_pylist():
                            yield index, row
                            index += 1
                except Exception as e:
                    yield index, {"__error__": f"row group {group} of {path} (rows {start}..{start + n - 1}) is "
                                               f"unreadable from row {index}: {type(e).__name__}: {e}",
                                  "__id__": f"{source}:row-group-{group}"}
                start += n

    def _jsonl(self, path: str):
        codec = fs.compression(path)

        def open_():  # each pass opens the file afresh: compressed streams do not seek back
            f = fs.open_file(path, "rb", compression=codec)
            return io.BufferedReader(f) if codec else f  # zstd's reader has no readline

        if fs.uncompressed_name(path).endswith(".json"):
            with open_() as f:
                head = f.read(4096).lstrip()
            if head.startswith(b"["):  # a .json file holding one JSON array of rows
                with open_() as f:
                    try:
                        rows = json.load(f)
                    except ValueError:
                        rows = None  # not an array after all: read as JSON lines
                if rows is not None:
                    for index, obj in enumerate(rows):
                        yield index, self._row(obj, path, index, "element")
                    return
        with open_() as f:
            for index, raw in enumerate(f):
                line = raw.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
                    yield index, {"__error__": f"line {index + 1} of {path} is not valid JSON: {e}",
                                  "__line__": index + 1}
                    continue
                yield index, self._row(obj, path, index, "line")

    def _row(self, obj, path, index, what):
        if isinstance(obj, str):
            return {self.prompt_column: obj}
        if is_openai_line(obj):
            return normalize_openai(obj, self.id_column, self.prompt_column)
        if not isinstance(obj, dict):
            return {"__error__": f"{what} {index + 1} of {path} is not a JSON object or string",
                    "__line__": index + 1}
        return obj


class ReadInputs(beam.PTransform):
    """Files -> rows; `result[ERRORS]` holds error records for unreadable files/lines.

    `files` is the expanded list of (path, name) (fs.expand_inputs), so a glob that matches
    nothing fails at launch with a clear message instead of producing an empty job.
    """

    def __init__(self, files: list[tuple[str, str]], id_column: str = "id", prompt_column: str = "prompt"):
        super().__init__()
        self.files = [tuple(f) for f in files]
        self.id_column = id_column
        self.prompt_column = prompt_column

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(list(enumerate(self.files)))
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadFile" >> beam.ParDo(ReadFileFn(self.id_column, self.prompt_column))
                .with_outputs(ERRORS, main="rows"))
