"""Micro-benchmark of one layer's decode attention: XLA vs the ragged Pallas kernel vs cuDNN.

Random cache of B slots x T positions x Hkv heads x D, filled lengths uniform in
[min_len, max_len); one query per slot (H = Hkv * G heads). Times each variant per call
(jitted, warm-up, then --iters calls, device-synchronized) and prints ms and the effective
bandwidth over the FILLED bytes (K+V of positions < length, plus an 8-bit cache's scales):
a variant reading the whole cache shows it as a low GB/s. Every Pallas variant is also checked
against XLA on the same cache (max abs error); a variant that fails to compile prints its error
and the run goes on.

    PYTHONPATH=. python benchmarks/decode_attention.py                 # Llama-2-7B layer, 256 slots
    PYTHONPATH=. python benchmarks/decode_attention.py --sweep         # + block_t/num_warps/... grid
    PYTHONPATH=. python benchmarks/decode_attention.py --kv_heads 8 --group 4   # Llama-3-8B GQA
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/decode_attention.py --small  # CPU smoke test
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engine.kernels.ragged_decode import ragged_decode_attention  # noqa: E402
from engine.kernels.settings import DEFAULTS, parse_setting, resolve  # noqa: E402
from engine.kv_cache import KVCache, decode_attention  # noqa: E402
from benchmarks.roofline import time_call  # noqa: E402

# Methods that quantize q (and for mma8 the probabilities) for 8-bit dots, and the caches each reads.
QUANTIZED_DOT_METHODS = {"mma8": ("int8", "fp8"), "mma8k": ("int8", "fp8"), "dp4a": ("int8",)}



def paginate(cache: KVCache, page: int, seed: int):
    """The one-layer cache [B, T, ...] as B*T/page shuffled pages (+ a trash page) and its table."""
    b, t = cache.k[0].shape[:2]
    w = t // page
    order = jnp.asarray(np.random.default_rng(seed).permutation(b * w), jnp.int32)
    inv = jnp.argsort(order)

    def pages(x):  # [B, T, ...] -> [B*W + 1, page, ...]: page order[i] holds chunk i
        x = x.reshape(b * w, page, *x.shape[2:])[inv]
        return jnp.concatenate([x, jnp.zeros_like(x[:1])])

    def scale_pages(x):  # [B, Hkv, T] -> [B*W + 1, Hkv, page]
        x = x.reshape(b, x.shape[1], w, page).transpose(0, 2, 1, 3).reshape(b * w, x.shape[1], page)[inv]
        return jnp.concatenate([x, jnp.ones_like(x[:1])])

    paged = KVCache([pages(cache.k[0])], [pages(cache.v[0])])
    if cache.quantized:
        paged = KVCache(paged.k, paged.v, [scale_pages(cache.k_scale[0])], [scale_pages(cache.v_scale[0])])
    return paged, order.reshape(b, w)


def sweep_grid(spec: str):
    """'block_t=32,64 convert=magic,prmt' -> every combination, as keyword dicts."""
    keys, values = [], []
    for item in spec.split():
        key, _, vals = item.partition("=")
        parsed = [parse_setting(key, v) for v in vals.split(",")]
        keys.append(parsed[0][0])
        values.append([v for _, v in parsed])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--cache", type=int, default=512, help="T, positions per slot")
    p.add_argument("--kv_heads", type=int, default=32)
    p.add_argument("--group", type=int, default=1, help="query heads per kv head (G)")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--min_len", type=int, default=256)
    p.add_argument("--max_len", type=int, default=512, help="lengths uniform in [min_len, max_len)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time a grid of kernel settings")
    p.add_argument("--grid", default="block_t=32,64,128 num_warps=1,2,4 convert=magic,prmt",
                   help="the --sweep grid: space-separated KEY=V1,V2,... of kernel settings")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test, interpret mode)")
    p.add_argument("--page", type=int, default=64,
                   help="also time the kernel over a paged copy of the cache (shuffled pages of this "
                        "many tokens, checked bit for bit against the contiguous kernel); 0: skip")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.small:
        a.slots, a.cache, a.kv_heads, a.head_dim, a.min_len, a.max_len, a.iters = 4, 64, 2, 32, 8, 64, 2
        a.page = min(a.page, 16)

    backend = jax.default_backend()
    interpret = backend != "gpu"
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}; "
          f"B={a.slots} T={a.cache} Hkv={a.kv_heads} G={a.group} D={a.head_dim} "
          f"lengths in [{a.min_len}, {a.max_len}), {a.iters} iters; kernel defaults {DEFAULTS}"
          + (" [interpret mode]" if interpret else ""))

    b, t, hkv, g, d = a.slots, a.cache, a.kv_heads, a.group, a.head_dim
    cdt = jnp.bfloat16 if backend == "gpu" else jnp.float32
    rng = np.random.default_rng(a.seed)
    lengths = rng.integers(a.min_len, a.max_len, size=b).clip(1, t).astype(np.int32)
    pos = jnp.asarray(lengths - 1)
    key = jax.random.PRNGKey(a.seed)
    kq, kk, kv, kks, kvs = jax.random.split(key, 5)
    q = jax.random.normal(kq, (b, hkv * g, d), cdt)
    k8 = jax.random.randint(kk, (b, t, hkv, d), -127, 128, jnp.int32).astype(jnp.int8)
    v8 = jax.random.randint(kv, (b, t, hkv, d), -127, 128, jnp.int32).astype(jnp.int8)
    ks = jax.random.uniform(kks, (b, hkv, t), jnp.float32, 0.002, 0.03)  # cache layout [B, Hkv, T]
    vs = jax.random.uniform(kvs, (b, hkv, t), jnp.float32, 0.002, 0.03)
    q8 = KVCache([k8], [v8], [ks], [vs])
    # An fp8 e4m3 cache (kv_cache_dtype fp8) with the same scales: other values, the same bytes.
    kf, vf = k8.astype(jnp.float8_e4m3fn), v8.astype(jnp.float8_e4m3fn)
    qf = KVCache([kf], [vf], [ks], [vs])
    # An unquantized cache holding the same values, for the 16-bit paths.
    kb = (k8.astype(jnp.float32) * jnp.swapaxes(ks, 1, 2)[..., None]).astype(cdt)
    vb = (v8.astype(jnp.float32) * jnp.swapaxes(vs, 1, 2)[..., None]).astype(cdt)
    qb = KVCache([kb], [vb])
    jax.block_until_ready((q, q8, qb))

    filled = int(lengths.sum()) * hkv
    bytes_int8 = filled * (2 * d + 2 * 4)  # int8 K+V rows plus their f32 scales
    bytes_16 = filled * 2 * d * jnp.dtype(cdt).itemsize
    full_int8 = b * t * hkv * (2 * d + 8)
    print(f"filled: int8 {bytes_int8 / 1e9:.3f} GB (whole int8 cache {full_int8 / 1e9:.3f} GB), "
          f"{jnp.dtype(cdt).name} {bytes_16 / 1e9:.3f} GB")
    scale = d ** -0.5

    ref8 = jax.jit(lambda q, c, pos: decode_attention(q, c, 0, pos, scale, "xla"))
    refb = jax.jit(lambda q, c, pos: decode_attention(q, c, 0, pos, scale, "xla"))
    want8 = np.asarray(ref8(q, q8, pos), np.float32)
    wantf = np.asarray(ref8(q, qf, pos), np.float32)
    wantb = np.asarray(refb(q, qb, pos), np.float32)

    rows = []

    def bench(name, fn, args, nbytes, want=None):
        try:
            out = np.asarray(jax.block_until_ready(fn(*args)), np.float32)
            err = float(np.abs(out - want).max()) if want is not None else float("nan")
            s = time_call(fn, *args, iters=a.iters, warmup=3)
        except Exception as e:  # a kernel setting that does not compile: report and go on
            print(f"{name:<58} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            return None
        rows.append((name, s))
        print(f"{name:<58} {s * 1e3:8.3f} ms  {nbytes / s / 1e9:8.1f} GB/s filled"
              + ("" if want is None else f"  max|err| vs xla {err:.2e}"))
        return out

    bench("xla int8 (masked einsum, whole cache)", ref8, (q, q8, pos), bytes_int8)
    bench(f"xla {jnp.dtype(cdt).name} (masked einsum, whole cache)", refb, (q, qb, pos), bytes_16)
    if backend == "gpu" and cdt == jnp.bfloat16:
        cud = jax.jit(lambda q, c, pos: decode_attention(q, c, 0, pos, scale, "cudnn"))
        bench("cudnn bf16 (kv lengths)", cud, (q, qb, pos), bytes_16, wantb)

    def pallas(**kw):
        return jax.jit(lambda q, k, v, ks, vs, pos: ragged_decode_attention(
            q, k, v, ks, vs, pos + 1, scale, interpret=interpret, **kw))

    base8 = bench("pallas int8 (defaults)", pallas(), (q, k8, v8, ks, vs, pos), bytes_int8, want8)
    bench(f"pallas {jnp.dtype(cdt).name} (defaults)", pallas(), (q, kb, vb, None, None, pos), bytes_16, wantb)
    other = "fma" if g >= 2 else "dot"  # the method "auto" does not pick for this G
    bench(f"pallas int8 method={other}", pallas(method=other), (q, k8, v8, ks, vs, pos), bytes_int8, want8)
    bench("pallas fp8 (defaults)", pallas(), (q, kf, vf, ks, vs, pos), bytes_int8, wantf)
    bench(f"pallas fp8 method={other}", pallas(method=other), (q, kf, vf, ks, vs, pos), bytes_int8, wantf)
    # 8-bit dots (q, and for mma8 p, quantized per row): compared with XLA, the error includes
    # that quantization, not only float rounding.
    for method, caches in QUANTIZED_DOT_METHODS.items():
        if resolve()["method"] != method:
            for name, kk, vv, want in (("int8", k8, v8, want8), ("fp8", kf, vf, wantf)):
                if name in caches:
                    bench(f"pallas {name} method={method}", pallas(method=method), (q, kk, vv, ks, vs, pos),
                          bytes_int8, want)

    # V stored token-minor ([B, Hkv, D, T]): dp4a for p @ V as well.
    vt8 = jnp.transpose(v8, (0, 2, 3, 1))
    bench("pallas int8 method=dp4a v_layout=dt", pallas(method="dp4a", v_layout="dt"),
          (q, k8, vt8, ks, vs, pos), bytes_int8, want8)
    del vt8

    # Every conversion is exact, so each output must be bit-identical to the defaults'.
    for conv in ("cvt", "magic", "prmt"):
        if conv == resolve()["convert"]:
            continue
        out = bench(f"pallas int8 convert={conv}", pallas(convert=conv), (q, k8, v8, ks, vs, pos), bytes_int8, want8)
        if out is not None and base8 is not None:
            print(f"    convert={conv} output identical to the defaults': {bool(np.array_equal(out, base8))}")

    def paged(**kw):
        return jax.jit(lambda q, k, v, ks, vs, pt, pos: ragged_decode_attention(
            q, k, v, ks, vs, pos + 1, scale, page_table=pt, interpret=interpret, **kw))

    if a.page:
        paged8, pagedb = paginate(q8, a.page, a.seed), paginate(qb, a.page, a.seed)
        table = paged8[1]

        c8, cb = paged8[0], pagedb[0]
        out = bench(f"pallas int8 paged (page {a.page})", paged(),
                    (q, c8.k[0], c8.v[0], c8.k_scale[0], c8.v_scale[0], table, pos), bytes_int8, want8)
        if out is not None and base8 is not None:
            print(f"    paged output identical to the contiguous kernel's: {bool(np.array_equal(out, base8))}")
        bench(f"pallas {jnp.dtype(cdt).name} paged (page {a.page})", paged(),
              (q, cb.k[0], cb.v[0], None, None, table, pos), bytes_16, wantb)
        cf = paginate(qf, a.page, a.seed)[0]
        bench(f"pallas fp8 paged (page {a.page})", paged(),
              (q, cf.k[0], cf.v[0], cf.k_scale[0], cf.v_scale[0], table, pos), bytes_int8, wantf)
        for method, caches in QUANTIZED_DOT_METHODS.items():
            if resolve()["method"] != method:
                for name, c, want in (("int8", c8, want8), ("fp8", cf, wantf)):
                    if name in caches:
                        bench(f"pallas {name} paged (page {a.page}) method={method}", paged(method=method),
                              (q, c.k[0], c.v[0], c.k_scale[0], c.v_scale[0], table, pos), bytes_int8, want)
        bench(f"pallas int8 paged (page {a.page}) method=dp4a v_layout=dt", paged(method="dp4a", v_layout="dt"),
              (q, c8.k[0], jnp.transpose(c8.v[0], (0, 2, 3, 1)), c8.k_scale[0], c8.v_scale[0], table, pos),
              bytes_int8, want8)
        del paged8, pagedb, c8, cb, cf

    if a.sweep:
        # The --grid of settings, with masked loads (faster than unmasked ones in the sweeps of
        # BENCHMARKS.md) and the "fma" method unless the grid names one.
        grid = sweep_grid("block_t=16,32 num_warps=2,4" if a.small else a.grid)
        paged_sweep = None
        if a.page:
            pc, ptable = paginate(q8, a.page, a.seed)
            paged_sweep = (q, pc.k[0], pc.v[0], pc.k_scale[0], pc.v_scale[0], ptable, pos)
        for kw in grid:
            kw = {"method": "fma", "mask_loads": not a.small, **kw}
            label = " ".join(f"{k}={v}" for k, v in kw.items())
            bench("pallas int8 " + label, pallas(**kw), (q, k8, v8, ks, vs, pos), bytes_int8, want8)
            if paged_sweep is not None and kw.get("block_t", DEFAULTS["block_t"]) <= a.page:
                bench(f"pallas int8 paged {a.page} " + label, paged(**kw), paged_sweep, bytes_int8, want8)

    if rows:
        best = min(rows, key=lambda r: r[1])
        print(f"fastest: {best[0]} at {best[1] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
