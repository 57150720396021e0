"""Time one `generate` call (decode_steps steps) with every slot filled to a set length.

Separates the decode step from prefill and batching, compares it with the per-step bandwidth
roofline, and lists any cache-sized copies in the compiled HLO (an in-place KV update must
not copy the cache).

    python benchmarks/decode_step.py --model llama2-7b --batch_size 256 --context 384 --quantize_kv_cache --attention pallas
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# This benchmark's shape: a Llama-2-7B decode step at 256 slots of 512 tokens, compiled lazily.
SHAPE_DEFAULTS = {"model": "llama2-7b", "batch_size": 256, "max_cache_length": 512, "context_size": 16,
                  "warmup": False}


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """Every model and engine setting as a flag (engine/config.py), with SHAPE_DEFAULTS, and the
    filled length of every slot. Shared with benchmarks/profile_step.py."""
    from engine.config import add_settings_arguments
    add_settings_arguments(p, defaults=SHAPE_DEFAULTS, skip=_skipped())
    p.add_argument("--context", type=int, default=384, help="filled length of every slot (default: 384)")


def _skipped() -> tuple:
    """The settings one decode step does not use: the scheduler's and the requests'."""
    from engine.config import SamplingParams, SchedulerConfig
    from engine.settings import fields_of
    return tuple(f.name for cls in (SchedulerConfig, SamplingParams) for f in fields_of(cls))


def shape_settings(args, **overrides):
    """The flags' settings over SHAPE_DEFAULTS, with `overrides` (by name) on top."""
    from engine.config import Settings, settings_flags
    flags = settings_flags(args, skip=_skipped())
    return Settings.from_flat({**SHAPE_DEFAULTS, **flags, **overrides}, where="flags")


def make_engine(args, **overrides):
    """load_engine of shape_settings(args, **overrides)."""
    from engine.llm import load_engine
    return load_engine(shape_settings(args, **overrides))


def decode_call(eng, params, context: int):
    """state -> state: one generate call (decode_steps steps) after refilling every slot to
    `context` tokens, waited for. What profile_step.py and compile_time.py time."""
    import jax
    limit = context + eng.geometry.decode_steps + 1

    def call(state):
        state, res = eng.generate(params, eng.filled_state(state, context), max_length=limit)
        jax.block_until_ready(res.tokens)
        return state
    return call


def cache_copies(hlo_text: str, *dims: int) -> list:
    """Lines of compiled HLO that write a whole cache-shaped array ([*dims, ...]) other
    than the in-place updates (scatters, dynamic-update-slices): copies, and loop fusions such as
    the copy XLA's CPU backend makes to undo a bitcast of the cache to another element type."""
    out = []
    for ln in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+\[" + re.escape("".join(f"{d}," for d in dims)), ln)
        if m and not re.search(r"scatter|dynamic.update.slice", m.group(1)) and (
                " copy(" in ln or "kind=kLoop" in ln):
            out.append(ln.strip()[:160])
    return out


def cache_program_copies(eng, params, state, max_length=None) -> list:
    """cache_copies of the engine's compiled generate and insert programs (a decode step and a
    prefill's insert must update the donated cache in place)."""
    import numpy as np
    k = state.cache.k[0]  # slots or pages, then tokens; chunked: slots, heads, block positions
    dims = k[0].shape[:3] if isinstance(k, tuple) else k.shape[:2]
    copies = cache_copies(eng.lower_generate(params, state, max_length).compile().as_text(), *dims)
    n, s = eng.geometry.prefill_sizes[-1], eng.geometry.prefill_buckets[0]
    prefix, _ = eng.prefill(params=params, padded_tokens=np.zeros((n, s), np.int32),
                            true_length=np.ones(n, np.int32))
    insert = eng.lower_insert(state, prefix, np.arange(n, dtype=np.int32)).compile()
    return copies + cache_copies(insert.as_text(), *dims)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--iters", type=int, default=5, help="timed calls (default: 5)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)

    import jax
    from benchmarks import roofline as rl

    loaded = make_engine(args)
    eng, params = loaded.engine, loaded.params
    ec = eng.config
    state = eng.filled_state(eng.init_decode_state(), args.context)
    limit = args.context + ec.decode_steps + 1
    window = eng.window_for(limit)
    copies = cache_program_copies(eng, params, state, limit)
    state, res = eng.generate(params, state, max_length=limit)  # compile + warm
    jax.block_until_ready(res.tokens)
    times = []
    for _ in range(args.iters):
        state = eng.filled_state(state, args.context)
        t = time.perf_counter()
        state, res = eng.generate(params, state, max_length=limit)
        jax.block_until_ready(res.tokens)
        times.append(time.perf_counter() - t)
    step = min(times) / ec.decode_steps
    cfg = eng.model_config
    bw = rl.measure_bandwidth()
    qw, qk = ec.quantize_weights != "none", ec.quantize_kv_cache
    wb, kvb, kvs, ws = (1 if qw else 2), (1 if qk else 2), (4 if qk else 0), (4 if qw else 0)
    head_b = 2 if (qw and cfg.tie_embeddings) else wb
    roof = rl.decode_roofline(cfg, ec.batch_size, args.context + ec.decode_steps / 2, wb, kvb, kvs, bw,
                              rl.measure_matmul_flops(), ws, head_b)
    print(f"{loaded.model_name} slots={ec.batch_size} ctx={args.context} qw={ec.quantize_weights} qkv={qk} "
          f"attention={eng.describe()['decode_attention']} window={window}: "
          f"{step * 1e3:.2f} ms/step ({ec.batch_size / step:.0f} tok/s); roofline {roof['step_time_s'] * 1e3:.2f} ms "
          f"({roof['bytes'] / 1e9:.1f} GB/step at {bw / 1e12:.2f} TB/s) -> {roof['step_time_s'] / step:.0%}; "
          f"cache-sized copies in the HLO of generate and insert: {len(copies)}")
    for c in copies[:4]:
        print("   ", c)


if __name__ == "__main__":
    main()
