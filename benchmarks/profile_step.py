"""Where a decode step's (and a prefill call's) device time goes, kernel by kernel.

Why: the throughput harness says how fast; this says which kernels to fix. It traces a few
`generate` calls (and optionally a prefill + insert) with the JAX profiler, reads the trace
the profiler writes (`*.trace.json.gz`, no TensorBoard needed), and sums device-kernel time
per kernel name and per category (matmul, attention, cache write, other fusions), per step.

    python benchmarks/profile_step.py --model llama2-7b --slots 256 --context 384 --quantize_kv_cache
    python benchmarks/profile_step.py --model tiny-llama --slots 4 --cache 64 --context 8 --prefill 2x32  # CPU

On CPU the trace holds host threads only, so the tables are empty there; the script still runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_step import add_shape_args, make_llm  # noqa: E402

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
    untraced one does not have (on an H100, 5 s of them in a run whose wall time doubled)."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--iters", type=int, default=3, help="traced generate calls")
    p.add_argument("--prefill", default="", help="also trace one prefill + insert of NxS prompts, e.g. 16x256")
    p.add_argument("--prefill_iters", type=int, default=0,
                   help="prefill + insert calls to time and trace, back to back (default: --iters)")
    p.add_argument("--trace_dir", default="", help="keep the raw trace here (default: a temp dir)")
    p.add_argument("--out", default="", help="write the summaries as JSON here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    n_pf, s_pf = (int(x) for x in args.prefill.split("x")) if args.prefill else (0, 0)
    llm = make_llm(args, context_size=max(16, s_pf), prefill_batch=max(1, n_pf))
    eng, params, state = llm.engine, llm.params, llm.batcher.state
    limit = args.context + args.decode_steps + 1

    def decode(state):
        state.pos = jnp.full((args.slots,), args.context, jnp.int32)
        state.step = jnp.ones((args.slots,), jnp.int32)  # live: a parked slot (step 0) stays put
        state, res = eng.generate(params, state, max_length=limit)
        jax.block_until_ready(res.tokens)
        return state

    def prefill_insert(state):
        prefix, _ = eng.prefill(params=params, padded_tokens=np.ones((n_pf, s_pf), np.int32),
                                true_length=np.full(n_pf, s_pf, np.int32))
        state = eng.insert(prefix, state, np.arange(n_pf, dtype=np.int32))
        jax.block_until_ready(state.tokens)
        return state

    state = decode(decode(state))  # compile + warm
    if n_pf:
        state = prefill_insert(prefill_insert(state))
    results = {"args": vars(args), "device": str(jax.devices()[0].device_kind)}
    base = args.trace_dir or tempfile.mkdtemp(prefix="jetbeam-trace-")
    pf_iters = args.prefill_iters or args.iters
    for what, fn, iters, per in (("decode", decode, args.iters, args.iters * args.decode_steps),
                                 ("prefill+insert", prefill_insert, pf_iters, pf_iters)):
        if what != "decode" and not n_pf:
            continue
        # Untraced wall time first: kernel sums alone miss device time spent idle inside a call.
        t0 = time.perf_counter()
        for _ in range(iters):
            state = fn(state)
        wall_ms = (time.perf_counter() - t0) / per * 1e3
        d = os.path.join(base, what.replace("+", "_"))
        with jax.profiler.trace(d):
            for _ in range(iters):
                state = fn(state)
        events = device_events(d)
        s = summarize([(n, dur) for n, _, dur in events], per)
        s["untraced_wall_ms"] = wall_ms
        s["traced_gaps"] = idle_gaps(events, min_gap_us=100.0, top=8)
        results[what] = s
        print_summary(f"{what} ({'per step' if what == 'decode' else f'per call of {args.prefill}'})", s)
        g = s["traced_gaps"]
        print(f"   untraced wall {wall_ms:.2f} ms; traced: {g['idle_ms'] / per:.2f} ms idle of "
              f"{g['span_ms'] / per:.2f} ms span; gaps by size (ms, all calls) {g['gap_ms_by_size']}")
        for t in g["top"]:
            print(f"   gap {t['ms']:.3f} ms after {t['after'][:50]} before {t['before'][:50]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
