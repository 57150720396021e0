"""The whole Beam pipeline against the engine alone, same model, shapes and machine.

Writes a Parquet file of N random-token prompts (EOS ignored, fixed output length), runs
`run_pipeline.py` over it, then the engine-only harness with the same settings, and reports
pipeline generation tok/s / engine-only tok/s.

    python benchmarks/pipeline_e2e.py --model llama2-7b --num_requests 1000 --batch_size 256 --quantize_kv_cache
    python benchmarks/pipeline_e2e.py --dataset sharegpt --batch_size 256 --quantize_kv_cache \
        --kv_page_size 64 --kv_cache_tokens auto --min_refill 16

The length mix is throughput.py's (same seed, same lengths), and so are the engine settings: both
runs get every model, engine and scheduler setting flag (engine/config.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks import at_least
    from engine.config import add_settings_arguments
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    b = p.add_argument_group("benchmark")
    b.add_argument("--num_requests", type=at_least(1), default=1000, help="(default: 1000)")
    b.add_argument("--input_len", type=at_least(1), default=256, help="(default: 256)")
    b.add_argument("--output_len", type=at_least(1), default=256, help="(default: 256)")
    b.add_argument("--dataset", choices=["fixed", "sharegpt"], default="fixed", help="(default: fixed)")
    b.add_argument("--flush_rows", type=at_least(1), default=None, help="the pipeline's flush size (default: all rows)")
    b.add_argument("--workdir", default=None)
    b.add_argument("--json", default=None)
    from benchmarks import throughput
    add_settings_arguments(p, defaults={**throughput.BENCH_DEFAULTS, **throughput.DERIVED}, skip=throughput.SAMPLING)
    return p


def main(argv=None):
    from benchmarks import throughput
    from engine.config import settings_flags
    args = build_parser().parse_args(argv)
    sampling = throughput.SAMPLING
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = args.workdir or tempfile.mkdtemp(prefix="jetbeam-e2e-")
    os.makedirs(work, exist_ok=True)
    n = args.num_requests
    shape = [f"--dataset={args.dataset}", f"--num_requests={n}", f"--input_len={args.input_len}",
             f"--output_len={args.output_len}"]
    ins, outs = throughput.make_lengths(throughput.parse_args(shape))
    settings = throughput.settings_for(args, ins, outs)  # the engine harness's choices for these lengths
    given = settings_flags(args, skip=sampling)
    from engine.llm import resolve_model
    vocab = resolve_model(settings.source)[0].vocab_size if settings.source.model else 32000
    rng = np.random.default_rng(1)
    table = pa.table({
        "id": [f"r{i}" for i in range(n)],
        "prompt": [rng.integers(3, vocab, size=int(a)).tolist() for a in ins],
        "max_tokens": [int(b) for b in outs],
        "ignore_eos": [True] * n,
    })
    src = os.path.join(work, "prompts.parquet")
    pq.write_table(table, src)
    # The same settings for both runs: the pipeline gets the harness's resolved engine and
    # scheduler settings as flags.
    flat = {k: v for k, v in settings.to_flat().items() if k not in sampling and v is not None}
    engine_flags = [f"--{k}={v}" for k, v in flat.items() if k != "warmup"]

    # The engine-only baseline runs first, in its own process, which frees the GPU when it exits:
    # the pipeline's engine then stays resident in this one (one engine per worker process).
    import subprocess
    eng_json = os.path.join(work, "engine.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), *shape,
                    *[f"--{k}={v}" for k, v in given.items()], f"--json={eng_json}"],
                   check=True, stdout=subprocess.DEVNULL)
    import run_pipeline
    out = os.path.join(work, "out")
    # (Run this script once per configuration: the pipeline's engine stays resident afterwards.)
    rc = run_pipeline.main([f"--input={src}", f"--output={out}", f"--flush_rows={args.flush_rows or n}",
                            "--overwrite", *engine_flags])
    if rc:
        raise SystemExit(f"pipeline failed with exit code {rc}")
    with open(os.path.join(out, "metrics.json")) as f:  # the directory summary names the run
        run_id = json.load(f)["latest_run"]
    with open(os.path.join(out, f"metrics-{run_id}.json")) as f:
        pipe = json.load(f)

    with open(eng_json) as f:
        eng = json.load(f)
    report = {
        "model": settings.source.model, "num_requests": n, "input_len": args.input_len, "output_len": args.output_len,
        "dataset": args.dataset, "settings": flat, "flush_rows": args.flush_rows or n,
        "pipeline_rows_completed": pipe.get("completed"), "pipeline_rows_errored": pipe.get("errored"),
        "pipeline_output_tok_per_s": pipe.get("output_tok_per_s"),
        "pipeline_job_output_tok_per_s": pipe.get("job_output_tok_per_s"),
        "pipeline_generation_wall_s": pipe.get("wall_time_s"), "pipeline_job_wall_s": pipe.get("job_wall_time_s"),
        "pipeline_scheduler": pipe.get("scheduler"),
        "engine_output_tok_per_s": eng["output_tok_per_s"], "engine_wall_s": eng["wall_s"],
        "engine_scheduler": eng["batcher"], "engine_kv_cache_tokens": eng.get("kv_cache_tokens"),
    }
    report["pipeline_over_engine"] = round(report["pipeline_output_tok_per_s"] / report["engine_output_tok_per_s"], 3)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
