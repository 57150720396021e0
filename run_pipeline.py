#!/usr/bin/env python
"""Offline batch LLM inference with Apache Beam: read -> validate -> key -> generate -> write.

    python run_pipeline.py                      # the sample prompts in data/ through the default model into ./output
    python run_pipeline.py --input 'gs://bucket/prompts/*.parquet' --output gs://bucket/out \\
        --model tiny-llama --max_tokens 128 --num_engines 4
    python run_pipeline.py --help               # every flag (ours first, then Beam's)

Without --runner (or with --runner=DirectRunner) the job runs in-process on Beam's FnApiRunner (no network needed; add
--direct_num_workers=N --direct_running_mode=multi_processing for N worker processes, each
with its own engine). Any other Beam runner works with --runner (see docs/dataflow.md).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported


INTERRUPTED = "jetbeam: interrupted: the rows committed so far are kept; the same command resumes the job"


def _print_help() -> None:
    import argparse
    import textwrap

    from pipeline.options import JetbeamOptions
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py", description=__doc__.split("\n\n")[0],
        epilog=textwrap.fill("Beam's own flags (--runner, --direct_num_workers, --direct_running_mode, --project, "
               "--region, --temp_location, --machine_type, --dataflow_service_options, ...) are accepted "
               "too; `python run_pipeline.py --help_beam` lists them. Runner: the in-process FnApiRunner "
               "unless --runner names another (DirectRunner also means the FnApiRunner). Dataflow: "
               "docs/dataflow.md.", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    JetbeamOptions._add_argparse_args(parser)
    parser.print_help()


def _summary(metrics: dict) -> str:
    def f(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)

    head = (f"jetbeam: {metrics['rows_in']} rows in -> {metrics['completed']} completed, {metrics['errored']} errors"
            + (f", {metrics['rows_skipped_existing']} skipped (committed by earlier runs)"
               if metrics.get("rows_skipped_existing") else ""))
    outputs = (f"  outputs: {metrics['output']}/completions-*.parquet, errors-*.jsonl, "
               f"metrics-{metrics['run_id']}.json (this run), metrics.json (every run)")
    if not metrics.get("engines"):
        if metrics.get("rows_skipped_existing") and not metrics["errored"]:
            why = "nothing was left to generate (--overwrite serves every row again)"
        elif metrics["errored"]:
            why = "no row reached an engine: the error rows say why"
        else:
            why = "the input holds no rows"
        return "\n".join([head, f"  {why}", outputs])
    lines = [
        head,
        f"  model {metrics.get('model')} on {metrics.get('engines')} engine(s), {metrics.get('device_kind')} "
        f"x{metrics.get('device_count')}",
        f"  tokens: {metrics['prompt_tokens']} prompt + {metrics['generated_tokens']} generated in "
        f"{f(metrics['wall_time_s'])} s of generation ({f(metrics['job_wall_time_s'])} s job)",
        f"  throughput: {f(metrics['output_tok_per_s'])} output tok/s, {f(metrics['total_tok_per_s'])} total tok/s, "
        f"{f(metrics['requests_per_s'], '{:.2f}')} requests/s",
        f"  TTFT p50/p90/p99: {f(metrics['ttft_p50_s'], '{:.3f}')}/{f(metrics['ttft_p90_s'], '{:.3f}')}/"
        f"{f(metrics['ttft_p99_s'], '{:.3f}')} s; latency p50/p90/p99: {f(metrics['latency_p50_s'], '{:.3f}')}/"
        f"{f(metrics['latency_p90_s'], '{:.3f}')}/{f(metrics['latency_p99_s'], '{:.3f}')} s",
    ]
    sched = metrics.get("scheduler") or {}
    if sched.get("decode_calls"):
        batch = (metrics.get("engine_config") or {}).get("batch_size")
        line = (f"  slots: {f(sched['mean_live_slots'])} of {batch} decoding per call on average "
                f"({f(sched['slot_occupancy'], '{:.0%}')}), {sched['decode_calls']} decode calls, "
                f"{sched['prefill_calls']} prefill calls")
        if "kv_pages" in sched:
            line += (f"; KV pages: peak {sched['kv_pages_peak']} of {sched['kv_pages']}, "
                     f"{sched['page_waits']} refills waited for pages")
        lines.append(line)
    lines.append(outputs)
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _print_help()
        return 0
    if "--help_beam" in argv:  # every flag of every PipelineOptions view, as Beam collects them
        from pipeline.options import beam_parser
        beam_parser().print_help()
        return 0
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "jax._src", "urllib3", "google", "gcsfs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from engine.settings import ConfigError
    from pipeline.build import make_options, run
    from pipeline.preflight import PreflightError
    try:
        result, metrics, info = run(options=make_options(argv))
    except (PreflightError, ConfigError) as e:  # found before any work: one clear line, no traceback
        print(f"jetbeam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:  # a worker's engine could not load: the job failed, every row stays to serve
        from transforms.serving import interrupted, load_failure
        if interrupted(e):
            print(INTERRUPTED, file=sys.stderr)
            return 130
        why = load_failure(e)
        if why is None:
            raise
        print(f"jetbeam: error: {why.removeprefix('jetbeam ')} (the job stopped; a re-run resumes it)",
              file=sys.stderr)
        return 1
    if metrics is None:
        state = getattr(result, "state", None)
        print(f"jetbeam: job submitted/finished with state {state}; outputs will be in {info['output']}")
        return 0
    print(_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
