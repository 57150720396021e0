"""The whole Beam pipeline against the engine alone, same model, shapes and machine.

Writes a Parquet file of N random-token prompts (EOS ignored, fixed output length), runs
`run_pipeline.py` over it, then the engine-only harness with the same settings, and reports
pipeline generation tok/s / engine-only tok/s.

    python benchmarks/pipeline_e2e.py --model llama2-7b --num_requests 1000 --batch_size 256 --quantize_kv_cache
    python benchmarks/pipeline_e2e.py --dataset sharegpt --batch_size 256 --quantize_kv_cache \
        --engine kv_page_size=64 --engine kv_cache_tokens=auto --engine min_refill=16

The length mix is throughput.py's (same seed, same lengths). Each --engine KEY=VALUE goes to
both runs: to throughput.py as --engine, to the pipeline as its --KEY=VALUE flag.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--num_requests", type=int, default=1000)
    p.add_argument("--input_len", type=int, default=256)
    p.add_argument("--output_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--quantize_kv_cache", action="store_true")
    p.add_argument("--quantize_weights", action="store_true")
    p.add_argument("--prefill_batch", type=int, default=8)
    p.add_argument("--dataset", choices=["fixed", "sharegpt"], default="fixed")
    p.add_argument("--min_prefill_bucket", type=int, default=64, help="length mix only")
    p.add_argument("--max_cache_length", type=int, default=None, help="default: longest prompt + longest reply")
    p.add_argument("--flush_rows", type=int, default=None, help="the pipeline's flush size (default: all rows)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="another engine setting for both runs (repeatable)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    import configs
    from benchmarks import throughput
    work = args.workdir or tempfile.mkdtemp(prefix="jetbeam-e2e-")
    os.makedirs(work, exist_ok=True)
    vocab = configs.load_model_config_dict(args.model)["vocab_size"] if not os.path.exists(args.model) else 32000
    rng = np.random.default_rng(1)
    n = args.num_requests
    shape = [f"--dataset={args.dataset}", f"--num_requests={n}", f"--input_len={args.input_len}",
             f"--output_len={args.output_len}"]
    ins, outs = throughput.make_lengths(throughput.parse_args(shape))
    table = pa.table({
        "id": [f"r{i}" for i in range(n)],
        "prompt": [rng.integers(3, vocab, size=int(a)).tolist() for a in ins],
        "max_tokens": [int(b) for b in outs],
        "ignore_eos": [True] * n,
    })
    src = os.path.join(work, "prompts.parquet")
    pq.write_table(table, src)
    # throughput.py's choices for the same lengths.
    eshape = throughput.engine_shape(args, ins, outs)
    engine_flags = [f"--batch_size={args.batch_size}", f"--prefill_batch={args.prefill_batch}"]
    engine_flags += [f"--{k}={v}" for k, v in eshape.items()]
    engine_flags += ["--quantize_kv_cache"] * args.quantize_kv_cache + ["--quantize_weights"] * args.quantize_weights
    engine_flags += [f"--{k}={v}" for k, v in throughput.engine_overrides(args.engine).items()]

    # The engine-only baseline runs first, in its own process, which frees the GPU when it exits:
    # the pipeline's engine then stays resident in this one (one engine per worker process).
    import subprocess
    eng_json = os.path.join(work, "engine.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), f"--model={args.model}",
                    *shape, f"--batch_size={args.batch_size}", f"--prefill_batch={args.prefill_batch}",
                    f"--max_cache_length={eshape['max_cache_length']}",
                    f"--min_prefill_bucket={args.min_prefill_bucket}", f"--json={eng_json}"]
                   + ["--quantize_kv_cache"] * args.quantize_kv_cache + ["--quantize_weights"] * args.quantize_weights
                   + [f"--engine={e}" for e in args.engine],
                   check=True, stdout=subprocess.DEVNULL)
    import run_pipeline
    out = os.path.join(work, "out")
    # (Run this script once per configuration: the pipeline's engine stays resident afterwards.)
    rc = run_pipeline.main([f"--input={src}", f"--output={out}", f"--model={args.model}",
                            f"--flush_rows={args.flush_rows or n}", *engine_flags])
    if rc:
        raise SystemExit(f"pipeline failed with exit code {rc}")
    with open(os.path.join(out, "metrics.json")) as f:
        pipe = json.load(f)

    with open(eng_json) as f:
        eng = json.load(f)
    report = {
        "model": args.model, "num_requests": n, "input_len": args.input_len, "output_len": args.output_len,
        "dataset": args.dataset, "engine": args.engine, "flush_rows": args.flush_rows or n,
        "slots": args.batch_size, "quantize_kv_cache": args.quantize_kv_cache,
        "quantize_weights": args.quantize_weights,
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
