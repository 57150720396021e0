"""benchmarks/gpu_power.py: nvidia-smi's samples parsed and summarized, the sampler's process
and file plumbing, and its answer where there is no nvidia-smi (this machine). No GPU here, so
a stand-in `nvidia-smi` script prints lines in the real format; the H100 lines are from
a sustained run at the power cap, rewritten without units as `nounits` prints them."""

from __future__ import annotations

import os
import shutil
import stat
import time

import pytest

from benchmarks.gpu_power import PowerSampler, parse_sample, summarize

H100 = ["1980, 1980, 137.21, 700.00, 0x0000000000000000",
        "1620, 1980, 699.12, 700.00, 0x0000000000000004",
        "1455, 1980, 695.50, 700.00, 0x0000000000000004",
        "[N/A], 1980, 140.00, 700.00, 0x0000000000000000"]


def test_samples_parse_and_summarize():
    samples = [parse_sample(line) for line in H100]
    assert samples[3] is None  # a field the card did not report
    assert samples[1] == {"sm_mhz": 1620.0, "sm_mhz_max": 1980.0, "power_w": 699.12,
                          "power_limit_w": 700.0, "power_capped": True}
    assert not samples[0]["power_capped"]
    s = summarize(samples[:3])
    assert s["available"] and s["samples"] == 3
    assert s["sm_mhz_min"] == 1455.0 and s["sm_mhz_mean"] == round((1980 + 1620 + 1455) / 3, 1)
    assert s["power_w_max"] == 699.12 and s["power_limit_w"] == 700.0
    assert s["power_capped_fraction"] == round(2 / 3, 3)
    assert summarize([]) == {"available": False}


def test_sampler_runs_nvidia_smi_in_its_own_process(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in H100) + "exec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with PowerSampler(interval_ms=100) as power:
        time.sleep(0.5)
    assert power._proc is None and len(power.samples) == 3
    assert power.summary()["power_capped_fraction"] == round(2 / 3, 3)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_nvidia_smi_the_summary_says_so():
    with PowerSampler() as power:
        pass
    assert power.summary() == {"available": False}
