"""benchmarks/throughput.py end to end on the tiny config (CPU): the harness the GPU numbers
come from accounts for every request and token, and its --profile split adds up."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import throughput  # noqa: E402


def test_length_mix_with_profile(tmp_path):
    out = tmp_path / "mix.json"
    throughput.main(["--model", "tiny-llama", "--dataset", "sharegpt", "--num_requests", "24",
                     "--batch_size", "6", "--prefill_batch", "2", "--min_prefill_bucket", "64",
                     "--quantize_kv_cache", "--profile", "--json", str(out)])
    r = json.loads(out.read_text())
    ins, outs = throughput.make_lengths(throughput.parse_args(["--dataset", "sharegpt", "--num_requests", "24"]))
    assert r["mean_input"] == float(ins.mean()) and r["mean_output"] == float(outs.mean())
    for stats in (r["batcher"], r["sync_profile"]):
        assert stats["completed"] == 24 and stats["prefill_rows"] == 24
        assert stats["generated_tokens"] == int(outs.sum())
        assert stats["prompt_tokens"] == int(ins.sum())
        assert stats["live_slots"] <= 6 * stats["decode_calls"]
    prof = r["sync_profile"]
    parts = prof["prefill_s"] + prof["insert_s"] + prof["decode_s"]
    assert 0 < parts <= prof["wall_s"] and abs(prof["host_s"] - (prof["wall_s"] - parts)) < 2e-3
