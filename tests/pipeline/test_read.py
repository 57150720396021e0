"""read: what --input names (files, globs, directories of partition folders) and how each file is
read (Parquet; JSONL plain or compressed), through a real Beam pipeline."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from apache_beam.testing.util import assert_that, equal_to

from transforms import fs
from transforms.read import ERRORS, ReadInputs


def lines(*prompts) -> bytes:
    return "".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode()


@pytest.fixture()
def dataset(tmp_path):
    """A Hive-style folder: two partitions holding files of the same name, compressed JSONL of
    each codec, a Parquet file, and what a directory read must skip (_SUCCESS, _temporary/,
    .crc checksums, a README, a jetbeam output directory)."""
    root = tmp_path / "ds"
    for d in ("date=1", "date=2", "_temporary", ".hidden"):
        (root / d).mkdir(parents=True)
    (root / "date=1/part-0.jsonl").write_bytes(lines("a", "b"))
    (root / "date=2/part-0.jsonl").write_bytes(lines("c"))
    (root / "date=2/more.jsonl.gz").write_bytes(gzip.compress(lines("gz")))
    (root / "z.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(lines("zst0", "zst1")))
    (root / "x.jsonl.xz").write_bytes(lzma.compress(lines("xz")))
    (root / "arr.json.bz2").write_bytes(bz2.compress(json.dumps([{"prompt": "e0"}, "e1"]).encode()))
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(lines("lost"))[:15])
    pq.write_table(pa.Table.from_pylist([{"prompt": "pq"}]), str(root / "date=1/p.parquet"))
    (root / "date=1/_SUCCESS").write_bytes(b"")
    (root / "date=1/.p.parquet.crc").write_bytes(b"crc")
    (root / "_temporary/part-9.jsonl").write_bytes(lines("half-written"))
    (root / ".hidden/part-0.jsonl").write_bytes(lines("hidden"))
    (root / "README.md").write_text("not data")
    (root / "results/_jetbeam/runs").mkdir(parents=True)  # a jetbeam --output inside the input folder
    (root / "results/_jetbeam/runs/r.json").write_text("{}")
    pq.write_table(pa.Table.from_pylist([{"id": "x", "prompt": "p", "completion": "c"}]),
                   str(root / "results/completions-r-0.parquet"))
    return root


def test_inputs_expand_to_named_files(dataset, tmp_path):
    names = dict((n, p) for p, n in fs.expand_inputs(str(dataset)))
    assert sorted(names) == ["arr.json.bz2", "cut.jsonl.gz", "date=1/p.parquet", "date=1/part-0.jsonl",
                             "date=2/more.jsonl.gz", "date=2/part-0.jsonl", "x.jsonl.xz", "z.ndjson.zst"]
    assert names["date=2/part-0.jsonl"] == str(dataset / "date=2/part-0.jsonl")
    # a glob is named from its fixed part; a file named directly by its base name
    assert [n for _, n in fs.expand_inputs(f"{dataset}/date=*/part-0.jsonl")] == \
        ["date=1/part-0.jsonl", "date=2/part-0.jsonl"]
    assert fs.expand_inputs(f"{dataset}/date=2/part-0.jsonl") == [(str(dataset / "date=2/part-0.jsonl"),
                                                                   "part-0.jsonl")]
    assert fs.expand_inputs(f"{dataset}/x.jsonl.xz,{dataset}/x.jsonl.xz") == [(str(dataset / "x.jsonl.xz"),
                                                                               "x.jsonl.xz")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a directory with no Parquet or JSONL files"):
        fs.expand_inputs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="matches no files"):
        fs.expand_inputs(f"{tmp_path}/nothing-*.jsonl")


def test_directory_of_partitions_and_compressed_lines(dataset):
    """Every data file is read once; rows of same-named files in different partitions get
    different ids; each codec streams; a truncated archive is one error row naming it."""
    with beam.Pipeline() as p:
        read = p | ReadInputs(fs.expand_inputs(str(dataset)))
        assert_that(read.rows | "Ids" >> beam.Map(lambda r: (r["id"], r["row"]["prompt"])), equal_to([
            ("date=1/part-0.jsonl:0", "a"), ("date=1/part-0.jsonl:1", "b"), ("date=2/part-0.jsonl:0", "c"),
            ("date=2/more.jsonl.gz:0", "gz"), ("z.ndjson.zst:0", "zst0"), ("z.ndjson.zst:1", "zst1"),
            ("x.jsonl.xz:0", "xz"), ("arr.json.bz2:0", "e0"), ("arr.json.bz2:1", "e1"),
            ("date=1/p.parquet:0", "pq")]), label="rows")
        assert_that(read[ERRORS] | "Errors" >> beam.Map(
            lambda e: (e["id"], e["stage"], "cut.jsonl.gz" in e["reason"] and "EOFError" in e["reason"])),
            equal_to([("cut.jsonl.gz:file", "read", True)]), label="errors")
