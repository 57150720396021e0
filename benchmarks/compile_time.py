"""Compile time and steady time of the engine's decode step and of prefill shapes.

Each program's first call (compilation plus one run) and its steady time, in one process with
the persistent compilation cache off, so the compile times are cold. Compare `--gpu_gemms`
settings (or XLA_FLAGS) in separate processes of one call:

    python benchmarks/compile_time.py --model llama2-7b --batch_size 336 --max_cache_length 512 \
        --quantize_weights w8a8 --quantize_kv_cache --shapes 8x256,32x256 --gpu_gemms {cublas,autotune}
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from benchmarks.decode_step import build_parser as step_parser
    p = step_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--shapes", default="8x256,32x256", help="prefill shapes NxS, comma-separated (default: 8x256,32x256)")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--json", default="", help="write the report here")
    return p


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes takes NxS[,NxS...] with positive N and S, got {text!r}")
    return shapes


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    shapes = parse_shapes(args.shapes)
    import jax
    import numpy as np

    from benchmarks.decode_step import decode_call, make_engine
    t0 = time.perf_counter()
    loaded = make_engine(args, context_size=max(s for _, s in shapes), prefill_batch=max(n for n, _ in shapes),
                         compilation_cache_dir="")
    eng, params = loaded.engine, loaded.params
    if any(s not in eng.buckets for _, s in shapes):
        raise SystemExit(f"--shapes: each S must be a prefill bucket {eng.buckets} (see --min_prefill_bucket)")
    info = eng.describe()
    out = {"label": args.label, "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": info["device_kind"],
           "gpu_gemms": info["gpu_gemms"], "load_s": time.perf_counter() - t0}
    state = eng.init_decode_state()
    steps = eng.geometry.decode_steps
    decode = decode_call(eng, params, args.context)

    def prefill(n, s):
        prefix, _ = eng.prefill(params=params, padded_tokens=np.ones((n, s), np.int32),
                                true_length=np.full(n, s, np.int32))
        jax.block_until_ready(jax.tree_util.tree_leaves(prefix))

    t = time.perf_counter()
    state = decode(state)
    out["decode_first_s"] = time.perf_counter() - t
    state = decode(state)
    t = time.perf_counter()
    for _ in range(args.iters):
        state = decode(state)
    out["decode_step_ms"] = (time.perf_counter() - t) / args.iters / steps * 1e3
    for n, s in shapes:
        t = time.perf_counter()
        prefill(n, s)
        out[f"prefill_{n}x{s}_first_s"] = time.perf_counter() - t
        prefill(n, s)
        t = time.perf_counter()
        for _ in range(args.iters):
            prefill(n, s)
        dt = (time.perf_counter() - t) / args.iters
        out[f"prefill_{n}x{s}_ms"] = dt * 1e3
        out[f"prefill_{n}x{s}_tok_s"] = n * s / dt
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
