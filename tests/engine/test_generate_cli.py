"""`python -m engine.generate`: JSONL in, one JSONL line out per input line, errors as lines."""

from __future__ import annotations

import json
import subprocess
import sys


def test_cli_serves_every_line(tmp_path):
    model_json = tmp_path / "model.json"  # a JetStream-style engine config naming a config model
    model_json.write_text(json.dumps({"model": "tiny-llama", "batch_size": 2, "max_cache_length": 48,
                                      "context_size": 16, "quantize_kv_cache": "True"}))
    lines = [
        {"id": "a", "prompt_token_ids": [1, 5, 6], "max_tokens": 5, "ignore_eos": True},
        {"id": "b", "prompt_token_ids": [1, 7], "max_tokens": 3, "ignore_eos": True, "temperature": 0.8, "seed": 1,
         "n": 2, "prompt_logprobs": 1},  # two lines out, sample_index 0 and 1
        {"id": "long", "prompt_token_ids": [4] * 17},
        {"id": "text", "prompt": "no tokenizer for this model"},
        {"id": "badtemp", "prompt_token_ids": [1, 2], "temperature": "hot"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--model", str(model_json), "--input", str(src),
                           "--output", str(out), "--max_tokens", "4", "--kv_page_size", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(map(json.loads, out.read_text().splitlines()))
    assert [r["sample_index"] for r in rows if r["id"] == "b"] == [0, 1]
    assert all(len(r["prompt_logprobs"]) == 2 and r["prompt_logprobs"][0] is None for r in rows if r["id"] == "b")
    got = {r["id"]: r for r in rows}
    assert set(got) == {"a", "b", "long", "text", "badtemp", 6}  # line 6 has no id: its line number
    assert got["a"]["completion_tokens"] == 5 and got["a"]["finish_reason"] == "length"
    assert len(got["a"]["completion_token_ids"]) == 5 and got["a"]["prompt_tokens"] == 3
    assert got["b"]["completion_tokens"] == 3
    assert "context_size 16" in got["long"]["error"]
    assert "tokenizer" in got["text"]["error"]
    assert "temperature" in got["badtemp"]["error"]
    assert "invalid JSON" in got[6]["error"]
    assert "2 completed, 4 errors" in proc.stderr


def test_cli_unknown_model_is_one_clear_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "hi"}\n')
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--model", "no-such-model", "--input", str(src),
                           "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
