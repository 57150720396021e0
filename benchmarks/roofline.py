"""Roofline lower bounds for decode and for a whole batch run, from measured device ceilings.

Why: a tok/s number is only "good" relative to what the card could do at best. This module
measures the two ceilings on the current JAX default device (copy bandwidth, bf16 matmul
rate) and turns a model shape + workload into the time no implementation can beat:
every byte that must cross HBM at `bandwidth`, every FLOP at `flops`, whichever is slower.

    python benchmarks/roofline.py --model llama2-7b --slots 256 --input_len 256 --output_len 256 [--quantized]
    python benchmarks/roofline.py --model tiny-llama --small     # tiny shapes, e.g. on CPU
    # skip measuring and use a card's known ceilings (copy bandwidth in B/s, matmul FLOP/s):
    python benchmarks/roofline.py --model llama2-7b --bandwidth 2.94e12 --flops 895e12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import load_model_config_dict  # noqa: E402
from engine.model_config import ModelConfig  # noqa: E402


def time_call(fn, *args, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call of a jitted fn, after warm-up (compile), device-synchronized."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)  # calls run in order on the device: the last one ends the run
    return (time.perf_counter() - t0) / iters


def measure_bandwidth(nbytes: int | None = None, iters: int = 20) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (`x + 1` over bf16).

    Default size 1 GiB on accelerators (far past any cache), 16 MiB on CPU.
    """
    if nbytes is None:
        nbytes = 2**24 if jax.default_backend() == "cpu" else 2**30
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    t = time_call(jax.jit(lambda a: a + 1), x, iters=iters)
    return 2 * x.nbytes / t


def measure_matmul_flops(n: int | None = None, iters: int = 10) -> float:
    """bf16 [n,n] @ [n,n] rate in FLOP/s (2 n^3 per matmul); n = 8192 on accelerators, 256 on CPU."""
    if n is None:
        n = 256 if jax.default_backend() == "cpu" else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    t = time_call(jax.jit(jnp.matmul), a, b, iters=iters)
    return 2 * n**3 / t


def measure_matmul8_flops(dtype, n: int | None = None, iters: int = 10) -> float:
    """8-bit x 8-bit [n,n] @ [n,n]^T rate in FLOP/s, written as the engine's W8A8 dot
    (engine/quantize.py): int8 x int8 -> int32, or fp8 e4m3 through the dequantize-then-dot form
    XLA rewrites into an fp8 GEMM; the weight stored [N, K]. No scales: the tensor cores' ceiling."""
    if n is None:
        n = 256 if jax.default_backend() == "cpu" else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.uniform(ka, (n, n), jnp.float32, -100, 100).astype(dtype)
    b = jax.random.uniform(kb, (n, n), jnp.float32, -100, 100).astype(dtype)
    dims = (((1,), (1,)), ((), ()))
    if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
        fn = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32))
    else:
        fn = jax.jit(lambda x, w: jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims,
                                                      preferred_element_type=jnp.float32))
    t = time_call(fn, a, b, iters=iters)
    return 2 * n**3 / t


def _read_params(cfg: ModelConfig) -> tuple[int, int]:
    """(params read by a decode step, of which the output head). The untied input embedding is
    only gathered (one row per token), so it is left out; a tied table is read as the head."""
    head = cfg.vocab_size * cfg.hidden_size
    untied_embed = 0 if cfg.tie_embeddings else head
    return cfg.param_count() - untied_embed, head


def _out_columns(cfg: ModelConfig) -> int:
    """Output columns of all weight matrices (one int8 scale each in engine/quantize.py)."""
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = hq + 2 * hkv + cfg.hidden_size + 2 * cfg.intermediate_size + cfg.hidden_size
    return cfg.num_layers * per_layer + cfg.vocab_size


def decode_roofline(cfg: ModelConfig, slots: int, avg_context: float, weight_bytes_per_param: float,
                    kv_bytes_per_value: float, kv_scale_bytes: float, bandwidth: float, flops: float,
                    weight_scale_bytes: float = 0.0, head_bytes_per_param: float | None = None,
                    weight_flops: float | None = None) -> dict:
    """Lower bound on one decode step (one new token for each of `slots` sequences).

    Assumptions: every weight is read from HBM exactly once per step (batching shares it across
    slots; the untied input embedding is only gathered, so not counted); each slot reads the K and
    V of `avg_context` tokens in every layer (2 * layers * kv_heads * head_dim values per token,
    plus `kv_scale_bytes` per token, head and K/V for an int8 cache); activations, the one new
    K/V write and norms' extra traffic are ignored (tiny). FLOPs: 2 per read param per slot
    (matmuls) + attention 4 * layers * heads * head_dim * avg_context per slot (QK^T and PV).
    `weight_scale_bytes` is per output column of each quantized matrix; `head_bytes_per_param`
    (default: weight_bytes_per_param) covers a head kept in bf16, e.g. a tied embedding.
    `weight_flops` (default: `flops`) is the rate of the weight matmuls, e.g. the 8-bit rate for
    W8A8; attention runs at `flops`.
    Step time = max(bytes / bandwidth, flops / flop rate): perfect overlap, peak efficiency.
    """
    params, head = _read_params(cfg)
    hbpp = weight_bytes_per_param if head_bytes_per_param is None else head_bytes_per_param
    weight_bytes = (params - head) * weight_bytes_per_param + head * hbpp
    weight_bytes += _out_columns(cfg) * weight_scale_bytes
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim * kv_bytes_per_value + kv_scale_bytes)
    kv_bytes = slots * avg_context * kv_per_token
    matmul_flops = 2 * params * slots
    attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * avg_context * slots
    step_flops = matmul_flops + attn_flops
    t_mem = (weight_bytes + kv_bytes) / bandwidth
    t_flop = matmul_flops / (weight_flops or flops) + attn_flops / flops
    step = max(t_mem, t_flop)
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "bytes": weight_bytes + kv_bytes,
            "flops": step_flops, "t_memory_s": t_mem, "t_compute_s": t_flop, "step_time_s": step,
            "bound": "memory" if t_mem >= t_flop else "compute", "tok_s": slots / step}


def prefill_roofline(cfg: ModelConfig, prompt_tokens_total: int, flops: float,
                     prompt_len: int | None = None, weight_flops: float | None = None) -> dict:
    """Compute-bound lower bound on prefilling `prompt_tokens_total` tokens.

    Counts 2 FLOPs per layer param per token. Only when `prompt_len` is given (all prompts that
    long) are the causal attention, 4 * layers * heads * head_dim * (prompt_len + 1) / 2 per token,
    and the output head (last token of each prompt only) added. Weight reads are ignored: with
    thousands of tokens per pass they hide under the compute. The weight matmuls run at
    `weight_flops` (default: `flops`), attention at `flops`.
    """
    params, head = _read_params(cfg)
    matmul = 2 * (params - head) * prompt_tokens_total
    attn = 0.0
    if prompt_len:
        attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (prompt_len + 1) / 2 * prompt_tokens_total
        matmul += 2 * head * (prompt_tokens_total // prompt_len)
    return {"flops": matmul + attn, "time_s": matmul / (weight_flops or flops) + attn / flops}


def run_roofline(cfg: ModelConfig, num_requests: int, input_len: int, output_len: int, slots: int,
                 quantized: bool, bandwidth: float, flops: float, quantized_kv: Optional[bool] = None,
                 weight_flops: Optional[float] = None) -> dict:
    """Lower bound on a whole run: prefill every prompt, then decode in waves of `slots`.

    `quantized` means what the engine does with quantize_weights + quantize_kv_cache: int8
    matrices with one f32 scale per output column (a tied embedding stays bf16), 8-bit K/V (int8
    or fp8: the same bytes) with one f32 scale per token and head; otherwise everything bf16. Decode runs
    ceil(num_requests / slots) waves (the last one with the leftover requests) of output_len - 1
    steps (the first output token comes from prefill's logits) at average context
    input_len + output_len / 2. Prefill and decode are summed (no overlap between them).
    `weight_flops`: the rate of the weight matmuls where they run on 8-bit tensor cores (W8A8,
    measured by `measure_matmul8_flops`); default `flops`, the bf16 rate.
    Returns output tok/s for the whole generation phase and for decode alone.
    """
    # `quantized` covers the weights; `quantized_kv` (default: the same) the KV cache.
    quantized_kv = quantized if quantized_kv is None else quantized_kv
    wb, ws = (1, 4) if quantized else (2, 0)
    kvb, kvs = (1, 4) if quantized_kv else (2, 0)
    head_b = 2 if (quantized and cfg.tie_embeddings) else wb
    ctx = input_len + output_len / 2
    pre = prefill_roofline(cfg, num_requests * input_len, flops, prompt_len=input_len, weight_flops=weight_flops)
    waves, decode_s, full = math.ceil(num_requests / slots), 0.0, None
    for w in range(waves):
        active = min(slots, num_requests - w * slots)
        step = decode_roofline(cfg, active, ctx, wb, kvb, kvs, bandwidth, flops, ws, head_b, weight_flops)
        full = full or step
        decode_s += (output_len - 1) * step["step_time_s"]
    out_tokens = num_requests * output_len
    return {"prefill_s": pre["time_s"], "decode_s": decode_s, "waves": waves,
            "gen_tok_s": out_tokens / (pre["time_s"] + decode_s),
            "decode_tok_s": out_tokens / decode_s if decode_s else float("inf"),
            "full_wave_step": full}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--num_requests", type=int, help="default: --slots (one wave)")
    p.add_argument("--input_len", type=int, default=256)
    p.add_argument("--output_len", type=int, default=256)
    p.add_argument("--quantized", action="store_true", help="8-bit weights + 8-bit KV cache")
    p.add_argument("--bandwidth", type=float, help="bytes/s; skips measuring")
    p.add_argument("--flops", type=float, help="FLOP/s; skips measuring")
    p.add_argument("--small", action="store_true", help="tiny measurement sizes (CPU checks)")
    args = p.parse_args(argv)
    cfg = ModelConfig.from_dict(load_model_config_dict(args.model))
    dev = jax.devices()[0]
    bw = args.bandwidth or measure_bandwidth(2**22 if args.small else None, iters=5 if args.small else 20)
    fl = args.flops or measure_matmul_flops(128 if args.small else None, iters=3 if args.small else 10)
    r = run_roofline(cfg, args.num_requests or args.slots, args.input_len, args.output_len,
                     args.slots, args.quantized, bw, fl)
    out = {"device": f"{dev.platform}: {dev.device_kind}", "jax": jax.__version__, "model": args.model,
           "params": cfg.param_count(), "bandwidth_Bps": bw, "bandwidth_measured": args.bandwidth is None,
           "matmul_flops": fl, "flops_measured": args.flops is None, "slots": args.slots,
           "input_len": args.input_len, "output_len": args.output_len, "quantized": args.quantized, **r}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
