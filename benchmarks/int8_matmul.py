"""Time int8-weight matmuls against cuBLAS bf16 on the decode and prefill shapes of a model.

Why: a decode step's GEMMs read every weight once per step; int8 weights halve those bytes,
but only pay if the int8 GEMM is as fast as bf16 per FLOP. This compares, per shape and row
count: bf16 (`jnp.dot`), XLA's fused int8->bf16 GEMM (what `engine.quantize.linear` runs),
XLA's int8 x int8 -> int32 dot, and our Pallas kernel (engine/kernels/int8_matmul.py) in both
modes over a list of tile configs; each Pallas result is checked against a float32 reference.

    python benchmarks/int8_matmul.py --model llama2-7b --rows 256,4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (block_m, block_n, block_k, num_warps, num_stages)
CONFIGS = {
    "small": [(64, 128, 128, 4, 3), (128, 128, 128, 4, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
              (64, 256, 128, 8, 3), (128, 64, 128, 4, 4), (256, 64, 128, 8, 3), (64, 64, 256, 4, 4)],
    "large": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 128, 8, 3)],
}


def shapes_for(cfg) -> dict:
    d, f = cfg.hidden_size, cfg.intermediate_size
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv": (d, hq + 2 * hkv), "o": (hq, d), "gate_up": (d, 2 * f), "down": (f, d), "up": (d, f)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--rows", default="256,4096")
    p.add_argument("--shapes", default="qkv,o,gate_up,down")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from benchmarks.roofline import time_call
    from configs import load_model_config_dict
    from engine.config import ModelConfig
    from engine.kernels.int8_matmul import int8_matmul, quantize_rows
    from engine.quantize import QuantizedWeight, linear, quantize_weight

    cfg = ModelConfig(**load_model_config_dict(args.model))
    interpret = jax.default_backend() != "gpu"
    results = []
    for sname in args.shapes.split(","):
        k, n = shapes_for(cfg)[sname]
        kw, kx = jax.random.split(jax.random.PRNGKey(hash(sname) & 0xFFFF))
        w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5)
        qw = jax.jit(quantize_weight)(w)
        wb = w.astype(jnp.bfloat16)
        del w
        for m in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
            ref = jnp.dot(x.astype(jnp.float32), qw.q.astype(jnp.float32) * qw.scale)
            flop = 2 * m * k * n

            def record(name, fn, out=None):
                t = time_call(fn, x, iters=args.iters)
                err = None
                if out is not None:
                    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                row = dict(shape=sname, k=k, n=n, m=m, variant=name, us=t * 1e6, tflops=flop / t / 1e12,
                           int8_weight_TBps=k * n / t / 1e12, rel_err=err)
                results.append(row)
                print(f"{sname:8s} M={m:5d} K={k:5d} N={n:5d} {name:34s} {t * 1e6:8.1f} us "
                      f"{flop / t / 1e12:6.0f} TFLOP/s  int8 weight {k * n / t / 1e12:5.2f} TB/s"
                      + ("" if err is None else f"  rel err {err:.1e}"), flush=True)

            record("bf16 cuBLAS (jnp.dot)", jax.jit(lambda a: jnp.dot(a, wb)))
            record("XLA int8->bf16 fused", jax.jit(lambda a: linear(a, QuantizedWeight(qw.q, qw.scale))))

            def xla_w8a8(a):
                aq, s = quantize_rows(a)
                acc = jax.lax.dot(aq, qw.q, preferred_element_type=jnp.int32)
                return (acc.astype(jnp.float32) * s[:, None] * qw.scale).astype(a.dtype)

            record("XLA w8a8 int32 dot", jax.jit(xla_w8a8))
            for mode in ("w8a16", "w8a8"):
                for blocks in CONFIGS["small" if m <= 512 else "large"]:
                    if n % blocks[1] or k % blocks[2]:
                        continue
                    fn = jax.jit(lambda a, _b=blocks, _m=mode: int8_matmul(a, qw.q, qw.scale, mode=_m, blocks=_b,
                                                                          interpret=interpret))
                    try:
                        out = fn(x)
                        record(f"pallas {mode} {blocks}", fn, out)
                    except Exception as e:  # a tile config Triton rejects: report, go on
                        print(f"{sname:8s} M={m:5d} pallas {mode} {blocks}: FAILED {type(e).__name__}: "
                              f"{str(e)[:160]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
