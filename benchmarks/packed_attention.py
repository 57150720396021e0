"""One layer's prefill attention over a refill of the length mix: packed against bucketed.

Draws prompt lengths from the ShareGPT-like mix (benchmarks/throughput.py), packs as many as fit
a row of T tokens (engine/packed.py), and times causal attention of that row per implementation
(cuDNN's packed flash attention, XLA over query blocks) against the bucketed layout the same
prompts take otherwise ([N, S] rows, S the longest prompt's bucket, cuDNN). Every packed variant
is checked against XLA on the same row (max abs error over the real tokens).

    PYTHONPATH=. python benchmarks/packed_attention.py --tokens 4096 8192
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/packed_attention.py --small   # CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.roofline import time_call  # noqa: E402
from engine.config import next_power_of_two  # noqa: E402
from engine.kv_cache import prefill_attention  # noqa: E402
from engine.packed import packed_attention, segment_layout  # noqa: E402


def mix_lengths(total: int, longest: int, seed: int) -> np.ndarray:
    """Prompt lengths of the mix (lognormal, median ~180) that fit `total` tokens together."""
    rng = np.random.default_rng(seed)
    out = []
    while True:
        n = int(np.clip(rng.lognormal(np.log(180), 0.9), 4, longest))
        if sum(out) + n > total:
            return np.asarray(out, np.int32)
        out.append(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="packed row lengths T")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=32)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--longest", type=int, default=1024, help="longest prompt (the span XLA's blocks reach)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    a = p.parse_args(argv)
    if a.small:
        a.tokens, a.heads, a.kv_heads, a.head_dim, a.longest, a.iters = [512], 4, 2, 32, 128, 2
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; H={a.heads} Hkv={a.kv_heads} "
          f"D={a.head_dim}, longest prompt {a.longest}")
    scale = a.head_dim ** -0.5
    for t in a.tokens:
        lengths = mix_lengths(t, a.longest, a.seed)
        starts, seg, _ = segment_layout(lengths, t)
        used = int(lengths.sum())
        key = jax.random.split(jax.random.PRNGKey(a.seed), 3)
        q = jax.random.normal(key[0], (1, t, a.heads, a.head_dim), dtype)
        k = jax.random.normal(key[1], (1, t, a.kv_heads, a.head_dim), dtype)
        v = jax.random.normal(key[2], (1, t, a.kv_heads, a.head_dim), dtype)
        args = (q, k, v, jnp.asarray(seg), jnp.asarray(starts), jnp.asarray(lengths))
        real = np.flatnonzero(seg < len(lengths))
        print(f"T={t}: {len(lengths)} prompts, {used} tokens ({t - used} padding), longest {lengths.max()}")
        ref = None
        for impl in ("xla", "cudnn") if on_gpu else ("xla",):
            fn = jax.jit(lambda *x, impl=impl: packed_attention(*x, scale=scale, impl=impl, span=a.longest))
            try:
                out = np.asarray(fn(*args)[0], np.float32)[real]
                ms = time_call(fn, *args, iters=a.iters) * 1e3
            except Exception as e:  # noqa: BLE001 - report the failing variant, go on
                print(f"  packed {impl}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            err = "" if ref is None else f", max abs err vs xla {np.abs(out - ref).max():.3g}"
            ref = out if ref is None else ref
            print(f"  packed {impl}: {ms:.3f} ms{err}")
        s = next_power_of_two(int(lengths.max()))
        n = len(lengths)
        bucketed = [jnp.zeros((n, s) + x.shape[2:], dtype) for x in (q, k, v)]
        fn = jax.jit(lambda q, k, v: prefill_attention(q, k, v, scale=scale, impl="cudnn" if on_gpu else "xla"))
        try:
            ms = time_call(fn, *bucketed, iters=a.iters) * 1e3
            print(f"  bucketed [{n}x{s}] ({n * s} positions): {ms:.3f} ms")
        except Exception as e:  # noqa: BLE001
            print(f"  bucketed: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
