"""Which XLA GEMM paths reach the tensor cores' int8 / fp8 rate on this GPU, and at what cost.

Times the Llama-2-7B projection shapes at decode (256 rows) and prefill (4096 rows) rows for:
bf16 (the weight [K, N] and pre-transposed [N, K]), the engine's int8 weight-only matmul, and
int8 x int8 -> int32 (w8a8) with the weight in either layout, plus the whole w8a8 linear with
the per-row activation quantization and the output scaling. Each variant runs `--layers`
distinct weights inside one jitted call, so launch overhead is shared, and the script prints
which kernel XLA chose (the compiled HLO's custom-call target or fusion kind).

XLA flags must be set before JAX starts, so compare flag sets with separate processes:

    python3 benchmarks/gemm_probe.py --json a.json
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 benchmarks/gemm_probe.py --json b.json
    python3 benchmarks/gemm_probe.py --torch   # torch._int_mm / bf16 mm: cuBLASLt's own rates
"""

from __future__ import annotations

import argparse
import json
import re
import time

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def _time(fn, args, iters):
    out = fn(*args)
    _block(out)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    _block(out)
    return (time.perf_counter() - t0) / iters


def _block(out):
    for o in (out if isinstance(out, (tuple, list)) else [out]):
        o.block_until_ready()


def _kernels(compiled_text: str) -> str:
    targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled_text))
    kinds = set(re.findall(r'"kind":"(__[^"]+)"', compiled_text))
    fus = set(re.findall(r'kind=(k\w+)', compiled_text))
    return ",".join(sorted(targets | kinds)) or ",".join(sorted(fus))


def run_jax(args):
    import jax
    import jax.numpy as jnp
    from jax import lax

    key = jax.random.PRNGKey(0)
    results = []
    dn_kn = (((1,), (0,)), ((), ()))  # x [M,K] . w [K,N]
    dn_nk = (((1,), (1,)), ((), ()))  # x [M,K] . w [N,K]

    def quant_rows(x):
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True)
        s = jnp.where(amax > 0, amax / 127.0, 1.0)
        return jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8), s

    variants = {
        "bf16_kn": lambda x, w, s: lax.dot_general(x, w, dn_kn, preferred_element_type=jnp.bfloat16),
        "bf16_nk": lambda x, w, s: lax.dot_general(x, w, dn_nk, preferred_element_type=jnp.bfloat16),
        "w8a16_kn": lambda x, w, s: (lax.dot_general(x, w.astype(x.dtype), dn_kn,
                                                     preferred_element_type=jnp.float32) * s
                                     ).astype(jnp.bfloat16),
        "i8i8_kn": lambda x, w, s: lax.dot_general(x, w, dn_kn, preferred_element_type=jnp.int32),
        "i8i8_nk": lambda x, w, s: lax.dot_general(x, w, dn_nk, preferred_element_type=jnp.int32),
        "f8_nk": lambda x, w, s: lax.dot_general(x.astype(jnp.float8_e4m3fn), w, dn_nk,
                                                 preferred_element_type=jnp.bfloat16),
        "w8a8_nk": lambda x, w, s: (lambda xq, xs: (lax.dot_general(
            xq, w, dn_nk, preferred_element_type=jnp.int32).astype(jnp.float32) * xs * s
        ).astype(jnp.bfloat16))(*quant_rows(x)),
    }
    for name, (k, n) in SHAPES.items():
        for m in args.rows:
            for vname, f in variants.items():
                if args.only and vname not in args.only:
                    continue
                nk = vname.endswith("_nk")
                x_int8 = vname.startswith("i8i8")
                wdt = (jnp.bfloat16 if vname.startswith("bf16") else
                       jnp.float8_e4m3fn if vname.startswith("f8") else jnp.int8)
                wshape = (n, k) if nk else (k, n)
                ws = [jax.random.randint(jax.random.fold_in(key, i), wshape, -127, 128, jnp.int32
                                         ).astype(wdt) for i in range(args.layers)]
                x = jax.random.normal(key, (m, k), jnp.float32)
                x = (x * 20).astype(jnp.int8) if x_int8 else x.astype(jnp.bfloat16)
                scale = jnp.full((n,), 0.01, jnp.float32)

                @jax.jit
                def many(x, ws, scale, f=f):
                    return tuple(f(x, w, scale) for w in ws)

                try:
                    text = many.lower(x, ws, scale).compile().as_text()
                    t = _time(many, (x, ws, scale), args.iters) / args.layers
                except Exception as e:  # a path XLA cannot compile here is a result too
                    results.append(dict(shape=name, rows=m, variant=vname, error=str(e)[:200]))
                    print(f"{name:8s} M={m:5d} {vname:9s} failed: {str(e)[:120]}", flush=True)
                    continue
                flops = 2 * m * k * n
                wbytes = k * n * jnp.dtype(wdt).itemsize
                r = dict(shape=name, rows=m, variant=vname, us=t * 1e6, tflops=flops / t / 1e12,
                         weight_gbs=wbytes / t / 1e9, kernels=_kernels(text))
                results.append(r)
                print(f"{name:8s} M={m:5d} {vname:9s} {t*1e6:8.1f} us {r['tflops']:7.1f} TF/s "
                      f"{r['weight_gbs']:7.0f} GB/s  [{r['kernels']}]", flush=True)
                del ws
    return results


def run_torch(args):
    import torch

    results = []
    for name, (k, n) in SHAPES.items():
        for m in args.rows:
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(args.layers)]
            xi = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
            # _int_mm wants the second operand column-major: a transposed [N, K] tensor.
            wi = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t()
                  for _ in range(args.layers)]
            for vname, fn in (("torch_bf16", lambda: [xb @ w for w in wb]),
                              ("torch_int_mm", lambda: [torch._int_mm(xi, w) for w in wi])):
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                torch.cuda.synchronize()
                t = (time.perf_counter() - t0) / args.iters / args.layers
                r = dict(shape=name, rows=m, variant=vname, us=t * 1e6, tflops=2 * m * k * n / t / 1e12)
                results.append(r)
                print(f"{name:8s} M={m:5d} {vname:12s} {t*1e6:8.1f} us {r['tflops']:7.1f} TF/s", flush=True)
            del wb, wi
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[256, 4096])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", type=lambda s: s.split(","), default=None)
    p.add_argument("--torch", action="store_true", help="time torch (cuBLASLt) instead of JAX")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run_torch(args) if args.torch else run_jax(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
