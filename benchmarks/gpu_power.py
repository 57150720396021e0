"""The GPU's SM clock, power draw and throttle reasons, sampled while a benchmark runs.

Why: through a sustained run a GPU can sit at its power cap with its SM clock well under its
maximum, and the compute-bound prefill slows down with it. A short benchmark runs at full clock; a whole run does not. Recording the clock beside each timed
run says which of the two a number is, and explains part of the noise between calls.

    with PowerSampler() as power:
        run()
    power.summary()  # {"available": True, "samples": 212, "sm_mhz_mean": 1690.0, ...}

`nvidia-smi` samples in its own process (no CUDA context in ours); without it (CPU, TPU) the
summary says {"available": False}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

QUERY = "clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_throttle_reasons.active"
# Throttle-reason bits (NVML): software power cap, hardware power brake.
POWER_CAP_BITS = 0x4 | 0x80


def parse_sample(line: str) -> Optional[dict]:
    """One `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` line, or None if a
    field is not a number (nvidia-smi prints "[N/A]" for what a card does not report)."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 5:
        return None
    try:
        sm, sm_max, power, limit = (float(f) for f in fields[:4])
        reasons = int(fields[4], 16)
    except ValueError:
        return None
    return {"sm_mhz": sm, "sm_mhz_max": sm_max, "power_w": power, "power_limit_w": limit,
            "power_capped": bool(reasons & POWER_CAP_BITS)}


def summarize(samples: list[dict]) -> dict:
    if not samples:
        return {"available": False}
    sm = [s["sm_mhz"] for s in samples]
    return {
        "available": True, "samples": len(samples),
        "sm_mhz_mean": round(sum(sm) / len(sm), 1), "sm_mhz_min": min(sm),
        "sm_mhz_max_clock": samples[0]["sm_mhz_max"],
        "power_w_mean": round(sum(s["power_w"] for s in samples) / len(samples), 1),
        "power_w_max": max(s["power_w"] for s in samples), "power_limit_w": samples[0]["power_limit_w"],
        "power_capped_fraction": round(sum(s["power_capped"] for s in samples) / len(samples), 3),
    }


class PowerSampler:
    """Runs `nvidia-smi` every `interval_ms` for device `device` between __enter__ and __exit__."""

    def __init__(self, interval_ms: int = 250, device: int = 0):
        self.interval_ms, self.device = interval_ms, device
        self.samples: list[dict] = []
        self._proc = None
        self._path = None

    def __enter__(self) -> "PowerSampler":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        fd, self._path = tempfile.mkstemp(prefix="jetbeam-power-", suffix=".csv")
        with os.fdopen(fd, "w") as out:  # a file, not a pipe: a full pipe would stall sampling
            self._proc = subprocess.Popen(
                [exe, f"--id={self.device}", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.interval_ms}"], stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        with open(self._path) as f:
            self.samples = [s for s in map(parse_sample, f) if s is not None]
        os.unlink(self._path)
        self._proc = None

    def summary(self) -> dict:
        return summarize(self.samples)
