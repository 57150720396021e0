"""End-to-end tests of the Beam pipeline, on real Beam with the tiny-llama config.

tiny-llama has random weights and a 256-token vocabulary; a byte-level tokenizer (tests/tiny.py)
saved as tokenizer.json lets text prompts and chat messages go through the real code paths.
Every in-process test uses the same engine settings, so the worker-process engine cache
(transforms/serving.py) loads and compiles the model once per pytest process.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import REPO

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tests.tiny import byte_tokenizer
    tok = byte_tokenizer()
    d = tmp_path_factory.mktemp("byte_tokenizer")
    tok.tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.tok.id_to_token(1), "eos_token": tok.tok.id_to_token(2),
        "add_bos_token": True, "chat_template": CHAT_TEMPLATE}))
    return str(d)


def engine_args(tokenizer_dir: str) -> list[str]:
    # context_size 16 tokens = BOS + 15 bytes of text; 4 generated tokens per row by default.
    return ["--model=tiny-llama", "--batch_size=4", "--max_cache_length=32", "--context_size=16",
            "--max_tokens=4", f"--tokenizer_path={os.path.join(tokenizer_dir, 'tokenizer.json')}"]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def sample_parquet(path):
    rows = [
        {"id": "p0", "prompt": "Hello there", "max_tokens": None, "temperature": None, "category": "greet"},
        {"id": "p1", "prompt": "The sky is", "max_tokens": 2, "temperature": None, "category": "fact"},
        {"id": "p2", "prompt": "1, 2, 3,", "max_tokens": None, "temperature": 0.8, "category": "math"},
        {"id": "p3", "prompt": "Once upon", "max_tokens": 3, "temperature": 0.5, "category": "story"},
        {"id": "p4", "prompt": "Beam is", "max_tokens": None, "temperature": None, "category": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def sample_jsonl(path):
    rows = [
        {"prompt": "no id here"},  # -> "b.jsonl:0"
        {"prompt_token_ids": [1, 40, 41, 42], "seed": 3, "temperature": 1.0, "prompt_logprobs": 1},  # -> "b.jsonl:1"
        {"id": 7, "messages": [{"role": "user", "content": "Hi!"}]},
        {"custom_id": "openai-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Yo"}], "max_tokens": 2,
                  "logprobs": True, "top_logprobs": 2}},
        {"custom_id": "openai-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "x", "prompt": "Say hi", "temperature": 0}},
        {"id": "ch", "prompt": "Pick one", "choice": ["yes", "no"]},  # structured output
        {"id": "n3", "prompt": "Count", "n": 3, "temperature": 1.0, "seed": 4},  # 3 samples, 3 rows
    ]
    return write_jsonl(path, rows)


def run_job(args):
    from pipeline.build import run
    result, metrics, info = run(args)
    assert metrics is not None, "metrics.json was not written"
    info["result"] = result
    return metrics, info


def read_outputs(output_dir, fsys=None):
    """(completion rows, error rows) from every completions-*/errors-* file in output_dir."""
    if fsys is None:
        comp_files = sorted(glob.glob(os.path.join(output_dir, "completions-*.parquet")))
        err_files = sorted(glob.glob(os.path.join(output_dir, "errors-*.jsonl")))
        opener = open
    else:
        comp_files = sorted(fsys.glob(output_dir.rstrip("/") + "/completions-*.parquet"))
        err_files = sorted(fsys.glob(output_dir.rstrip("/") + "/errors-*.jsonl"))
        opener = fsys.open
    comps = []
    for f in comp_files:
        with opener(f, "rb") as fh:
            comps.extend(pq.read_table(fh).to_pylist())
    errs = []
    for f in err_files:
        with opener(f, "rb") as fh:
            errs.extend(json.loads(line) for line in fh.read().decode().splitlines() if line.strip())
    return comps, errs


def assert_each_id_once(comps, errs, expected_ids=None):
    """Each id in exactly one of the outputs: once, or once per sample_index (n samples)."""
    keys = [(c["id"], c.get("sample_index") or 0) for c in comps] + [(e["id"], 0) for e in errs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes, f"ids written more than once: {dupes}"
    for c in comps:  # sample k > 0 only beside its sample 0
        assert not c.get("sample_index") or (c["id"], 0) in keys
    if expected_ids is not None:
        ids = {k[0] for k in keys}
        assert ids == set(expected_ids), (set(expected_ids) ^ ids)


def test_end_to_end_parquet_and_jsonl(tmp_path, tokenizer_dir):
    a = sample_parquet(tmp_path / "a.parquet")
    b = sample_jsonl(tmp_path / "b.jsonl")
    out = tmp_path / "out"
    metrics, info = run_job([f"--input={a},{b}", f"--output={out}"] + engine_args(tokenizer_dir))

    # The default runner is the in-process FnApiRunner: Prism (a GitHub download) never ran.
    assert "apache_beam.runners.portability.prism_runner" not in sys.modules

    comps, errs = read_outputs(str(out))
    expected = {"p0", "p1", "p2", "p3", "p4", "b.jsonl:0", "b.jsonl:1", "7", "openai-1", "openai-2", "ch", "n3"}
    assert errs == []
    assert_each_id_once(comps, errs, expected)
    by_id = {c["id"]: c for c in comps if c["sample_index"] == 0}
    samples = sorted((c for c in comps if c["id"] == "n3"), key=lambda c: c["sample_index"])
    assert [c["sample_index"] for c in samples] == [0, 1, 2]  # n = 3: one row per sample
    assert len({tuple(c["completion_token_ids"]) for c in samples}) > 1  # each with its own seed
    for c in comps:
        assert c["finish_reason"] in ("stop", "length")
        assert 0 <= c["completion_tokens"] <= 4
        assert c["completion_tokens"] == len(c["completion_token_ids"])
        assert c["prompt_tokens"] > 0 and c["latency_s"] >= 0 and c["model"] == "tiny-llama"
    assert by_id["p1"]["completion_tokens"] <= 2 and by_id["p3"]["completion_tokens"] <= 3  # per-row max_tokens
    assert by_id["openai-1"]["completion_tokens"] <= 2
    assert by_id["p0"]["prompt"] == "Hello there" and by_id["p0"]["category"] == "greet"  # pass-through column
    assert by_id["7"]["prompt"] == "Hi!"  # messages rendered with the chat template
    assert by_id["b.jsonl:1"]["prompt"] is None and by_id["b.jsonl:1"]["prompt_tokens"] == 4
    assert by_id["openai-2"]["url"] == "/v1/completions"
    lps = by_id["openai-1"]["logprobs"]  # body.logprobs + top_logprobs -> a logprobs column
    assert [e["token_id"] for e in lps] == by_id["openai-1"]["completion_token_ids"]
    assert lps and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in lps)
    assert by_id["openai-2"]["logprobs"] is None and by_id["openai-2"]["prompt_logprobs"] is None
    plp = by_id["b.jsonl:1"]["prompt_logprobs"]  # scoring the prompt: none for its first token
    assert plp[0] is None and [e["token_id"] for e in plp[1:]] == [40, 41, 42]
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 1 for e in plp[1:])
    assert by_id["ch"]["completion"] in ("yes", "no") and by_id["ch"]["finish_reason"] == "stop"

    m = json.loads((out / f"metrics-{metrics['run_id']}.json").read_text())
    assert m == metrics
    summary = json.loads((out / "metrics.json").read_text())  # every run that wrote here
    assert [r["run_id"] for r in summary["runs"]] == [m["run_id"]] and summary["runs"][0]["status"] == "finished"
    assert (summary["completions"], summary["errors"], summary["runs"][0]["committed_completions"]) == (14, 0, 14)
    assert (m["rows_in"], m["completed"], m["completion_rows"], m["errored"]) == (12, 12, 14, 0)
    assert m["generated_tokens"] == sum(c["completion_tokens"] for c in comps)
    assert m["prompt_tokens"] == sum(c["prompt_tokens"] for c in comps if c["sample_index"] == 0)
    assert m["device_kind"] and m["device_count"] >= 1 and m["engines"] == 1
    assert m["engine_config"]["batch_size"] == 4 and m["engine_config"]["context_size"] == 16
    sched = m["scheduler"]  # 14 samples through 4 slots: every decode call has 1..4 slots live
    assert sched["decode_calls"] > 0 and sched["prefill_calls"] >= 3 and sched["page_waits"] == 0
    assert 1 <= sched["mean_live_slots"] <= 4
    assert abs(sched["slot_occupancy"] - sched["live_slots"] / sched["decode_calls"] / 4) < 1e-3
    assert "kv_pages" not in sched  # contiguous cache
    assert sched["prompt_tokens"] == m["prompt_tokens"] and sched["prefill_tokens"] >= sched["prompt_tokens"]
    assert sched["prefill_padding"] == round(1 - sched["prompt_tokens"] / sched["prefill_tokens"], 3)
    for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_p50_s", "latency_p90_s", "latency_p99_s",
              "output_tok_per_s", "total_tok_per_s", "requests_per_s", "wall_time_s"):
        assert m[k] is not None, k
    # Beam metrics, all in the one namespace "jetbeam".
    from apache_beam.metrics.metric import MetricsFilter
    q = info["result"].metrics().query(MetricsFilter().with_namespace("jetbeam"))
    counters = {c.key.metric.name: c.committed for c in q["counters"]}
    assert counters["rows_read"] == 12 and counters["completions"] == 12
    assert counters["generated_tokens"] == m["generated_tokens"]
    assert counters["decode_calls"] == sched["decode_calls"]
    assert {d.key.metric.name for d in q["distributions"]} >= {"ttft_ms", "latency_ms", "flush_rows"}
    header = (out / f"metrics-{m['run_id']}.csv").read_text().splitlines()[0].split(",")
    assert {"rows_in", "completed", "errored", "output_tok_per_s", "ttft_p99_s", "device_kind"} <= set(header)


def test_multi_processing_workers(tmp_path, tokenizer_dir):
    """--direct_num_workers=2 --direct_running_mode=multi_processing (Beam worker subprocesses),
    with a paged KV cache of 6 pages x 8 tokens shared by the 4 slots: a row needs up to 3
    pages, so rows wait for pages, across several flushes of one resident engine."""
    a = sample_parquet(tmp_path / "a.parquet")
    b = sample_jsonl(tmp_path / "b.jsonl")
    out = tmp_path / "out"
    metrics, info = run_job([f"--input={a},{b}", f"--output={out}", "--direct_num_workers=2",
                          "--direct_running_mode=multi_processing", "--flush_rows=3",
                          "--kv_page_size=8", "--kv_cache_tokens=48"]
                         + engine_args(tokenizer_dir))
    assert metrics["engine_config"]["kv_page_size"] == 8 and metrics["engine_config"]["kv_cache_tokens"] == 48
    sched = metrics["scheduler"]
    assert sched["kv_pages"] == 6 and 1 <= sched["kv_pages_peak"] <= 6 and sched["decode_calls"] > 0
    comps, errs = read_outputs(str(out))
    assert errs == []
    assert_each_id_once(comps, errs)
    assert len(comps) == metrics["completion_rows"] == 14  # the n = 3 row: 3 samples on paged slots
    assert metrics["completed"] == metrics["rows_in"] == 12
    # 12 rows, flushed every 3 rows (BagState threshold) + the rest on a timer. Each flush's
    # stats count once in metrics.json (Beam's AsList saw those of flushes in process() twice).
    from apache_beam.metrics.metric import MetricsFilter
    q = info["result"].metrics().query(MetricsFilter().with_namespace("jetbeam"))
    counters = {c.key.metric.name: c.committed for c in q["counters"]}
    assert metrics["engine_flushes"] == counters["engine_flushes"] >= 4
    assert sched["decode_calls"] == counters["decode_calls"]
    assert "apache_beam.runners.portability.prism_runner" not in sys.modules


def test_resume_after_partial_run(tmp_path, tokenizer_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "prompt": f"row a{i}"} for i in range(4)]
                    + [{"id": "a-bad", "prompt": ""}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "prompt": f"row b{i}"} for i in range(3)])
    out = tmp_path / "out"
    base = [f"--output={out}"] + engine_args(tokenizer_dir)

    # A "partial" run: only the first file made it.
    m1, _ = run_job([f"--input={a}"] + base)
    assert (m1["completed"], m1["errored"]) == (4, 1)
    first_files = set(glob.glob(str(out / "completions-*.parquet")))
    first_rows = {r["id"]: r for r in read_outputs(str(out))[0]}

    # A run resumes its output: only b* is served; a-bad's error row is committed, so it stays.
    m2, _ = run_job([f"--input={a},{b}"] + base)
    assert (m2["rows_in"], m2["rows_skipped_existing"], m2["completed"], m2["errored"]) == (8, 5, 3, 0)
    comps, errs = read_outputs(str(out))
    assert_each_id_once(comps, errs, {f"a{i}" for i in range(4)} | {"a-bad", "b0", "b1", "b2"})
    assert first_files <= set(glob.glob(str(out / "completions-*.parquet")))  # earlier completions kept
    assert {r["id"]: r for r in comps if r["id"].startswith("a")} == first_rows

    # --retry_errors serves the failed row again; its new error row replaces the old one.
    m3, _ = run_job([f"--input={a},{b}", "--retry_errors"] + base)
    assert (m3["rows_skipped_existing"], m3["completed"], m3["errored"]) == (7, 0, 1)
    assert_each_id_once(*read_outputs(str(out)))

    summary = json.loads((out / "metrics.json").read_text())  # each run keeps its numbers
    assert [r["run_id"] for r in summary["runs"]] == [m1["run_id"], m2["run_id"], m3["run_id"]]
    assert [r["completed"] for r in summary["runs"]] == [4, 3, 0]
    assert all((out / f"metrics-{m['run_id']}.json").exists() for m in (m1, m2, m3))

    # --overwrite replaces what the directory held.
    m4, _ = run_job([f"--input={b}", "--overwrite"] + base)
    comps, errs = read_outputs(str(out))
    assert_each_id_once(comps, errs, {"b0", "b1", "b2"})
    assert [r["run_id"] for r in json.loads((out / "metrics.json").read_text())["runs"]] == [m4["run_id"]]


def test_dataflow_dry_run(tmp_path):
    """Options and the whole graph serialize for Dataflow; --dry_run=True submits nothing."""
    pytest.importorskip("google.cloud.dataflow", reason="DataflowRunner needs google-cloud-dataflow-client")
    import apache_beam as beam
    from pipeline.build import build_pipeline, make_options
    inp = sample_parquet(tmp_path / "a.parquet")
    opts = make_options([
        "--runner=DataflowRunner", "--project=test-project", "--region=us-central1",
        "--temp_location=gs://test-bucket/tmp", "--staging_location=gs://test-bucket/staging",
        "--no_auth", "--dry_run=True", "--sdk_location=container",
        "--sdk_container_image=us-docker.pkg.dev/test-project/jetbeam/worker:latest",
        "--machine_type=g2-standard-8",
        "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
        "--experiments=no_use_multiple_sdk_containers", "--number_of_worker_harness_threads=1",
        f"--input={inp}", "--output=gs://test-bucket/out", "--model=tiny-llama", "--num_workers=2",
        "--max_tokens=16", "--stop=###", "--stop=END"])
    p = beam.Pipeline(options=opts)
    info = build_pipeline(p, opts)
    assert info["num_engines"] == 2  # one engine shard per worker
    result = p.run()
    assert result.state == "DONE"
    proto = p.runner.proto_pipeline
    names = [t.unique_name for t in proto.components.transforms.values()]
    for stage in ("Read", "Validate", "Key", "Generate", "Write"):
        assert any(n == stage or n.startswith(stage + "/") for n in names), stage
    stateful = [t for t in proto.components.transforms.values() if t.unique_name.startswith("Generate/")
                and t.spec.urn == "beam:transform:pardo:v1"]
    from apache_beam.portability.api import beam_runner_api_pb2
    payload = beam_runner_api_pb2.ParDoPayload.FromString(stateful[0].spec.payload)
    assert set(payload.state_specs) == {"buffer", "count"}
    assert {t.removeprefix("ts-") for t in payload.timer_family_specs} == {"flush", "end_of_window"}
    # The DoFn (model, engine config, sampling) unpickles from the graph Dataflow would run.
    from apache_beam.internal import pickler
    fn = pickler.loads(payload.do_fn.payload)[0]
    assert type(fn).__name__ == "GenerateFn" and fn.settings.source.model == "tiny-llama"
    env = proto.components.environments[stateful[0].environment_id]
    assert b"jetbeam/worker:latest" in env.payload
    assert result.job.proto_pipeline.SerializeToString()
    # Our flags travel with Beam's in the options the job is submitted with.
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    encoded = JobServiceHandle.encode_pipeline_options(result.job.options.get_all_options())
    assert encoded["beam:option:model:v1"] == "tiny-llama"
    assert list(encoded["beam:option:stop:v1"]) == ["###", "END"]
    again = PipelineOptions.from_dictionary(json.loads(json.dumps(result.job.options.get_all_options())))
    assert "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver" in again.get_all_options()[
        "dataflow_service_options"]


def test_runner_defaults():
    from apache_beam.options.pipeline_options import StandardOptions
    from pipeline.build import make_options
    from pipeline.options import DEFAULT_RUNNER
    for argv in ([], ["--runner=DirectRunner"], ["--runner", "direct"]):
        assert make_options(argv).view_as(StandardOptions).runner == DEFAULT_RUNNER, argv
    assert make_options(["--runner=DataflowRunner"]).view_as(StandardOptions).runner == "DataflowRunner"


def test_help_lists_flags():
    res = subprocess.run([sys.executable, "run_pipeline.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for flag in ("--input", "--output", "--model", "--prompt_column", "--id_column", "--max_tokens",
                 "--temperature", "--top_k", "--top_p", "--seed", "--stop", "--batch_size", "--num_engines",
                 "--quantize_weights", "--quantize_kv_cache", "--overwrite", "--max_cache_length",
                 "--context_size", "--dtype"):
        assert flag in res.stdout, flag
