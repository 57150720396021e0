"""Damaged and hostile inputs lose only what is damaged: real Parquet files through the pipeline."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tests.pipeline.test_pipeline import (assert_each_id_once, engine_args, read_outputs, run_job,  # noqa: F401
                                          tokenizer_dir)


def corrupt_row_group(path, group: int) -> None:
    """Overwrite every column chunk of one row group with garbage bytes."""
    md = pq.ParquetFile(path).metadata
    data = bytearray(open(path, "rb").read())
    rg = md.row_group(group)
    for c in range(rg.num_columns):
        col = rg.column(c)
        start = col.dictionary_page_offset if col.dictionary_page_offset is not None else col.data_page_offset
        data[start:start + col.total_compressed_size] = b"\xab" * col.total_compressed_size
    open(path, "wb").write(bytes(data))


def test_parquet_bad_row_group_serves_the_rest(tmp_path, tokenizer_dir):
    path = tmp_path / "rg.parquet"
    rows = [{"prompt": f"row {i}"} for i in range(30)]  # no id column: ids are rg.parquet:<row>
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="none")
    corrupt_row_group(path, 1)
    m, _ = run_job([f"--input={path}", f"--output={tmp_path / 'out'}"] + engine_args(tokenizer_dir))
    comps, errs = read_outputs(str(tmp_path / "out"))
    assert sorted(c["id"] for c in comps) == sorted(f"rg.parquet:{i}" for i in [*range(10), *range(20, 30)])
    assert [e["id"] for e in errs] == ["rg.parquet:row-group-1"]
    reason = errs[0]["reason"]
    assert str(path) in reason and "row group 1" in reason and "rows 10..19" in reason and "\n" not in reason
    assert (m["completed"], m["errored"]) == (20, 1)
    assert_each_id_once(comps, errs)


def test_bad_fields_name_the_field(tmp_path, tokenizer_dir):
    """Each per-row field is type- and range-checked; the error row names the field."""
    from tests.pipeline.test_pipeline import write_jsonl
    rows = {"stop": {"stop": 5}, "seed": {"seed": 2**64}, "negseed": {"seed": -1},
            "temperature": {"temperature": "hot"}, "top_k": {"top_k": 1.5}, "max_tokens": {"max_tokens": 0},
            "stop_token_ids": {"stop_token_ids": "a"}, "ok": {"seed": 2**64 - 1}}
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": "hi", **v} for k, v in rows.items()])
    run_job([f"--input={path}", f"--output={tmp_path / 'out'}"] + engine_args(tokenizer_dir))
    comps, errs = read_outputs(str(tmp_path / "out"))
    assert [c["id"] for c in comps] == ["ok"]
    for e in errs:
        field = "seed" if e["id"] == "negseed" else e["id"]
        assert e["stage"] == "validate" and f"{field}:" in e["reason"], e
