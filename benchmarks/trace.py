"""Reading JAX profiler traces: device kernels by name and category, and the device's idle gaps.

The profiler writes `*.trace.json.gz` (no TensorBoard needed); benchmarks/profile_step.py and
benchmarks/throughput.py --trace summarise it with these functions.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# Kernel-name patterns for the categories, first match wins (names from XLA, cuBLAS, cuDNN, Pallas).
CATEGORIES = [
    ("attention", r"ragged_decode|cudnn|flash|fmha|sdpa|attention"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|sm90_|sm80_|dot"),
    ("cache write", r"scatter|dynamic.update.slice|dynamic_update_slice"),
    ("copy", r"^copy|memcpy|memset"),
    ("reduce/fusion", r".*"),
]


def category(name: str) -> str:
    low = name.lower()
    return next(c for c, pat in CATEGORIES if re.search(pat, low))


def device_kernels(trace_dir: str) -> list[tuple[str, float]]:
    """(kernel name, microseconds) for every device-kernel event in the newest trace under trace_dir."""
    return [(name, dur) for name, _, dur in device_events(trace_dir)]


def device_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(kernel name, start, duration), microseconds, for every device-kernel event in the newest
    trace under trace_dir."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        return []
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", [])
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))}
    # Device processes hold several lines (streams, plus XLA-op and module summaries): keep the
    # stream lines, where each event is one kernel.
    tnames = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        line = tnames.get((e["pid"], e["tid"]), "")
        if line and not re.search(r"stream", line, re.I):
            continue
        out.append((e.get("name", "?"), float(e.get("ts", 0.0)), float(e.get("dur", 0.0))))
    return out


_GAP_BUCKETS = [(10.0, "<10us"), (100.0, "10-100us"), (1000.0, "0.1-1ms"), (10000.0, "1-10ms"),
                (float("inf"), ">=10ms")]


def idle_gaps(events: list[tuple[str, float, float]], min_gap_us: float = 1000.0, top: int = 10) -> dict:
    """How much of a traced span the device sat idle, and where: the union of kernel intervals
    against first start to last end, and the longest gaps with the kernels on either side.
    The profiler slows the host that launches the kernels, so a traced run shows gaps an
    untraced one does not have."""
    if not events:
        return {"gap_ms_by_size": {}, "gap_pairs": [], "span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0,
                "gaps_over_min": 0, "gaps_over_min_ms": 0.0, "top": []}
    ev = sorted(events, key=lambda e: e[1])
    busy, gaps = 0.0, []
    cur_start, cur_end, last_name = ev[0][1], ev[0][1] + ev[0][2], ev[0][0]
    for name, ts, dur in ev[1:]:
        if ts > cur_end:
            busy += cur_end - cur_start
            gaps.append((ts - cur_end, last_name, name))
            cur_start, cur_end = ts, ts + dur
        else:
            cur_end = max(cur_end, ts + dur)
        if ts + dur >= cur_end:
            last_name = name
    busy += cur_end - cur_start
    span = max(ts + dur for _, ts, dur in ev) - ev[0][1]
    long = [g for g in gaps if g[0] >= min_gap_us]
    by_pair = collections.defaultdict(lambda: [0, 0.0])  # (after, before) -> [count, us]
    hist = collections.Counter()  # gap size bucket -> us
    for g, a, b in gaps:
        by_pair[a[:60], b[:60]][0] += 1
        by_pair[a[:60], b[:60]][1] += g
        hist[next(lab for lim, lab in _GAP_BUCKETS if g < lim)] += g
    return {
        "gap_ms_by_size": {lab: round(hist[lab] / 1e3, 3) for _, lab in _GAP_BUCKETS if hist[lab]},
        "gap_pairs": [{"after": a, "before": b, "count": n, "ms": us / 1e3}
                      for (a, b), (n, us) in sorted(by_pair.items(), key=lambda kv: -kv[1][1])[:top]],
        "span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
        "gaps_over_min": len(long), "gaps_over_min_ms": sum(g[0] for g in long) / 1e3,
        "top": [{"ms": g / 1e3, "after": a[:80], "before": b[:80]}
                for g, a, b in sorted(gaps, key=lambda g: -g[0])[:top]],
    }


def summarize(kernels: list[tuple[str, float]], per: int, top: int = 25) -> dict:
    """Totals per category and per kernel name, divided by `per` (steps or calls)."""
    by_name, count = collections.Counter(), collections.Counter()
    for name, us in kernels:
        by_name[name] += us
        count[name] += 1
    by_cat = collections.Counter()
    for name, us in by_name.items():
        by_cat[category(name)] += us
    total = sum(by_name.values())
    return {
        "device_ms": total / per / 1e3,
        "kernels": len(kernels) / per,
        "categories": {c: us / per / 1e3 for c, us in by_cat.most_common()},
        "top": [{"name": n[:120], "ms": us / per / 1e3, "calls": count[n] / per, "category": category(n)}
                for n, us in by_name.most_common(top)],
    }


def print_summary(title: str, s: dict) -> None:
    print(f"\n== {title}: {s['device_ms']:.2f} ms of device kernels, {s['kernels']:.0f} kernels")
    for c, ms in s["categories"].items():
        print(f"   {c:<14} {ms:8.3f} ms  {ms / max(s['device_ms'], 1e-9):6.1%}")
    for t in s["top"]:
        print(f"   {t['ms']:8.3f} ms {t['calls']:6.1f}x  [{t['category']}] {t['name']}")
