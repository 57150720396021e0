"""Data parallel within a process ("cpu=N/M": N/M engines of M devices) on simulated CPU devices.

The replicas together give each request exactly one Result with the single-device tokens, each
replica on its own devices; the pipeline serves every row through them. XLA's host device count
is fixed when jax starts, so the runs happen in a child process with 8 simulated devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engine.config import ConfigError, device_groups, parse_platform
from tests import REPO

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from engine.data_parallel import DataParallelLLM, serving_llm
    from engine.config import make_settings
    from engine.llm import LLM
    from engine.request import Request, SamplingParams
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 256, size=n)] for n in (3, 11, 16, 7, 15, 9, 4, 12) * 2]
    prompts.insert(5, [5] * 20)  # longer than context_size: refused, one error Result
    kw = dict(batch_size=2, max_cache_length=40, context_size=16, decode_steps=4, prefill_batch=2,
              weight_dtype="float32")
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    reqs = lambda: [Request(id=i, prompt_token_ids=p, sampling=sp) for i, p in enumerate(prompts)]
    out = {}
    for name, platform, extra in (("dp2x2_kv8", "cpu=4/2", {"quantize_kv_cache": True}),):
        one = LLM("tiny-llama", platform="cpu", **kw, **extra).generate_all(reqs())
        dp = serving_llm(make_settings("tiny-llama", platform=platform, **kw, **extra))
        first = dp.generate_all(reqs())
        again = sorted(dp.generate(reqs()), key=lambda r: r.id)  # a second call: compiled, both replicas pull
        out[name] = {
            "type": type(dp).__name__,
            "devices": [[d.id for d in r._engine.mesh.devices.flat] for r in dp.replicas],
            "ids": [r.id for r in again],
            "equal": [a.completion_token_ids == b.completion_token_ids == c.completion_token_ids
                      for a, b, c in zip(one, first, again)],
            "errors": [r.id for r in again if r.error],
            "per_engine": dp.stats()["completed_per_engine"],
            "device_info": dp.device_info(),
        }
    json.dump(out, sys.stdout)
""")

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def test_platform_groups():
    assert device_groups("gpu=8/2") == (2, 4) and parse_platform("gpu=8/2") == ("gpu", 8)
    assert device_groups("tpu=4") == (4, 1) and device_groups("auto") == (None, 1)
    for bad in ("gpu=8/3", "gpu=8/0", "gpu=8/x"):
        with pytest.raises(ConfigError):
            parse_platform(bad)


@pytest.fixture(scope="module")
def runs():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name,engines,per", [("dp2x2_kv8", 2, 2)])
def test_replicas_split_devices_and_keep_tokens(runs, name, engines, per):
    r = runs[name]
    assert r["type"] == "DataParallelLLM" and len(r["devices"]) == engines
    assert all(len(d) == per for d in r["devices"])
    assert len({i for d in r["devices"] for i in d}) == engines * per  # disjoint
    assert r["ids"] == list(range(17)) and all(r["equal"])  # one Result each, single-device tokens
    assert r["errors"] == [5]
    assert sum(r["per_engine"]) == 2 * 16 and all(n > 0 for n in r["per_engine"])
    assert r["device_info"]["engines"] == engines and r["device_info"]["device_count"] == engines * per


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
