"""`python -m engine.lower --platform tpu`: the engine's programs lower for a TPU from this CPU host,
for every weight mode and cache layout, from shapes alone (no weights in memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import REPO


@pytest.mark.parametrize("flags", [
    [],
    ["--quantize_weights", "int8", "--quantize_kv_cache"],
    ["--quantize_weights", "w8a8", "--quantize_kv_cache", "--kv_page_size", "16", "--packed_prefill", "64"],
])
def test_lowers_for_tpu(flags, capsys):
    from engine.lower import main
    assert main(["--platform", "tpu", "--model", "tiny-llama", "--batch_size", "4", "--max_cache_length", "64",
                 "--context_size", "32", "--prefill_batch", "4", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    bucketed = [f"{p}[{n}x{s}]" for s in (16, 32) for n in (1, 2, 4) for p in ("prefill", "insert")]
    packed = [f"{p}[{t}]" for t in (16, 32, 48, 64) for p in ("prefill_packed", "insert_packed")] \
        if "--packed_prefill" in flags else []
    cached = ["prefill[4x32+16cached]"] if "--kv_page_size" in flags else []
    names = [*bucketed, "generate[64]", "decode_logits", "sample_logits", *packed, *cached]
    assert [ln.split(":")[1].split()[0] for ln in lines] == [*names, "all"], lines
    assert lines[-1].startswith(f"tpu: all {len(names)} programs lowered")


@pytest.mark.parametrize("model,flags", [("llama2-7b", []),
                                         ("gemma-7b", ["--quantize_weights", "w8a8", "--packed_prefill", "1024"])])
def test_7b_sharded_over_four_tpus_without_weights(model, flags):
    """Llama-2-7B (bf16) and Gemma-7B (W8A8, packed prefill) shapes with an int8 cache over tpu=4
    (four simulated host devices): lowered in a few seconds, with bounded memory (no 7B
    parameters are made)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", "import resource, sys; from engine.lower import main; "
                        "rc = main(sys.argv[1:]); print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
                        "sys.exit(rc)", "--platform", "tpu=4", "--model", model, "--quantize_kv_cache",
                        "--batch_size", "64", "--prefill_batch", "1", *flags],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tpu=4: prefill[1x16] lowered" in r.stdout and "tpu=4: generate[1024] lowered" in r.stdout
    assert ("tpu=4: prefill_packed[1024] lowered" in r.stdout) == ("--packed_prefill" in flags)
    rss = int(r.stdout.split("maxrss_kb")[1].split()[0])
    assert rss < 6_000_000, rss  # 7B bf16 weights alone would be 13.5 GB (measured alone: about 0.25 GB)


def test_refuses_a_host_target(capsys):
    from engine.lower import main
    assert main(["--model", "tiny-llama"]) == 2
    assert "name the target" in capsys.readouterr().err
