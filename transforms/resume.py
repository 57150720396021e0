"""resume: rows -> the rows still to serve, each id once, skipping what the output already holds.

Rows, read errors and the keys already committed in the output directory are grouped by id
(one CoGroupByKey, so it scales with the data, not the launcher):

  * the first row of an id (in input order: file, then row) is served unless the id is
    committed: it has a completion, or an error row (unless `retry_errors`);
  * each later row with the same id becomes an error row of stage "duplicate" naming the
    first, unless an earlier run committed that error row already;
  * a read error an earlier run committed is not written again (it counts as skipped).

So a resume after a kill serves exactly what is missing, and every input row ends in exactly
one record.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.output_dir import COMPLETIONS, DUPLICATE, list_pieces, read_all_keys
from transforms.read import ERRORS, NAMESPACE, error_record

SKIPPED = "skipped"


def committed_facts(output_dir: str):
    """(id, facts) of every record committed in `output_dir` (see output_dir.piece_keys)."""
    for keys in read_all_keys(list_pieces(output_dir)):
        for _, facts in keys:
            yield facts["id"], facts


class _Admit(beam.DoFn):
    def __init__(self, retry_errors: bool):
        self.retry_errors = retry_errors
        self.skipped = Metrics.counter(NAMESPACE, "rows_skipped_existing")
        self.duplicates = Metrics.counter(NAMESPACE, "duplicate_ids")

    def _committed(self, facts: list) -> bool:
        for f in facts:
            if f["kind"] == COMPLETIONS:
                return True
            if f.get("stage") not in (DUPLICATE, "read") and not self.retry_errors:
                return True
        return False

    def process(self, kv):
        id_, grouped = kv
        facts = list(grouped["committed"])
        read_errors = list(grouped["read_errors"])
        if any(f.get("stage") == "read" for f in facts):  # committed before: counted, not written again
            self.skipped.inc(len(read_errors))
            for _ in read_errors:
                yield beam.pvalue.TaggedOutput(SKIPPED, 1)
        else:
            for e in read_errors:
                yield beam.pvalue.TaggedOutput(ERRORS, e)
        rows = sorted(grouped["rows"], key=lambda r: tuple(r.get("order") or (0, 0)))
        if not rows:
            return
        first, later = rows[0], rows[1:]
        if self._committed(facts):
            self.skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, 1)
        else:
            yield first
        reported = {f.get("source") for f in facts if f.get("stage") == DUPLICATE}
        for r in later:
            if r.get("source") in reported:
                self.skipped.inc()
                yield beam.pvalue.TaggedOutput(SKIPPED, 1)
                continue
            self.duplicates.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(
                id_, f"id {id_!r} repeats the id of an earlier row ({first.get('source')}); only that "
                     f"row is served", DUPLICATE, r.get("row"), r.get("source")))


class SkipCommitted(beam.PTransform):
    """{rows, read_errors} -> tagged `rows` (to serve), ERRORS (read errors, repeated ids), SKIPPED."""

    def __init__(self, output_dir: str, retry_errors: bool = False):
        super().__init__()
        self.output_dir = output_dir
        self.retry_errors = retry_errors

    def expand(self, inputs):
        p = inputs["rows"].pipeline
        committed = (p
                     | "OutputDir" >> beam.Create([self.output_dir])
                     | "CommittedKeys" >> beam.FlatMap(committed_facts))
        rows = inputs["rows"] | "KeyRows" >> beam.Map(lambda r: (r["id"], r))
        read_errors = inputs["read_errors"] | "KeyReadErrors" >> beam.Map(lambda e: (e["id"], e))
        return ({"rows": rows, "read_errors": read_errors, "committed": committed}
                | "GroupById" >> beam.CoGroupByKey()
                | "Admit" >> beam.ParDo(_Admit(self.retry_errors)).with_outputs(ERRORS, SKIPPED, main="rows"))
