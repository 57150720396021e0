"""gs:// input and output through a local GCS emulator (gcp-storage-emulator) and gcsfs.

Nothing here touches Beam's own GCS client (it would spend ~28 s per process looking for
credentials); the pipeline reads and writes gs:// through fsspec/gcsfs with anonymous
access when STORAGE_EMULATOR_HOST is set (transforms/fs.py).
"""

from __future__ import annotations

import json
import os
import socket

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from tests.pipeline.test_pipeline import (assert_each_id_once, engine_args, read_outputs, run_job,  # noqa: E402,F401
                           tokenizer_dir)

BUCKET = "test-bucket"


@pytest.fixture(scope="module")
def gcs():
    pytest.importorskip("gcp_storage_emulator")
    from gcp_storage_emulator.server import create_server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
    fsys = gcsfs.GCSFileSystem(token="anon")
    try:
        yield fsys
    finally:
        server.stop()
        gcsfs.GCSFileSystem.clear_instance_cache()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


def put(fsys, path, data: bytes):
    with fsys.open(path, "wb") as f:
        f.write(data)


def test_gcs_input_and_output(gcs, tokenizer_dir):
    jsonl = "".join(json.dumps(r) + "\n" for r in [
        {"id": "j0", "prompt": "gs hello"},
        {"id": "j1", "prompt_token_ids": [1, 50, 51]},
        {"id": "j2", "prompt": ""},  # -> errors
    ]).encode()
    put(gcs, f"{BUCKET}/in/part-0.jsonl", jsonl)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{"id": "q0", "prompt": "parquet", "tag": "t"},
                                         {"id": "q1", "prompt": "on gcs", "tag": "u"}]), buf)
    put(gcs, f"{BUCKET}/in/part-1.parquet", buf.getvalue().to_pybytes())
    put(gcs, f"{BUCKET}/in/part-2.parquet", b"garbage")  # -> one read error row

    from transforms import fs
    assert fs.expand_inputs(f"gs://{BUCKET}/in") == [(f"gs://{BUCKET}/in/{n}", n) for n in (
        "part-0.jsonl", "part-1.parquet", "part-2.parquet")]  # a directory on GCS: its data files
    out = f"gs://{BUCKET}/out"
    base = [f"--output={out}"] + engine_args(tokenizer_dir)
    m, info = run_job([f"--input=gs://{BUCKET}/in/*.jsonl,gs://{BUCKET}/in/part-1.parquet"] + base)
    assert info["output"] == out
    comps, errs = read_outputs(out, gcs)
    assert_each_id_once(comps, errs, {"j0", "j1", "j2", "q0", "q1"})
    assert sorted(c["id"] for c in comps) == ["j0", "j1", "q0", "q1"]
    assert {c["id"]: c.get("tag") for c in comps if c["id"].startswith("q")} == {"q0": "t", "q1": "u"}
    metrics = json.loads(gcs.cat(f"{BUCKET}/out/metrics-{m['run_id']}.json"))
    assert metrics == m and (m["rows_in"], m["completed"], m["errored"]) == (5, 4, 1)
    assert gcs.cat(f"{BUCKET}/out/metrics-{m['run_id']}.csv").decode().startswith("run_id,")
    assert not gcs.exists(f"{BUCKET}/out/_jetbeam/lock.json")  # released at the end

    # A re-run over the whole prefix (now with the unreadable file) resumes: only the new file's
    # read error is written; every committed id is skipped.
    m2, _ = run_job([f"--input=gs://{BUCKET}/in/*"] + base)
    assert m2["rows_skipped_existing"] == 5 and m2["completed"] == 0 and m2["errored"] == 1
    comps, errs = read_outputs(out, gcs)
    assert_each_id_once(comps, errs, {"j0", "j1", "j2", "q0", "q1", "part-2.parquet:file"})
    m3, _ = run_job([f"--input=gs://{BUCKET}/in/*"] + base)  # the read error is committed now: skipped too
    assert (m3["rows_in"], m3["rows_skipped_existing"], m3["completed"], m3["errored"]) == (6, 6, 0, 0)
    assert read_outputs(out, gcs)[1] == errs


def test_gcs_kill_resume_and_lock(gcs, tokenizer_dir, tmp_path, capsys):
    """On gs://: a SIGKILLed run keeps its committed pieces and the resume serves the rest; a live
    lock refuses a second run; a missing bucket is refused before any work."""
    import signal
    import time

    from run_pipeline import main
    from tests.pipeline.test_durable import N_ROWS, launch, token_rows, wait_for
    from tests.pipeline.test_pipeline import write_jsonl
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows())
    out = f"gs://{BUCKET}/killed"
    args = [f"--input={inp}", f"--output={out}", "--flush_rows=5"] + engine_args(tokenizer_dir)

    assert main([f"--input={inp}", "--output=gs://no-such-bucket/x"] + engine_args(tokenizer_dir)) == 2
    assert "bucket gs://no-such-bucket does not exist" in capsys.readouterr().err

    def n_pieces():
        gcs.invalidate_cache()
        return len(gcs.glob(f"{BUCKET}/killed/completions-*.parquet"))

    proc = launch(args)
    wait_for(lambda: n_pieces() >= 2, proc)
    assert main(args) == 2  # the live run holds the lock
    assert "is in use by run" in capsys.readouterr().err
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    before = read_outputs(out, gcs)[0]
    assert len(before) >= 10
    # The killed run's lock names a dead process of this host: the resume takes it over.
    m, _ = run_job(args)
    assert m["rows_skipped_existing"] == len(before) and m["completed"] == N_ROWS - len(before)
    comps, errs = read_outputs(out, gcs)
    assert_each_id_once(comps, errs, {f"r{i}" for i in range(N_ROWS)})
