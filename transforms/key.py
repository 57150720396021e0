"""key: ValidRequests -> (engine shard, ValidRequest), spreading rows over `num_engines` shards.

The generate step is a stateful DoFn keyed by shard, so each shard is served by one
engine at a time and `num_engines` shards let that many engines (worker processes, e.g.
one per Dataflow worker) generate in parallel. The shard is a stable hash of the row id,
so a rerun puts each row on the same shard.

Note for Beam's local FnApiRunner: it runs a stateful stage on ONE worker even with
--direct_num_workers=N --direct_running_mode=multi_processing (fn_runner.py,
`_get_bundle_manager`: "a single key cannot be processed concurrently"), so locally only
one engine generates; reading, validation and writing still use every worker.

Keyed rows are re-stamped with the minimum timestamp. Batch rows carry no event time, and
the FnApiRunner schedules a processing-time timer by its *output* timestamp (the input
element's) rather than its firing time: rows that passed a GroupByKey (resume.py)
carry the end-of-window timestamp, and a flush timer set from one would never come due
("time-pending bundles did not execute"). With the minimum timestamp the local runner fires
the flush as soon as the bundle is done; Dataflow fires it at its processing time.
"""

from __future__ import annotations

import zlib

import apache_beam as beam
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from transforms.requests import ValidRequest  # importing it registers its coder


def shard_of(row_id: str, num_engines: int) -> int:
    return zlib.crc32(str(row_id).encode("utf-8")) % max(1, int(num_engines))


class KeyByEngine(beam.PTransform):
    def __init__(self, num_engines: int):
        super().__init__()
        self.num_engines = max(1, int(num_engines))

    def expand(self, requests):
        n = self.num_engines
        return requests | "AssignShard" >> beam.Map(
            lambda r: TimestampedValue((shard_of(r.id, n), r), MIN_TIMESTAMP)).with_input_types(
            ValidRequest).with_output_types(beam.typehints.Tuple[int, ValidRequest])
