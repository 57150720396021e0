"""Nothing lost: rows committed while the job runs, SIGKILL then resume, concurrent runs, healing,
and mistakes refused before any work. Real runs of run_pipeline.py (subprocesses for the kills)
on the tiny-llama config.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import REPO
from tests.pipeline.test_pipeline import (assert_each_id_once, engine_args, read_outputs, run_job,  # noqa: F401
                                          tokenizer_dir, write_jsonl)

N_ROWS = 240


def token_rows(n=N_ROWS):
    return [{"id": f"r{i}", "prompt_token_ids": [1, 5 + i % 50, 7, 9], "max_tokens": 8} for i in range(n)]


def launch(args):
    return subprocess.Popen([sys.executable, "run_pipeline.py", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pieces(out):
    return glob.glob(os.path.join(out, "completions-*.parquet")) + glob.glob(os.path.join(out, "errors-*.jsonl"))


def committed_ids(out):
    comps, errs = read_outputs(out)
    return [c["id"] for c in comps] + [e["id"] for e in errs]


def wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run ended before the kill point:\n{proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < timeout, "kill point not reached"
        time.sleep(0.01)


MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.mark.parametrize("kill_after_pieces,workers", [(0, []), (12, []), (3, MULTI)])
def test_sigkill_then_resume(tmp_path, tokenizer_dir, kill_after_pieces, workers):
    """SIGKILL at a point of the run (in-process, or Beam worker processes); the resume serves
    exactly the rows not committed."""
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows())
    out = str(tmp_path / "out")
    args = [f"--input={inp}", f"--output={out}", "--flush_rows=5"] + engine_args(tokenizer_dir)
    proc = launch(args + workers)
    lock = os.path.join(out, "_jetbeam", "lock.json")
    runs = os.path.join(out, "_jetbeam", "runs")  # the run's manifest is written right after its lock
    wait_for(lambda: os.path.exists(lock) and os.path.isdir(runs) and os.listdir(runs)
             and len(pieces(out)) >= kill_after_pieces, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = committed_ids(out)
    assert len(before) == len(set(before)) and len(before) >= 5 * kill_after_pieces
    assert os.path.exists(lock)  # the dead run's lock: taken over by the resume

    m, _ = run_job(args)
    assert m["rows_skipped_existing"] == len(before)  # counted: only the rest is generated
    assert m["completed"] + m["errored"] == N_ROWS - len(before)
    comps, errs = read_outputs(out)
    assert_each_id_once(comps, errs, {f"r{i}" for i in range(N_ROWS)})
    assert errs == []
    summary = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert [r["status"] for r in summary["runs"]] == ["stopped early", "finished"]
    assert summary["runs"][0]["committed_completions"] == len(before)
    assert not os.path.exists(lock) and not os.listdir(os.path.join(out, "_jetbeam", "tmp"))


def test_ctrl_c_then_resume(tmp_path, tokenizer_dir):
    """SIGINT (Ctrl-C) mid-run: one line and exit status 130, no traceback, the lock given back and
    the run recorded as interrupted; the same command then serves exactly the rows not committed."""
    from run_pipeline import INTERRUPTED
    n = 60
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows(n))
    out = str(tmp_path / "out")
    args = [f"--input={inp}", f"--output={out}", "--flush_rows=5"] + engine_args(tokenizer_dir)
    proc = launch(args)
    wait_for(lambda: len(pieces(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log[-3000:]
    assert log.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in log, log[-3000:]
    assert not os.path.exists(os.path.join(out, "_jetbeam", "lock.json"))
    before = committed_ids(out)
    m, _ = run_job(args)
    assert m["rows_skipped_existing"] == len(before) > 0 and m["completed"] == n - len(before)
    assert_each_id_once(*read_outputs(out), {f"r{i}" for i in range(n)})
    summary = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert [r["status"] for r in summary["runs"]] == ["interrupted", "finished"]


def test_concurrent_run_refused(tmp_path, tokenizer_dir, capsys):
    from run_pipeline import main
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows())
    out = str(tmp_path / "out")
    args = [f"--input={inp}", f"--output={out}", "--flush_rows=5"] + engine_args(tokenizer_dir)
    proc = launch(args)
    wait_for(lambda: os.path.exists(os.path.join(out, "_jetbeam", "lock.json")), proc)
    t0 = time.time()
    assert main(args) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is in use by run" in err, err
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    comps, errs = read_outputs(out)
    assert_each_id_once(comps, errs, {f"r{i}" for i in range(N_ROWS)})
    # The same command again, after the first ended: it resumes and finds nothing left to do.
    m, _ = run_job(args)
    assert (m["rows_skipped_existing"], m["completed"], m["errored"]) == (N_ROWS, 0, 0)


def test_stale_lock_of_another_host(tmp_path, tokenizer_dir, capsys):
    """A live lock of another host refuses the run; once its heartbeat is old it is taken over."""
    from pipeline.run_lock import STALE_AFTER_S
    from run_pipeline import main
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows(6))
    out = tmp_path / "out"
    (out / "_jetbeam").mkdir(parents=True)
    lock = {"run_id": "20260101-000000-abcdef", "host": "elsewhere", "pid": 1, "token": "t",
            "started": time.time(), "heartbeat": time.time()}
    (out / "_jetbeam" / "lock.json").write_text(json.dumps(lock))
    args = [f"--input={inp}", f"--output={out}"] + engine_args(tokenizer_dir)
    assert main(args) == 2
    assert "in use by run 20260101-000000-abcdef (host elsewhere" in capsys.readouterr().err
    lock["heartbeat"] = time.time() - STALE_AFTER_S - 1
    (out / "_jetbeam" / "lock.json").write_text(json.dumps(lock))
    m, _ = run_job(args)
    assert m["completed"] == 6


def test_heal_duplicates_and_leftovers(tmp_path, tokenizer_dir):
    """Duplicated pieces, an error row for a completed id and half-written pieces are healed."""
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows(12))
    out = tmp_path / "out"
    args = [f"--input={inp}", f"--output={out}", "--flush_rows=4"] + engine_args(tokenizer_dir)
    run_job(args)
    first = sorted(glob.glob(str(out / "completions-*.parquet")))
    assert len(first) >= 2
    # A second copy of a piece under another run (a retried bundle of a killed job) ...
    shutil.copy(first[0], out / "completions-20990101-000000-aaaaaa-0123456789ab.parquet")
    # ... an error row for an id that has a completion, and a half-written piece.
    (out / "errors-20990101-000000-aaaaaa-0123456789ac.jsonl").write_text(
        json.dumps({"id": "r0", "stage": "generate", "reason": "x", "row": None}) + "\n")
    (out / "_jetbeam" / "tmp").mkdir(parents=True, exist_ok=True)
    (out / "_jetbeam" / "tmp" / "completions-x.parquet.inprogress").write_bytes(b"PAR1 half")
    m, _ = run_job(args)
    assert (m["rows_skipped_existing"], m["completed"]) == (12, 0)
    comps, errs = read_outputs(str(out))
    assert_each_id_once(comps, errs, {f"r{i}" for i in range(12)})
    assert errs == [] and not os.listdir(out / "_jetbeam" / "tmp")


def test_duplicate_input_ids(tmp_path, tokenizer_dir):
    """The first row of an id is served, later ones are error rows; a resume writes neither again."""
    rows = [{"id": "a", "prompt_token_ids": [1, 5]}, {"id": "b", "prompt_token_ids": [1, 6]},
            {"id": "a", "prompt_token_ids": [1, 7]}, {"id": "a", "prompt_token_ids": [1, 8]}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = [f"--input={inp}", f"--output={out}"] + engine_args(tokenizer_dir)
    m, _ = run_job(args)
    assert (m["rows_in"], m["completed"], m["errored"]) == (4, 2, 2)
    comps, errs = read_outputs(str(out))
    assert {c["id"]: c["prompt_tokens"] for c in comps} == {"a": 2, "b": 2}
    assert sorted(e["source"] for e in errs) == [f"{inp}:2", f"{inp}:3"]
    assert all(e["stage"] == "duplicate" and f"{inp}:0" in e["reason"] for e in errs)
    m2, _ = run_job(args)
    assert (m2["rows_skipped_existing"], m2["completed"], m2["errored"]) == (4, 0, 0)
    assert len(read_outputs(str(out))[1]) == 2


def _refused(main, capsys, argv, expect):
    t0 = time.time()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert time.time() - t0 < 15, argv
    return err


def test_preflight_mistakes(tmp_path, tokenizer_dir, capsys, caplog):
    """Each mistake: one line, exit 2, in seconds, and no engine loaded."""
    import logging
    from run_pipeline import main
    caplog.set_level(logging.INFO, logger="transforms")
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows(3))
    base = [f"--input={inp}"] + engine_args(tokenizer_dir)
    out = tmp_path / "out"
    _refused(main, capsys, [f"--input={inp}", f"--output={out}", f"--model={tmp_path}/no-such-model"],
             "no-such-model")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    _refused(main, capsys, base + [f"--output={afile}/sub"], "cannot write there")
    _refused(main, capsys, base + [f"--output={out}", "--max_token=3"], "unknown flag --max_token (did you mean --max_tokens?)")
    _refused(main, capsys, base + [f"--output={out}", "--skip_existing"], "--skip_existing")
    _refused(main, capsys, base + [f"--output={out}", "--input=/nowhere/*.jsonl"], "matches no files")
    _refused(main, capsys, base + [f"--output={out}", "--input=nope://b/x.jsonl"],
             "--input 'nope://b/x.jsonl': cannot list it (ValueError: Protocol not known: nope)")
    _refused(main, capsys, base + [f"--output={out}", "--attention=pallas", "--decode_kernel=heads=2"],
             "decode_kernel: heads=2 (kv heads per program) needs the fma method")  # tiny-llama: G=2
    _refused(main, capsys, base + [f"--output={out}", "--platform=cpu=4"],
             "platform 'cpu=4' asks for 4 devices but only 1 cpu device(s) are visible")  # the engine would load here

    assert "loading engine" not in caplog.text and "flushing" not in caplog.text

    run_job(base + [f"--output={out}"])
    caplog.clear()
    _refused(main, capsys, base + [f"--output={out}", "--temperature=0.5"],
             "temperature: 0.0 -> 0.5")  # resuming with other sampling settings would mix outputs
    _refused(main, capsys, base + [f"--output={out}", f"--input={out}/*.parquet"],
             f"file(s) inside --output {out}")  # a re-run would read its outputs as prompts
    _refused(main, capsys, base + [f"--output={out}", f"--input={out}"], "is a jetbeam output directory")
    damaged = out / "completions-20990101-000000-bbbbbb-0123456789ab.parquet"
    damaged.write_bytes(b"PAR1 truncated")
    _refused(main, capsys, base + [f"--output={out}"], f"{damaged}: unreadable completions piece")
    assert "flushing" not in caplog.text


def test_preflight_exit_code(tmp_path):
    """The real command: exit status 2 and one line on stderr, with no model loaded."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "run_pipeline.py", f"--output={tmp_path}/out",
                        f"--model={tmp_path}/missing"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("jetbeam: error")]
    assert len(lines) == 1 and "missing" in lines[0]
    assert "loading engine" not in r.stderr
    assert time.time() - t0 < 60


def test_engine_that_cannot_load_stops_the_job_in_one_line(tmp_path, tokenizer_dir):
    """Beam worker processes whose engine cannot load (here: fewer devices than --platform names;
    on a cluster also a checkpoint that fails past its headers, or memory): exit status 1, the
    reason as the last line, nothing committed, the run marked failed and its lock given back, so
    a re-run with the mistake fixed serves every row."""
    from transforms.output_dir import read_manifests
    inp = write_jsonl(tmp_path / "in.jsonl", token_rows(3))
    out = str(tmp_path / "out")
    base = [f"--input={inp}", f"--output={out}"] + engine_args(tokenizer_dir)
    r = subprocess.run([sys.executable, "run_pipeline.py", *base, *MULTI, "--platform=cpu=4"], cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("jetbeam: error: engine could not load on "), last
    assert "ValueError: platform 'cpu=4' asks for 4 devices" in last and "[while running" not in last, last
    assert pieces(out) == []
    assert [m["status"] for m in read_manifests(out)] == ["failed"]
    m, _ = run_job(base)
    assert (m["completed"], m["errored"]) == (3, 0)
