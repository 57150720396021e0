"""Time one `generate` call (decode_steps steps) with every slot filled to a set length.

Separates the decode step from prefill and batching, compares it with the per-step bandwidth
roofline, and lists any cache-sized copies in the compiled HLO (an in-place KV update must
not copy the cache).

    python benchmarks/decode_step.py --model llama2-7b --slots 256 --context 384 --quantize_kv_cache --attention pallas
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The engine shape options shared with benchmarks/profile_step.py."""
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--cache", type=int, default=512, help="max_cache_length")
    p.add_argument("--context", type=int, default=384, help="filled length of every slot")
    p.add_argument("--quantize_weights", action="store_true")
    p.add_argument("--quantize_kv_cache", action="store_true")
    p.add_argument("--attention", default="auto")
    p.add_argument("--decode_steps", type=int, default=8)
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. --engine fuse_projections=0 (repeatable)")


def make_llm(args, context_size: int = 16, **overrides):
    """An LLM with random weights of args' shape, compiled lazily (no warm-up)."""
    from benchmarks.throughput import engine_overrides
    from engine.llm import LLM
    return LLM(args.model, batch_size=args.slots, max_cache_length=args.cache, context_size=context_size,
               quantize_weights=args.quantize_weights, quantize_kv_cache=args.quantize_kv_cache,
               decode_steps=args.decode_steps, attention=args.attention, warmup=False,
               **engine_overrides(args.engine), **overrides)


def cache_copies(hlo_text: str, rows: int, tokens: int) -> list:
    """Lines of compiled HLO that write a whole cache-shaped array ([rows, tokens, ...]) other
    than the in-place updates (scatters, dynamic-update-slices): copies, and loop fusions such as
    the copy XLA's CPU backend makes to undo a bitcast of the cache to another element type."""
    out = []
    for ln in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+\[" + re.escape(f"{rows},{tokens},"), ln)
        if m and not re.search(r"scatter|dynamic.update.slice", m.group(1)) and (
                " copy(" in ln or "kind=kLoop" in ln):
            out.append(ln.strip()[:160])
    return out


def cache_program_copies(eng, params, state, window: int) -> list:
    """cache_copies of the engine's compiled generate and insert programs (a decode step and a
    prefill's insert must update the donated cache in place)."""
    import numpy as np
    rows, tokens = state.cache.k[0].shape[:2]  # slots or pages, then tokens
    copies = cache_copies(eng._generate_jit.lower(params, state, window).compile().as_text(), rows, tokens)
    n, s = eng.prefill_sizes()[-1], eng.buckets[0]
    prefix, _ = eng.prefill(params=params, padded_tokens=np.zeros((n, s), np.int32),
                            true_length=np.ones(n, np.int32))
    pages = np.full((n, eng.pages_per_slot), eng.num_kv_pages, np.int32) if eng.paged else None  # trash page
    insert = eng._insert_jit.lower(state, prefix, np.arange(n, dtype=np.int32), pages).compile()
    return copies + cache_copies(insert.as_text(), rows, tokens)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from benchmarks import roofline as rl

    llm = make_llm(args)
    eng = llm.engine
    state = llm.batcher.state
    state.pos = jnp.full((args.slots,), args.context, jnp.int32)
    state.step = jnp.ones((args.slots,), jnp.int32)  # live: a parked slot (step 0) stays put
    limit = args.context + args.decode_steps + 1
    window = eng._window_for(limit)
    copies = cache_program_copies(eng, llm.params, state, window)
    state, res = eng.generate(llm.params, state, max_length=limit)  # compile + warm
    jax.block_until_ready(res.tokens)
    times = []
    for _ in range(args.iters):
        state.pos = jnp.full((args.slots,), args.context, jnp.int32)
        t = time.perf_counter()
        state, res = eng.generate(llm.params, state, max_length=limit)
        jax.block_until_ready(res.tokens)
        times.append(time.perf_counter() - t)
    step = min(times) / args.decode_steps
    cfg = llm.model_config
    bw = rl.measure_bandwidth()
    wb, kvb, kvs, ws = (1 if args.quantize_weights else 2), (1 if args.quantize_kv_cache else 2), \
        (4 if args.quantize_kv_cache else 0), (4 if args.quantize_weights else 0)
    head_b = 2 if (args.quantize_weights and cfg.tie_embeddings) else wb
    roof = rl.decode_roofline(cfg, args.slots, args.context + args.decode_steps / 2, wb, kvb, kvs, bw,
                              rl.measure_matmul_flops(), ws, head_b)
    print(f"{args.model} slots={args.slots} ctx={args.context} qw={args.quantize_weights} "
          f"qkv={args.quantize_kv_cache} attention={eng.attention_impl} window={window}: "
          f"{step * 1e3:.2f} ms/step ({args.slots / step:.0f} tok/s); roofline {roof['step_time_s'] * 1e3:.2f} ms "
          f"({roof['bytes'] / 1e9:.1f} GB/step at {bw / 1e12:.2f} TB/s) -> {roof['step_time_s'] / step:.0%}; "
          f"cache-sized copies in the HLO of generate and insert: {len(copies)}")
    for c in copies[:4]:
        print("   ", c)


if __name__ == "__main__":
    main()
