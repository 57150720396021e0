"""Assemble the jetbeam pipeline: read -> validate -> key -> generate -> write.

    plan                = preflight(options)                      pipeline/preflight.py
    rows, read errors   = ReadInputs(files)                       transforms/read.py
    rows, errors        = SkipCommitted(output)                   transforms/resume.py
    requests, bad rows  = Validate(prompt column, settings)       transforms/validate.py
    keyed               = KeyByEngine(num_engines)                transforms/key.py
    done, errors, stats = Generate(settings)                      transforms/generate.py
    metrics             = WriteOutputs(output)                    transforms/write.py

Rows are committed while the job runs; a run resumes its output directory (serving only ids
with no committed record) unless --overwrite; one run at a time holds the directory's lock.
"""

from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, WorkerOptions

from engine.config import Settings
from engine.settings import to_mapping
from pipeline.options import DEFAULT_RUNNER, JobOptions, check_known_flags
from pipeline.preflight import RunPlan, preflight
from transforms import fs
from transforms.generate import STATS, Generate
from transforms.key import KeyByEngine
from transforms.read import ERRORS, ReadInputs
from transforms.resume import SKIPPED, SkipCommitted
from transforms.validate import Validate
from transforms.write import WriteOutputs

log = logging.getLogger(__name__)

LOCAL_RUNNERS = ("fnapirunner", "directrunner", "bundlebaseddirectrunner", "switchingdirectrunner",
                 "prismrunner", "direct", "prism")


# `--runner=DirectRunner` is Beam's SwitchingDirectRunner: it would try Prism first (a GitHub
# download), then, because generate has a processing-time timer, pick the legacy
# BundleBasedDirectRunner, which delivers the end-of-window timer's output after downstream
# GroupByKeys have closed and fails. The FnApiRunner is the DirectRunner's own batch engine.
_DIRECT_ALIASES = ("direct", "directrunner", "switchingdirectrunner",
                   "apache_beam.runners.direct.direct_runner.directrunner",
                   "apache_beam.runners.direct.direct_runner.switchingdirectrunner")


def apply_default_runner(options: PipelineOptions) -> None:
    """No --runner (or DirectRunner): the in-process FnApiRunner (no Prism download, honours --direct_* flags)."""
    std = options.view_as(StandardOptions)
    if not std.runner:
        std.runner = DEFAULT_RUNNER
    elif isinstance(std.runner, str) and std.runner.lower() in _DIRECT_ALIASES:
        log.info("jetbeam: --runner=%s runs on Beam's FnApiRunner (the DirectRunner's batch engine)",
                 std.runner)
        std.runner = DEFAULT_RUNNER


def is_local_runner(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or DEFAULT_RUNNER
    if not isinstance(runner, str):
        runner = type(runner).__name__
    return runner.rsplit(".", 1)[-1].lower() in LOCAL_RUNNERS


def runs_in_process(options: PipelineOptions) -> bool:
    """A local runner whose workers are this process (not --direct_running_mode=multi_processing)."""
    mode = options.view_as(DirectOptions).direct_running_mode
    return is_local_runner(options) and mode != "multi_processing"


def default_num_engines(options: PipelineOptions, job: JobOptions) -> int:
    if job.num_engines:
        return job.num_engines
    if is_local_runner(options):
        # Beam's local FnApiRunner runs a stateful stage on one worker whatever
        # --direct_num_workers says, so more shards would only take turns on one engine.
        return 1
    wo = options.view_as(WorkerOptions)
    return max(1, wo.num_workers or 0, wo.max_num_workers or 0)


def options_summary(job: JobOptions, settings: Settings, num_engines: int) -> dict:
    """The job's settings as metrics-<run>.json records them."""
    out = to_mapping(job)
    out["num_engines"] = num_engines
    out["settings"] = settings.to_flat()
    return out


def build_pipeline(pipeline: beam.Pipeline, options: Optional[PipelineOptions] = None,
                   plan: Optional[RunPlan] = None) -> dict:
    """Add the job to `pipeline`; returns a dict of its main PCollections (metrics included)."""
    options = options or pipeline.options
    plan = plan or preflight(options, check_model_files=False, lock=False)
    jo, settings, output = plan.job, plan.settings, plan.output
    num_engines = default_num_engines(options, jo)

    read = pipeline | "Read" >> ReadInputs(plan.files, id_column=jo.id_column, prompt_column=jo.prompt_column)
    rows_in = ((read.rows, read[ERRORS]) | "AllInputRows" >> beam.Flatten()
               | "CountRowsIn" >> beam.combiners.Count.Globally())
    admitted = {"rows": read.rows, "read_errors": read[ERRORS]} | "SkipCommitted" >> SkipCommitted(
        output, retry_errors=jo.retry_errors)
    skipped = admitted[SKIPPED] | "CountSkipped" >> beam.combiners.Count.Globally()
    valid = admitted.rows | "Validate" >> Validate(jo.prompt_column, settings)
    keyed = valid.valid | "Key" >> KeyByEngine(num_engines)
    rows_per_flush = jo.rows_per_flush(settings)
    gen = keyed | "Generate" >> Generate(settings, rows_per_flush, jo.flush_seconds)
    errors = (admitted[ERRORS], valid[ERRORS], gen[ERRORS]) | "AllErrors" >> beam.Flatten()
    metrics = {"completions": gen.completions, "errors": errors, "stats": gen[STATS],
               "rows_in": rows_in, "skipped": skipped} | "Write" >> WriteOutputs(
        output, plan.run_id, plan.launch_time, options_summary(jo, settings, num_engines),
        commit_rows=rows_per_flush, commit_seconds=jo.commit_seconds, id_column=jo.id_column,
        prompt_column=jo.prompt_column, output_format=jo.output_format)
    log.info("jetbeam: %d input file(s), %d engine shard(s), output %s, run %s", len(plan.files), num_engines,
             output, plan.run_id)
    return {"completions": gen.completions, "errors": errors, "metrics": metrics, "run_id": plan.run_id,
            "output": output, "num_engines": num_engines, "files": plan.files}


def make_options(argv=None, **overrides) -> PipelineOptions:
    """Beam's PipelineOptions of `argv`; ConfigError for a flag no options view knows."""
    if argv is not None:
        check_known_flags(argv)
    options = PipelineOptions(argv, **overrides)
    apply_default_runner(options)
    return options


def run(argv=None, wait: bool = True, options: Optional[PipelineOptions] = None):
    """Check, build and run the job; returns (PipelineResult, this run's metrics or None, build info).

    Raises PreflightError (one line) for mistakes found before any work. The output directory's
    lock is held until the job ends (`wait`), or left to go stale after a submission that does
    not wait."""
    options = options or make_options(argv)
    dry_run = bool(options.get_all_options().get("dry_run"))
    plan = preflight(options, check_model_files=is_local_runner(options), devices_here=runs_in_process(options),
                     lock=not dry_run)
    status = "failed"
    try:
        p = beam.Pipeline(options=options)
        info = build_pipeline(p, options, plan)
        result = p.run()
        metrics = None
        if wait:
            result.wait_until_finish()
            metrics = read_metrics(info["output"], info["run_id"])
        status = None
    except BaseException as e:
        from transforms.serving import interrupted
        status = "interrupted" if interrupted(e) else "failed"  # recorded in the run's manifest
        raise
    finally:
        if wait or status:
            plan.end(status)
    return result, metrics, info


def read_metrics(output: str, run_id: str) -> Optional[dict]:
    """A run's metrics-<run>.json, or None if it was not written."""
    import json
    try:
        return json.loads(fs.read_bytes(fs.join(output, f"metrics-{run_id}.json")))
    except (FileNotFoundError, OSError, ValueError):
        return None
