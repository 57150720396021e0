"""benchmarks/throughput.py end to end on the tiny config (CPU): the harness the GPU numbers
come from accounts for every request and token, its --profile split adds up, and its dry run
makes the calls a real run makes."""

import json
import os

import pytest

from benchmarks import throughput


SCHED_KEYS = ("decode_calls", "prefill_calls", "refills", "page_waits", "live_slots", "kv_pages_peak")


def test_length_mix_profile_variant_and_dry_run(tmp_path):
    """One compiled engine (tiny model, a length mix, an int8 paged cache small enough that
    admissions wait for pages, longest first) runs the timed pass, a --variant with other
    scheduling then the first setting again, the --profile split and a --trace rerun. Every
    request and token is accounted for, the profile's parts add up, and --dry_run (the real
    batcher over the fake engine) makes exactly the calls each timed pass made."""
    args = ["--model", "tiny-llama", "--dataset", "sharegpt", "--num_requests", "12", "--batch_size", "6",
            "--prefill_batch", "2", "--min_prefill_bucket", "64", "--max_cache_length", "2048",
            "--quantize_kv_cache", "--kv_page_size", "64", "--kv_cache_tokens", "2048", "--min_refill", "2"]
    out = tmp_path / "mix.json"
    throughput.main(args + ["--variant", "min_refill=1,schedule=arrival", "--profile",
                            "--trace", str(tmp_path / "trace"), "--json", str(out)])
    r = json.loads(out.read_text())
    # the warm-up compiled the prefill shapes a dry run plans for the timed run and its variants
    # (fewer than every bucket at every call size) and the timed runs compiled nothing
    assert r["timed_compiles"] == 0 and 0 < len(r["warm_shapes"]) < 5 * 2
    ins, outs = throughput.make_lengths(throughput.parse_args(["--dataset", "sharegpt", "--num_requests", "12"]))
    assert r["mean_input"] == float(ins.mean()) and r["mean_output"] == float(outs.mean())
    assert r["gpu_power"]["available"] == bool(r["gpu_power"].get("samples"))  # {"available": False} here
    for stats in (r["batcher"], r["sync_profile"]):
        assert stats["completed"] == 12 and stats["prefill_rows"] == 12
        assert stats["generated_tokens"] == int(outs.sum())
        assert stats["prompt_tokens"] == int(ins.sum())
        assert stats["live_slots"] <= 6 * stats["decode_calls"]
    # The traced rerun ran and was read (a CPU trace has no device kernels: busy time is 0 here;
    # tests/test_profile_step.py checks the arithmetic on a GPU-shaped trace).
    assert r["trace"]["wall_s"] > 0 and r["trace"]["busy_ms"] == 0.0
    assert any(f.endswith(".trace.json.gz") for _, _, fs in os.walk(tmp_path / "trace") for f in fs)
    prof = r["sync_profile"]
    parts = prof["prefill_s"] + prof["insert_s"] + prof["decode_s"]
    assert 0 < parts <= prof["wall_s"] and abs(prof["host_s"] - (prof["wall_s"] - parts)) < 2e-3

    throughput.main(args + ["--dry_run", "--json", str(tmp_path / "dry.json")])
    throughput.main(args + ["--dry_run", "--min_refill", "1", "--schedule", "arrival",
                            "--json", str(tmp_path / "dry_v.json")])
    dry = json.loads((tmp_path / "dry.json").read_text())
    dry_v = json.loads((tmp_path / "dry_v.json").read_text())
    assert dry["page_waits"] > 0 and dry["requests"] == 12
    assert {k: int(r["batcher"].get(k, 0)) for k in SCHED_KEYS} == {k: dry[k] for k in SCHED_KEYS}
    variant, again = r["variants"]
    assert {k: variant["batcher"][k] for k in SCHED_KEYS} == {k: dry_v[k] for k in SCHED_KEYS}
    assert {k: dry_v[k] for k in SCHED_KEYS} != {k: dry[k] for k in SCHED_KEYS}  # the variant changed it
    assert {k: again["batcher"][k] for k in SCHED_KEYS} == {k: dry[k] for k in SCHED_KEYS}


def test_peer_runs_first_in_its_own_process(tmp_path):
    """--peer runs transformers' generate (benchmarks/peer_hf.py) on the same shape before the
    engine, and the report divides by its number."""
    out = tmp_path / "fixed.json"
    throughput.main(["--model", "tiny-llama", "--num_requests", "4", "--input_len", "8", "--output_len", "4",
                     "--batch_size", "4", "--dtype", "float32", "--peer", "--peer_batch", "2",
                     "--json", str(out)])
    r = json.loads(out.read_text())
    peer = json.loads((tmp_path / "fixed.peer.json").read_text())
    assert peer["batch_size"] == 2 and (peer["input_len"], peer["output_len"]) == (8, 4)
    assert r["peer"] == peer and peer["output_tok_s"] > 0
    assert r["ours_over_peer"] == round(r["output_tok_per_s"] / peer["output_tok_s"], 2)


def test_dry_run_reproduces_the_h100_schedule(tmp_path):
    """The ShareGPT-like mix at Llama-2-7B shapes, dry: the decode/prefill calls, refills and
    page waits that a real run on an H100 made (docs/benchmark-history.md, the length-mix runs of
    2026-11-27)."""
    base = ["--model", "llama2-7b", "--dataset", "sharegpt", "--prefill_batch", "8", "--min_prefill_bucket", "64",
            "--quantize_kv_cache", "--batch_size", "256", "--kv_page_size", "64",
            "--kv_cache_tokens", "196608", "--dry_run"]
    h100 = {"longest_first": (128, 243, 35, 54, 3072), "arrival": (197, 266, 39, 0, 2830)}
    for schedule, want in h100.items():
        out = tmp_path / f"{schedule}.json"
        throughput.main(base + ["--schedule", schedule, "--min_refill", "16", "--json", str(out)])
        r = json.loads(out.read_text())
        got = tuple(r[k] for k in ("decode_calls", "prefill_calls", "refills", "page_waits", "kv_pages_peak"))
        assert got == want, schedule


def test_flag_mistakes_are_one_line(capsys):
    """A count below its floor and a model that does not resolve stop the harness in one line,
    before any device work (or the minutes a --peer run takes)."""
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(["--num_requests", "0"])
    assert e.value.code == 2
    assert "argument --num_requests: must be an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        throughput.main(["--model", "no-such-model", "--peer"])
    assert str(e.value).startswith("error: model: 'no-such-model' is neither a file")
