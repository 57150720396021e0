"""Offline throughput, vLLM's method: N requests of random token ids, EOS ignored, generation timed.

    python benchmarks/throughput.py --model llama2-7b --input_len 256 --output_len 256 \
        --num_requests 1000 --batch_size 256 --quantize_kv_cache --json out.json --markdown rows.md

Every engine and scheduler setting of engine/config.py is a flag here too (--help lists them
with this benchmark's defaults).

Weights are random (speed depends on shapes, not values). Start-up (weights, compilation of
every prefill shape and the decode step, one warm-up pass) is timed and reported apart from the
generation phase. Optional: the peer (transformers' numbers from benchmarks/peer_hf.py: --peer
runs it first, in its own process, before JAX takes the device; --peer_json reads an earlier
run) and the roofline (benchmarks/roofline.py), for ratios from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import at_least  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from engine.settings import fields_of  # noqa: E402


# This benchmark's defaults, where they differ from engine/config.py's: Llama-2-7B (random
# weights) at 256 slots, compiled up front. The cache shape follows the request lengths
# (engine_shape) unless a flag gives it.
BENCH_DEFAULTS = {"model": "llama2-7b", "batch_size": 256, "warmup": False}
# The requests are built here (lengths, ignore_eos, --temperature, --seed): no sampling flags.
SAMPLING = tuple(f.name for f in fields_of(SamplingParams))
DERIVED = {"max_cache_length": "longest prompt + longest reply",
           "context_size": "longest prompt, rounded up to a power of 2",
           "min_prefill_bucket": "shortest prompt, rounded up to a power of 2 (fixed lengths)"}


def build_parser() -> argparse.ArgumentParser:
    from engine.config import add_settings_arguments
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    b = p.add_argument_group("benchmark")
    b.add_argument("--num_requests", type=at_least(1), default=1000, help="(default: 1000)")
    b.add_argument("--input_len", type=at_least(1), default=256, help="prompt tokens (default: 256)")
    b.add_argument("--output_len", type=at_least(1), default=256, help="tokens generated per request (default: 256)")
    b.add_argument("--dataset", choices=["fixed", "sharegpt"], default="fixed",
                   help="fixed lengths, or a ShareGPT-like length mix drawn from --seed (default: fixed)")
    b.add_argument("--shared_prefix", type=at_least(0), default=0, metavar="N",
                   help="every prompt starts with the same N random tokens before its --input_len own ones "
                        "(prefix caching: compare with --variant prefix_caching=false; default: 0)")
    b.add_argument("--temperature", type=float, default=0.0, help="vLLM's benchmark samples at 1.0 (default: 0.0)")
    b.add_argument("--seed", type=int, default=0, help="seed of the lengths and prompt tokens (default: 0)")
    b.add_argument("--profile", action="store_true",
                   help="after the timed run, run the same requests again with sync_timing (waiting on the "
                        "device after every call) and report where the time went (prefill / insert / decode / host)")
    b.add_argument("--trace", default=None, metavar="DIR",
                   help="rerun the requests under the JAX profiler, keep the trace in DIR and report device "
                        "time per kernel category and busy time for the whole run. The profiler slows the host, "
                        "so its idle gaps overstate an untraced run's: read untraced wall minus traced busy "
                        "time as the idle bound")
    b.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="after the timed run, serve the same requests again under these scheduler settings "
                        "(engine/config.py SchedulerConfig; no recompilation); then the first setting once "
                        "more, to show the drift (repeatable: one timed run per --variant)")
    b.add_argument("--dry_run", action="store_true",
                   help="no model and no device: run the same requests through the real batcher over the "
                        "fake engine (benchmarks/dry_run.py) and print its decode/prefill call counts, slot "
                        "occupancy and page-pool use (CPU, seconds)")
    b.add_argument("--peer_json", default=None, help="peer_hf.py output for the same shape")
    b.add_argument("--peer", action="store_true",
                   help="first run benchmarks/peer_hf.py on the same model and lengths in its own process "
                        "(needs torch + transformers); its JSON goes to --peer_json or beside --json")
    b.add_argument("--peer_batch", type=int, default=128,
                   help="the peer's batch, halved while it runs out of memory (default: 128)")
    b.add_argument("--warm_shapes", choices=("planned", "all"), default="planned",
                   help="prefill shapes compiled before timing: planned = the (prompt count, bucket) pairs "
                        "the batcher calls for these requests, its warm-up pass and every --variant (from a "
                        "dry run over the fake engine; with kv_cache_tokens=auto, all); all = every bucket at "
                        "every call size. The report counts programs compiled inside the timed runs "
                        "(timed_compiles: 0 expected)")
    b.add_argument("--roofline", action="store_true", help="measure bandwidth/FLOPs and report the roofline")
    b.add_argument("--json", default=None)
    b.add_argument("--markdown", default=None, help="append a row to this markdown file")
    b.add_argument("--card", default=None, help="label for the markdown row (default: device kind)")
    add_settings_arguments(p, defaults={**BENCH_DEFAULTS, **DERIVED}, skip=SAMPLING)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def settings_for(args, ins, outs):
    """The run's Settings: BENCH_DEFAULTS, the cache shape for these lengths, then the flags given.
    `args` may come from another harness's parser (benchmarks/pipeline_e2e.py has no shared prefix)."""
    from engine.config import Settings, settings_flags
    flags = settings_flags(args, skip=SAMPLING)
    shape = engine_shape(flags.get("max_cache_length"), args.dataset, ins, outs, getattr(args, "shared_prefix", 0))
    return Settings.from_flat({**BENCH_DEFAULTS, **shape, **flags}, where="flags")


def engine_shape(max_cache_length, dataset: str, ins, outs, shared_prefix: int = 0) -> dict:
    """max_cache_length, context_size and min_prefill_bucket for these prompt and reply lengths:
    the cache holds the longest prompt plus the longest reply unless max_cache_length is given.
    With a shared prefix the smallest bucket fits the prompts' own tokens (what a cached prefix
    leaves to prefill)."""
    from engine.config import next_power_of_two
    context = int(next_power_of_two(ins.max()))
    cache_len = int(max_cache_length) if max_cache_length else int(ins.max() + outs.max())
    out = dict(max_cache_length=max(cache_len, context + 1), context_size=context)
    if dataset == "fixed":
        out["min_prefill_bucket"] = int(next_power_of_two(ins.min() - shared_prefix))
    return out


def scheduler_changes(item: str) -> dict:
    """"min_refill=8,schedule=arrival" -> {"min_refill": "8", "schedule": "arrival"}."""
    out = {}
    for part in filter(None, item.split(",")):
        key, sep, val = part.partition("=")
        if not sep:
            raise SystemExit(f"--variant takes KEY=VALUE[,KEY=VALUE], got {item!r}")
        out[key.strip()] = val.strip()
    return out


def make_lengths(args):
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    if args.dataset == "fixed":  # prompt lengths count the shared prefix
        return np.full(n, args.input_len + args.shared_prefix), np.full(n, args.output_len)
    # ShareGPT-like: long-tailed prompts and replies (medians ~180 and ~160 tokens), clipped.
    ins = np.clip(rng.lognormal(np.log(180), 0.9, n), 4, 1024).astype(int)
    outs = np.clip(rng.lognormal(np.log(160), 0.9, n), 4, 1024).astype(int)
    return ins, outs


def make_requests(args, vocab, ins, outs, id_prefix=""):
    from engine.request import Request, SamplingParams
    rng = np.random.default_rng(args.seed + 1)
    shared = np.random.default_rng(args.seed + 2).integers(3, vocab, size=args.shared_prefix).tolist()
    return [Request(id=f"{id_prefix}{i}",
                    prompt_token_ids=shared + rng.integers(3, vocab, size=int(a) - len(shared)).tolist(),
                    sampling=SamplingParams(max_tokens=int(b), ignore_eos=True, temperature=args.temperature,
                                            seed=i))
            for i, (a, b) in enumerate(zip(ins, outs))]


def warm_cached_prefix(llm, context_tokens: int, own_tokens: int) -> None:
    """Compile the prefill (every call size) and insert of prompts that continue a cached prefix
    of `context_tokens` with `own_tokens` of their own: engine.warmup covers only whole prompts."""
    from engine.engine_api import CachedPrompt
    b = llm._batcher
    eng, geo = b.engine, b.geo
    bucket, ctx = geo.bucket_for(own_tokens), geo.bucket_for(context_tokens)
    width = -(-ctx // geo.kv_page_size)
    for n in geo.prefill_sizes:
        cached = CachedPrompt(b.state, np.full((n, width), geo.num_kv_pages, np.int32), np.zeros(n, np.int32))
        prefix, _ = eng.prefill(params=b.params, padded_tokens=np.zeros((n, bucket), np.int32),
                                true_length=np.ones(n, np.int32), existing_prefix=cached)
        b.state = eng.insert(prefix, b.state, np.full(n, -1, np.int32))


_COMPILES = [0]  # programs lowered in this process (jax.monitoring, one listener per process)


def _count_compiles() -> None:
    import jax
    if not getattr(_count_compiles, "done", False):
        jax.monitoring.register_event_duration_secs_listener(
            lambda name, secs, **kw: _COMPILES.__setitem__(0, _COMPILES[0] + 1)
            if name.endswith("jaxpr_to_mlir_module_duration") else None)
        _count_compiles.done = True


def planned_shapes(args, settings, mc, ins, outs):
    """The (prompt count, bucket) pairs the timed run, its warm-up pass and each --variant call
    (benchmarks/dry_run.prefill_shapes), or None (every shape) where a dry run cannot size the pool."""
    from benchmarks.dry_run import prefill_shapes
    if settings.engine.kv_cache_tokens == "auto":
        return None
    from engine.settings import from_mapping
    runs = [settings] + [dataclasses.replace(settings, scheduler=from_mapping(
        type(settings.scheduler), scheduler_changes(v), "--variant", base=settings.scheduler)) for v in args.variant]
    slots = settings.engine.batch_size
    warm = make_requests(args, mc.vocab_size, ins[:slots], np.minimum(outs[:slots], 16), "warm")
    return prefill_shapes(runs, mc, make_requests(args, mc.vocab_size, ins, outs), warm)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


def run_peer(args, settings) -> str:
    """Run peer_hf.py on the same model, lengths and dtype before this process touches the
    device (JAX would take most of its memory), and return the path of its JSON."""
    import subprocess
    if args.dataset != "fixed":
        raise SystemExit("--peer runs fixed lengths only (peer_hf.py has no length mix)")
    path = args.peer_json or (os.path.splitext(args.json)[0] + ".peer.json" if args.json else "peer.json")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_hf.py"),
           "--model", settings.source.model, "--batch_size", str(min(args.peer_batch, args.num_requests)),
           "--input_len", str(args.input_len), "--output_len", str(args.output_len), "--json", path]
    if settings.engine.dtype:
        cmd += ["--dtype", settings.engine.dtype]
    print("peer:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return path


def measure_ceilings(quantize_weights: str) -> dict:
    """The roofline's ceilings, measured before the engine takes the device's memory: copy
    bandwidth, the bf16 matmul rate and, for W8A8 weights, the 8-bit rate of the engine's dtype."""
    import jax

    from benchmarks import roofline as rl
    from engine.quantize import w8a8_dtype
    out = {"bandwidth_Bps": rl.measure_bandwidth(), "matmul_flops": rl.measure_matmul_flops()}
    if quantize_weights.startswith("w8a8"):
        dev = jax.devices()[0]
        dtype = w8a8_dtype(quantize_weights, dev.platform, getattr(dev, "compute_capability", None))
        out.update(matmul8_dtype=str(jax.numpy.dtype(dtype)), matmul8_flops=rl.measure_matmul8_flops(dtype))
    return out


def main(argv=None):
    args = parse_args(argv)
    ins, outs = make_lengths(args)
    from engine.llm import resolve_model
    try:
        settings = settings_for(args, ins, outs)
        mc = resolve_model(settings.source)[0]  # headers only: a model that does not resolve is one line
    except ValueError as e:  # ConfigError and CheckpointError too
        raise SystemExit(f"error: {e}") from None
    if args.peer:
        args.peer_json = run_peer(args, settings)
    if args.dry_run:
        from benchmarks.dry_run import dry_run
        warm = make_requests(args, mc.vocab_size, ins[:settings.engine.batch_size],
                             np.minimum(outs[:settings.engine.batch_size], 16), "warm")
        report = dry_run(settings, mc, make_requests(args, mc.vocab_size, ins, outs), warm)
        report.update(dataset=args.dataset, num_requests=args.num_requests)
        print(json.dumps(report, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    import jax
    from engine.llm import LLM
    from engine.settings import to_mapping

    ceilings = measure_ceilings(settings.engine.quantize_weights) if args.roofline else None
    _count_compiles()
    t0 = time.perf_counter()
    llm = LLM(settings=settings)
    t_load = time.perf_counter() - t0
    shapes = planned_shapes(args, settings, llm.model_config, ins, outs) if args.warm_shapes == "planned" else None
    llm.warmup(shapes)
    if args.shared_prefix:
        warm_cached_prefix(llm, args.shared_prefix, args.input_len)
    t_compile = time.perf_counter() - t0 - t_load
    vocab = llm.model_config.vocab_size
    slots = llm.engine_config.batch_size
    # A short warm-up pass through the batcher (host paths, allocator), not timed.
    warm = make_requests(args, vocab, ins[:slots], np.minimum(outs[:slots], 16), "warm")
    for _ in llm.generate(warm):
        pass
    t_warm = time.perf_counter() - t0 - t_load - t_compile

    def timed(prefix=""):
        llm.reset_stats(prefix_cache=True)  # every run starts cold: the same prompts again would hit
        start = time.perf_counter()
        results = list(llm.generate(make_requests(args, vocab, ins, outs, prefix)))
        wall = time.perf_counter() - start
        bad = [r for r in results if not r.ok]
        if bad:
            raise SystemExit(f"{len(bad)} requests failed, e.g. {bad[0].error}")
        assert sum(r.completion_tokens for r in results) == int(outs.sum())
        return wall, results

    from benchmarks.gpu_power import PowerSampler
    compiled_before = _COMPILES[0]
    with PowerSampler() as power:  # was the run at full clock, or at the power cap?
        wall, results = timed()
    out_tok = sum(r.completion_tokens for r in results)
    in_tok = sum(r.prompt_tokens for r in results)
    info = llm.engine_info()
    ec = llm.engine_config
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    report = {
        "date": datetime.date.today().isoformat(),
        "device": info["device_kind"], "device_count": info["device_count"],
        "jax": jax.__version__, "model": llm.model_name, "dataset": args.dataset,
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
        "shared_prefix": args.shared_prefix,
        "mean_input": float(ins.mean()), "mean_output": float(outs.mean()),
        "slots": ec.batch_size, "max_cache_length": ec.max_cache_length, "dtype": info["dtype"],
        "quantize_weights": ec.quantize_weights, "quantize_kv_cache": ec.quantize_kv_cache,
        "decode_steps": ec.decode_steps, "prefill_batch": ec.prefill_batch,
        "settings": settings.to_flat(), "decode_attention": info["decode_attention"],
        "gpu_gemms": info["gpu_gemms"],
        "temperature": args.temperature,
        "load_s": round(t_load, 2), "compile_s": round(t_compile, 2), "warmup_s": round(t_warm, 2),
        "warm_shapes": args.warm_shapes if shapes is None else sorted(shapes),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2),
        "output_tok_per_s": round(out_tok / wall, 1),
        "total_tok_per_s": round((in_tok + out_tok) / wall, 1),
        "ttft_p50_s": pct([r.ttft_s for r in results], 50), "ttft_p99_s": pct([r.ttft_s for r in results], 99),
        "batcher": llm.stats(),
        "kv_cache_tokens": info["kv_cache_tokens"],
        "kv_pool_plan": info["kv_pool_plan"],
        "gpu_power": power.summary(),
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
    }
    if args.variant:
        report["variants"] = []
        first = llm.scheduler_config
        for i, item in enumerate(args.variant + ["(first setting again)"]):
            try:
                llm.set_scheduler(**(scheduler_changes(item) if i < len(args.variant) else to_mapping(first)))
            except ValueError as e:
                raise SystemExit(f"--variant {item}: {e}") from None
            v_wall, _ = timed(f"v{i}-")
            report["variants"].append({"variant": item, "wall_s": round(v_wall, 3),
                                       "output_tok_per_s": round(out_tok / v_wall, 1), "batcher": llm.stats()})
            print(json.dumps(report["variants"][-1]), flush=True)
            llm.set_scheduler(**to_mapping(first))
    report["timed_compiles"] = _COMPILES[0] - compiled_before  # the timed run and its variants
    if report["timed_compiles"]:
        print(f"warning: {report['timed_compiles']} programs compiled inside the timed runs", file=sys.stderr)
    if args.profile:
        first = llm.set_scheduler(sync_timing=True)
        llm.reset_stats(prefix_cache=True)
        t0 = time.perf_counter()
        list(llm.generate(make_requests(args, vocab, ins, outs, "profile")))
        prof = llm.stats()
        prof["wall_s"] = round(time.perf_counter() - t0, 3)
        prof["host_s"] = round(prof["wall_s"] - sum(prof.get(k, 0) for k in ("prefill_s", "insert_s", "decode_s")), 3)
        llm.set_scheduler(**to_mapping(first))
        report["sync_profile"] = prof
    if args.trace:
        from benchmarks.trace import device_events, idle_gaps, summarize
        t0 = time.perf_counter()
        with jax.profiler.trace(args.trace):
            list(llm.generate(make_requests(args, vocab, ins, outs, "trace")))
        traced_wall = time.perf_counter() - t0
        events = device_events(args.trace)
        s = summarize([(n, d) for n, _, d in events], per=1, top=12)
        report["trace"] = {"wall_s": round(traced_wall, 3), **idle_gaps(events),
                           "categories_ms": s["categories"], "top_kernels": s["top"]}
    if ceilings:
        from benchmarks import roofline as rl
        rf = rl.run_roofline(llm.model_config, args.num_requests, float(ins.mean()), float(outs.mean()),
                             ec.batch_size, ec.quantize_weights != "none", ceilings["bandwidth_Bps"],
                             ceilings["matmul_flops"], quantized_kv=ec.quantize_kv_cache,
                             weight_flops=ceilings.get("matmul8_flops"))
        rf["output_tok_per_s"] = rf["gen_tok_s"]  # whole generation phase (prefill + decode)
        report.update({**ceilings, "roofline": rf,
                       "achieved_over_roofline": round(report["output_tok_per_s"] / rf["gen_tok_s"], 3)})
    if args.peer_json and os.path.exists(args.peer_json):
        with open(args.peer_json) as f:
            peer = json.load(f)
        report["peer"] = peer
        report["ours_over_peer"] = round(report["output_tok_per_s"] / peer["output_tok_s"], 2)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown_row(report, args.card or report["device"], " ".join(["python", *sys.argv])) + "\n")


def markdown_row(r, card, command):
    w = {True: "int8", False: "none"}.get(r["quantize_weights"], r["quantize_weights"])  # older reports: bool
    kv = (r.get("settings") or {}).get("kv_cache_dtype", "int8")  # older reports: int8 only
    q = " + ".join(([f"{w} w"] if w != "none" else []) + ([f"{kv} KV"] if r["quantize_kv_cache"] else [])) or r["dtype"]
    shape = f"{r['input_len']}/{r['output_len']}" if r["dataset"] == "fixed" else "sharegpt-mix"
    peer = r.get("peer", {}).get("output_tok_s", "")
    roof = r.get("roofline", {}).get("output_tok_per_s", "")
    cells = [r["date"], card, r["model"], q, shape, r["num_requests"], r["slots"], r["output_tok_per_s"],
             r["total_tok_per_s"], r["requests_per_s"], f"{r['ttft_p50_s']:.3f}/{r['ttft_p99_s']:.3f}",
             f"{(r['peak_device_bytes'] or 0) / 2**30:.1f}", round(roof) if roof else "",
             r.get("achieved_over_roofline", ""), peer, r.get("ours_over_peer", ""),
             f"{r['compile_s']:.0f}", f"`{command}`"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


if __name__ == "__main__":
    main()
