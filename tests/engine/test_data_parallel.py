"""Data parallel within a process ("cpu=N/M": N/M engines of M devices) on simulated CPU devices:
the platform form, and the pipeline serving every row through the replicas. (The replicas'
tokens and devices are checked in tests/engine/test_sharding.py's child process.) XLA's host
device count is fixed when jax starts, so the pipeline runs in a child process with 8 devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.config import ConfigError, device_groups, parse_platform
from tests import REPO

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def test_platform_groups():
    assert device_groups("gpu=8/2") == (2, 4) and parse_platform("gpu=8/2") == ("gpu", 8)
    assert device_groups("tpu=4") == (4, 1) and device_groups("auto") == (None, 1)
    for bad in ("gpu=8/3", "gpu=8/0", "gpu=8/x"):
        with pytest.raises(ConfigError):
            parse_platform(bad)


def test_pipeline_serves_every_row_through_replicas(tmp_path):
    rows = [{"id": f"r{i}", "prompt_token_ids": [1] + [10 + i] * (3 + i % 5), "max_tokens": 6} for i in range(10)]
    rows.append({"id": "long", "prompt_token_ids": [7] * 40})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run_pipeline.py", f"--input={src}", f"--output={out}",
                           "--model=tiny-llama", "--platform=cpu=4/2", "--batch_size=2", "--max_cache_length=40",
                           "--context_size=16", "--decode_steps=4", "--weight_dtype=float32"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.json") as f:
        run = json.load(f)["latest_run"]
    with open(out / f"metrics-{run}.json") as f:
        m = json.load(f)
    assert m["rows_in"] == 11 and m["completed"] == 10 and m["errored"] == 1
    assert m["device_count"] == 4
