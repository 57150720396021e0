"""Offline throughput, vLLM's method: N requests of random token ids, EOS ignored, generation timed.

    python benchmarks/throughput.py --model llama2-7b --input_len 256 --output_len 256 \
        --num_requests 1000 --batch_size 256 --quantize --json out.json --markdown rows.md

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b", help="config name (random weights) or checkpoint")
    p.add_argument("--num_requests", type=int, default=1000)
    p.add_argument("--input_len", type=int, default=256)
    p.add_argument("--output_len", type=int, default=256)
    p.add_argument("--dataset", choices=["fixed", "sharegpt"], default="fixed",
                   help="fixed lengths, or a ShareGPT-like length mix drawn from --seed")
    p.add_argument("--batch_size", type=int, default=256, help="decode slots")
    p.add_argument("--max_cache_length", type=int, default=None, help="default: longest request")
    p.add_argument("--quantize", action="store_true", help="int8 weights and int8 KV cache")
    p.add_argument("--quantize_weights", action="store_true")
    p.add_argument("--quantize_kv_cache", action="store_true")
    p.add_argument("--dtype", default=None)
    p.add_argument("--decode_steps", type=int, default=8)
    p.add_argument("--prefill_batch", type=int, default=8)
    p.add_argument("--min_prefill_bucket", type=int, default=16, help="shortest prefill bucket compiled (length mix only)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed run, run the same requests again waiting on the device after every "
                        "call, and report where the time went (prefill / insert / decode / host)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="rerun the requests under the JAX profiler, keep the trace in DIR and report device "
                        "time per kernel category and busy time for the whole run. The profiler slows the host "
                        "(51 s traced against 27 s untraced on an H100), so its idle gaps overstate an untraced "
                        "run's: read untraced wall minus traced busy time as the idle bound")
    p.add_argument("--attention", default="auto", help="decode attention: auto | xla | cudnn | pallas")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. --engine fuse_projections=0 (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="after the timed run, change these scheduling fields (%s) on the same compiled "
                        "engine and time the same requests again; then the first setting once more, to "
                        "show the drift (repeatable: one timed run per --variant)" % ", ".join(BATCHER_FIELDS))
    p.add_argument("--temperature", type=float, default=0.0, help="vLLM's benchmark samples at 1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry_run", action="store_true",
                   help="no model and no device: run the same requests through the real batcher over "
                        "a schedule-only engine (benchmarks/dry_run.py) and print its decode/prefill call "
                        "counts, slot occupancy and page-pool use (CPU, seconds)")
    p.add_argument("--peer_json", default=None, help="peer_hf.py output for the same shape")
    p.add_argument("--peer", action="store_true",
                   help="first run benchmarks/peer_hf.py on the same model and lengths in its own process "
                        "(needs torch + transformers); its JSON goes to --peer_json or beside --json")
    p.add_argument("--peer_batch", type=int, default=128, help="the peer's batch (default 128; halved while it runs out of memory)")
    p.add_argument("--roofline", action="store_true", help="measure bandwidth/FLOPs and report the roofline")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="append a row to this markdown file")
    p.add_argument("--card", default=None, help="label for the markdown row (default: device kind)")
    return p.parse_args(argv)


# EngineConfig fields the batcher reads at run time: changing one needs no new compilation.
BATCHER_FIELDS = ("min_refill", "schedule", "schedule_window", "early_refill", "park_free_slots")


def set_batcher_fields(engine, items) -> dict:
    """Apply "KEY=VALUE" items (BATCHER_FIELDS only) to engine.config, converted and checked by
    EngineConfig; return the old values, to restore them."""
    changes = engine_overrides(items)
    bad = sorted(set(changes) - set(BATCHER_FIELDS))
    if bad:
        raise SystemExit(f"--variant takes only scheduling fields {BATCHER_FIELDS}, not {bad}")
    checked = dataclasses.replace(engine.config, **changes)
    old = {k: getattr(engine.config, k) for k in changes}
    for k in changes:
        setattr(engine.config, k, getattr(checked, k))
    return old


def engine_shape(args, ins, outs) -> dict:
    """max_cache_length, context_size and min_prefill_bucket for these prompt and reply lengths
    (args: max_cache_length, dataset, min_prefill_bucket): the cache holds the longest prompt
    plus the longest reply unless args.max_cache_length says otherwise."""
    from engine.config import next_power_of_two
    context = int(next_power_of_two(ins.max()))
    cache_len = args.max_cache_length or int(ins.max() + outs.max())
    bucket = int(next_power_of_two(ins.min())) if args.dataset == "fixed" else args.min_prefill_bucket
    return dict(max_cache_length=max(cache_len, context + 1), context_size=context, min_prefill_bucket=bucket)


def make_lengths(args):
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    if args.dataset == "fixed":
        return np.full(n, args.input_len), np.full(n, args.output_len)
    # ShareGPT-like: long-tailed prompts and replies (medians ~180 and ~160 tokens), clipped.
    ins = np.clip(rng.lognormal(np.log(180), 0.9, n), 4, 1024).astype(int)
    outs = np.clip(rng.lognormal(np.log(160), 0.9, n), 4, 1024).astype(int)
    return ins, outs


def make_requests(args, vocab, ins, outs, id_prefix=""):
    from engine.request import Request, SamplingParams
    rng = np.random.default_rng(args.seed + 1)
    return [Request(id=f"{id_prefix}{i}", prompt_token_ids=rng.integers(3, vocab, size=int(a)).tolist(),
                    sampling=SamplingParams(max_tokens=int(b), ignore_eos=True, temperature=args.temperature,
                                            seed=i))
            for i, (a, b) in enumerate(zip(ins, outs))]


def engine_overrides(items) -> dict:
    """["fuse_projections=0", "attention=xla"] -> {"fuse_projections": "0", "attention": "xla"};
    EngineConfig converts and checks each value."""
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine takes KEY=VALUE, got {item!r}")
        out[key.strip()] = val.strip()
    return out


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


def run_peer(args) -> str:
    """Run peer_hf.py on the same model, lengths and dtype before this process touches the
    device (JAX would take most of its memory), and return the path of its JSON."""
    import subprocess
    if args.dataset != "fixed":
        raise SystemExit("--peer runs fixed lengths only (peer_hf.py has no length mix)")
    path = args.peer_json or (os.path.splitext(args.json)[0] + ".peer.json" if args.json else "peer.json")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_hf.py"),
           "--model", args.model, "--batch_size", str(min(args.peer_batch, args.num_requests)),
           "--input_len", str(args.input_len), "--output_len", str(args.output_len), "--json", path]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    print("peer:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.peer:
        args.peer_json = run_peer(args)
    import jax
    from engine.llm import LLM

    ins, outs = make_lengths(args)
    qw = args.quantize or args.quantize_weights
    qk = args.quantize or args.quantize_kv_cache
    shape = engine_shape(args, ins, outs)
    cache_len = shape["max_cache_length"]
    kwargs = dict(batch_size=args.batch_size, **shape,
                  quantize_weights=qw, quantize_kv_cache=qk, dtype=args.dtype, decode_steps=args.decode_steps,
                  prefill_batch=args.prefill_batch, seed=args.seed, attention=args.attention,
                  **engine_overrides(args.engine))
    if args.dry_run:
        from benchmarks.dry_run import dry_run
        from engine.llm import resolve_model
        ec, mc, _, _ = resolve_model(args.model, dict(kwargs, warmup=False))
        if ec.kv_cache_tokens == "auto":
            raise SystemExit("--dry_run has no device memory to size kv_cache_tokens=auto: give the number "
                             "of tokens (a device run logs the number 'auto' chose, and reports it as "
                             "kv_cache_tokens)")
        warm = make_requests(args, mc.vocab_size, ins[:args.batch_size], np.minimum(outs[:args.batch_size], 16), "warm")
        report = dry_run(ec, mc, make_requests(args, mc.vocab_size, ins, outs), warm)
        report.update(dataset=args.dataset, num_requests=args.num_requests, engine=args.engine)
        print(json.dumps(report, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    t0 = time.perf_counter()
    llm = LLM(args.model, warmup=False, **kwargs)
    t_load = time.perf_counter() - t0
    llm.batcher.state = llm.engine.warmup(llm.params, llm.batcher.state)
    t_compile = time.perf_counter() - t0 - t_load
    vocab = llm.model_config.vocab_size
    # A short warm-up pass through the batcher (host paths, allocator), not timed.
    warm = make_requests(args, vocab, ins[:args.batch_size], np.minimum(outs[:args.batch_size], 16), "warm")
    for _ in llm.generate(warm):
        pass
    t_warm = time.perf_counter() - t0 - t_load - t_compile

    def timed(prefix=""):
        llm.batcher.stats.clear()
        start = time.perf_counter()
        results = list(llm.generate(make_requests(args, vocab, ins, outs, prefix)))
        wall = time.perf_counter() - start
        bad = [r for r in results if not r.ok]
        if bad:
            raise SystemExit(f"{len(bad)} requests failed, e.g. {bad[0].error}")
        assert sum(r.completion_tokens for r in results) == int(outs.sum())
        return wall, results

    from benchmarks.gpu_power import PowerSampler
    with PowerSampler() as power:  # was the run at full clock, or at the power cap?
        wall, results = timed()
    out_tok = sum(r.completion_tokens for r in results)
    in_tok = sum(r.prompt_tokens for r in results)
    dev = llm.engine.mesh.devices.flat[0]
    stats = dev.memory_stats() or {}
    report = {
        "date": datetime.date.today().isoformat(),
        "device": dev.device_kind, "device_count": int(llm.engine.mesh.devices.size),
        "jax": jax.__version__, "model": args.model, "dataset": args.dataset,
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
        "mean_input": float(ins.mean()), "mean_output": float(outs.mean()),
        "slots": args.batch_size, "max_cache_length": cache_len, "dtype": str(np.dtype(llm.engine.dtype)),
        "quantize_weights": qw, "quantize_kv_cache": qk, "decode_steps": args.decode_steps,
        "prefill_batch": args.prefill_batch, "engine": args.engine, "decode_attention": llm.engine.attention_impl,
        "temperature": args.temperature,
        "load_s": round(t_load, 2), "compile_s": round(t_compile, 2), "warmup_s": round(t_warm, 2),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2),
        "output_tok_per_s": round(out_tok / wall, 1),
        "total_tok_per_s": round((in_tok + out_tok) / wall, 1),
        "ttft_p50_s": pct([r.ttft_s for r in results], 50), "ttft_p99_s": pct([r.ttft_s for r in results], 99),
        "batcher": {**{k: round(v, 3) for k, v in llm.batcher.stats.items()}, **llm.batcher.scheduler_stats()},
        "kv_cache_tokens": llm.engine.config.kv_cache_tokens,
        "kv_pool_plan": dataclasses.asdict(llm.engine.pool_plan) if llm.engine.pool_plan else None,
        "gpu_power": power.summary(),
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
    }
    if args.variant:
        report["variants"] = []
        for i, item in enumerate(args.variant + ["(first setting again)"]):
            old = set_batcher_fields(llm.engine, item.split(",")) if i < len(args.variant) else {}
            v_wall, _ = timed(f"v{i}-")
            report["variants"].append({"variant": item, "wall_s": round(v_wall, 3),
                                       "output_tok_per_s": round(out_tok / v_wall, 1),
                                       "batcher": llm.batcher.scheduler_stats()})
            print(json.dumps(report["variants"][-1]), flush=True)
            set_batcher_fields(llm.engine, [f"{k}={v}" for k, v in old.items()])
    if args.profile:
        llm.batcher.stats.clear()
        llm.batcher.sync_timing = True
        t0 = time.perf_counter()
        list(llm.generate(make_requests(args, vocab, ins, outs, "profile")))
        prof = {k: round(v, 3) for k, v in llm.batcher.stats.items()}
        prof["wall_s"] = round(time.perf_counter() - t0, 3)
        prof["host_s"] = round(prof["wall_s"] - sum(prof.get(k, 0) for k in ("prefill_s", "insert_s", "decode_s")), 3)
        llm.batcher.sync_timing = False
        report["sync_profile"] = prof
    if args.trace:
        from benchmarks.profile_step import device_events, idle_gaps, summarize
        t0 = time.perf_counter()
        with jax.profiler.trace(args.trace):
            list(llm.generate(make_requests(args, vocab, ins, outs, "trace")))
        traced_wall = time.perf_counter() - t0
        events = device_events(args.trace)
        s = summarize([(n, d) for n, _, d in events], per=1, top=12)
        report["trace"] = {"wall_s": round(traced_wall, 3), **idle_gaps(events),
                           "categories_ms": s["categories"], "top_kernels": s["top"]}
    if args.roofline:
        from benchmarks import roofline as rl
        bw, fl = rl.measure_bandwidth(), rl.measure_matmul_flops()
        rf = rl.run_roofline(llm.model_config, args.num_requests, float(ins.mean()), float(outs.mean()),
                             args.batch_size, qw, bw, fl, quantized_kv=qk)
        rf["output_tok_per_s"] = rf["gen_tok_s"]  # whole generation phase (prefill + decode)
        report.update({"bandwidth_Bps": bw, "matmul_flops": fl, "roofline": rf,
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
    q = "int8 w + int8 KV" if r["quantize_weights"] and r["quantize_kv_cache"] else (
        "int8 w" if r["quantize_weights"] else ("int8 KV" if r["quantize_kv_cache"] else r["dtype"]))
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
