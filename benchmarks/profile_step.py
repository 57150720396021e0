"""Where a decode step's (and a prefill call's) device time goes, kernel by kernel.

Why: the throughput harness says how fast; this says which kernels to fix. It traces a few
`generate` calls (and optionally a prefill + insert) with the JAX profiler, reads the trace
the profiler writes (`*.trace.json.gz`, no TensorBoard needed), and sums device-kernel time
per kernel name and per category (matmul, attention, cache write, other fusions), per step.

    python benchmarks/profile_step.py --model llama2-7b --batch_size 256 --context 384 --quantize_kv_cache
    python benchmarks/profile_step.py --model tiny-llama --batch_size 4 --max_cache_length 64 --context 8 --prefill 2x32  # CPU

On CPU the trace holds host threads only, so the tables are empty there; the script still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_step import add_shape_args, decode_call, make_engine  # noqa: E402
from benchmarks.trace import device_events, idle_gaps, print_summary, summarize  # noqa: E402

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--iters", type=int, default=3, help="traced generate calls")
    p.add_argument("--prefill", default="", help="also trace one prefill + insert of NxS prompts, e.g. 16x256")
    p.add_argument("--prefill_iters", type=int, default=0,
                   help="prefill + insert calls to time and trace, back to back (default: --iters)")
    p.add_argument("--trace_dir", default="", help="keep the raw trace here (default: a temp dir)")
    p.add_argument("--out", default="", help="write the summaries as JSON here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)

    import jax
    import numpy as np

    n_pf, s_pf = (int(x) for x in args.prefill.split("x")) if args.prefill else (0, 0)
    loaded = make_engine(args, context_size=max(16, s_pf), prefill_batch=max(1, n_pf))
    eng, params = loaded.engine, loaded.params
    state = eng.init_decode_state()
    steps = eng.geometry.decode_steps
    decode = decode_call(eng, params, args.context)

    def prefill_insert(state):
        prefix, _ = eng.prefill(params=params, padded_tokens=np.ones((n_pf, s_pf), np.int32),
                                true_length=np.full(n_pf, s_pf, np.int32))
        state = eng.insert(prefix, state, np.arange(n_pf, dtype=np.int32))
        return eng.sync(state)

    state = decode(decode(state))  # compile + warm
    if n_pf:
        state = prefill_insert(prefill_insert(state))
    results = {"args": vars(args), "device": str(jax.devices()[0].device_kind)}
    base = args.trace_dir or tempfile.mkdtemp(prefix="jetbeam-trace-")
    pf_iters = args.prefill_iters or args.iters
    for what, fn, iters, per in (("decode", decode, args.iters, args.iters * steps),
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
