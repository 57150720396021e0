"""Lower the engine's programs for a platform this host does not have (a TPU, from a CPU host).

    python -m engine.lower --platform tpu [--model llama2-7b] [--quantize_weights w8a8] [settings ...]

The engine is built as the settings say, but on this host's CPU devices (`--platform tpu=N`
uses N of them: simulate them with XLA_FLAGS=--xla_force_host_platform_device_count=N), from
parameter and cache shapes only, so no weights are read or held. Every program it compiles is
then exported for the target with `jax.export`, which lowers each to StableHLO for that platform:
prefill for each prompt count and length bucket and the insert of its output, generate for each
decode window, the two halves of a structured-output step, each packed row length and its
insert, and (paged) a prefill after cached prefix pages. A program that does not lower is
reported in one line (exit 2). Model configs and checkpoints give the same shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np

from engine.config import add_settings_arguments, device_groups, parse_platform, settings_flags, Settings
from engine.settings import ConfigError


def export_programs(settings: Settings, target: str) -> dict:
    """{program: bytes of its StableHLO} of the engine's programs exported for `target`."""
    from engine.engine import JaxEngine
    from engine.model_files import resolve_model
    kind = parse_platform(target)[0]
    count = device_groups(target)[0]  # one engine's devices ("tpu=8/2": 2)
    mc = resolve_model(settings.source)[0]
    here = f"cpu={count}" if count and count > 1 else "cpu"
    ec = _on_cpu(settings.engine, here)
    if kind != "cpu" and ec.kv_layout == "auto":  # the target's layout, not this host's
        ec = dataclasses.replace(ec, kv_layout="tokens")
    eng = JaxEngine(ec, mc, None)
    eng.per_slot_draws = kind == "cpu"  # the target's sampling, not this host's
    params = jax.eval_shape(eng.load_params)
    state = jax.eval_shape(eng.init_decode_state)
    geo = eng.geometry
    out = {}
    for s in geo.prefill_buckets:  # every (prompt count, bucket) prefill, and the insert of its prefix
        for n in geo.prefill_sizes:
            prefill = eng.lower_prefill(params, n, s, platforms=(kind,))
            out[f"prefill[{n}x{s}]"] = len(prefill.mlir_module_serialized)
            out[f"insert[{n}x{s}]"] = len(eng.lower_insert(state, _prefix_of(prefill), np.zeros(n, np.int32),
                                                           platforms=(kind,)).mlir_module_serialized)
    for w in eng.decode_windows():  # XLA attention: one decode program per cache window
        out[f"generate[{w}]"] = len(eng.lower_generate(params, state, max_length=w,
                                                       platforms=(kind,)).mlir_module_serialized)
    forward, sampling = eng.lower_masked_step(params, state, platforms=(kind,))
    out["decode_logits"] = len(forward.mlir_module_serialized)  # structured output: forward, then masks
    out["sample_logits"] = len(sampling.mlir_module_serialized)
    for t in geo.packed_sizes:  # packed prefill: every row length; insert writes a row per token
        packed = eng.lower_prefill_packed(params, t, platforms=(kind,))
        out[f"prefill_packed[{t}]"] = len(packed.mlir_module_serialized)
        out[f"insert_packed[{t}]"] = len(eng.lower_insert(state, _prefix_of(packed), np.zeros(geo.packed_rows, np.int32),
                                                          platforms=(kind,)).mlir_module_serialized)
    if eng.paged:  # prefix caching: a prompt's rest after cached pages (one context length stands for all)
        n, s, ctx = geo.prefill_sizes[-1], geo.prefill_buckets[-1], geo.prefill_buckets[0]
        cached = eng.lower_prefill(params, n, s, platforms=(kind,), decode_state=state, context_tokens=ctx)
        out[f"prefill[{n}x{s}+{ctx}cached]"] = len(cached.mlir_module_serialized)
    return out


def _prefix_of(exported):
    """The Prefix shapes an exported prefill program returns (its first output: the Prefix, then
    the first tokens' logprobs and, bucketed, the prompt logprobs)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        exported.out_tree.unflatten(exported.out_avals))[0]


def _on_cpu(engine_config, platform: str):
    """The engine config on this host's CPUs, with the dtypes an accelerator would resolve (none:
    bfloat16 compute, matrices in the compute dtype), not this CPU's. An "auto" page pool has no
    device memory to be sized from here: it is lowered as kv_cache_tokens=0 sizes it; the
    programs are the same."""
    import dataclasses
    tokens = 0 if engine_config.kv_cache_tokens == "auto" else engine_config.kv_cache_tokens
    dtype = engine_config.dtype or "bfloat16"
    return dataclasses.replace(engine_config, platform=platform, kv_cache_tokens=tokens, dtype=dtype,
                               weight_dtype=engine_config.weight_dtype or dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.lower", description=__doc__.split("\n\n")[0])
    add_settings_arguments(p)
    args = p.parse_args(argv)
    try:
        settings = Settings.from_flat(settings_flags(args), where="flags")
        target = settings.engine.platform
        if parse_platform(target)[0] in (None, "cpu"):
            raise ConfigError("--platform: name the target to lower for (tpu, tpu=N, gpu, ...)")
        programs = export_programs(settings, target)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a program that does not lower: one line naming it
        print(f"error: lowering for {target} failed: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for name, size in programs.items():
        print(f"{target}: {name} lowered ({size:,} bytes of StableHLO)")
    print(f"{target}: all {len(programs)} programs lowered ({sum(programs.values()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
