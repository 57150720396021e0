"""Assemble the jetbeam pipeline: read -> validate -> key -> generate -> write.

    rows, read errors   = ReadInputs(files)                       transforms/read.py
    (rows               = SkipExisting(output)   with --skip_existing)
    specs, bad rows     = Validate(prompt column, sampling flags)  transforms/validate.py
    keyed               = KeyByEngine(num_engines)                transforms/key.py
    done, errors, stats = Generate(model, engine config)          transforms/generate.py
    metrics             = WriteOutputs(output)                    transforms/write.py
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, WorkerOptions

from engine.config import Settings
from engine.settings import to_mapping
from pipeline.options import DEFAULT_RUNNER, JobOptions, job_settings
from transforms import fs
from transforms.generate import STATS, Generate
from transforms.key import KeyByEngine
from transforms.read import ERRORS, ReadInputs, SkipExisting
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
    """The job's settings as metrics.json records them."""
    out = to_mapping(job)
    out["num_engines"] = num_engines
    out["settings"] = settings.to_flat()
    return out


def build_pipeline(pipeline: beam.Pipeline, options: Optional[PipelineOptions] = None,
                   files: Optional[list] = None, run_id: Optional[str] = None,
                   launch_time: Optional[float] = None):
    """Add the job to `pipeline`; returns a dict of its main PCollections (metrics included)."""
    options = options or pipeline.options
    jo, settings = job_settings(options)
    if files is None:
        files = fs.expand_inputs(jo.input)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    launch_time = launch_time or time.time()
    num_engines = default_num_engines(options, jo)
    output = jo.output.rstrip("/") if fs.is_remote(jo.output) else os.path.abspath(jo.output)

    read = pipeline | "Read" >> ReadInputs(files, id_column=jo.id_column, prompt_column=jo.prompt_column)
    rows_in = ((read.rows, read[ERRORS]) | "AllInputRows" >> beam.Flatten()
               | "CountRowsIn" >> beam.combiners.Count.Globally())
    rows = read.rows
    if jo.skip_existing:
        kept = rows | "SkipExisting" >> SkipExisting(output)
        rows = kept.rows
        skipped = kept.skipped | "CountSkipped" >> beam.combiners.Count.Globally()
    else:
        skipped = pipeline | "NoneSkipped" >> beam.Create([0])
    valid = rows | "Validate" >> Validate(jo.prompt_column, settings)
    keyed = valid.valid | "Key" >> KeyByEngine(num_engines)
    gen = keyed | "Generate" >> Generate(settings, jo.rows_per_flush(settings), jo.flush_seconds)
    errors = (read[ERRORS], valid[ERRORS], gen[ERRORS]) | "AllErrors" >> beam.Flatten()
    metrics = {"completions": gen.completions, "errors": errors, "stats": gen[STATS],
               "rows_in": rows_in, "skipped": skipped} | "Write" >> WriteOutputs(
        output, run_id, jo.skip_existing, launch_time, options_summary(jo, settings, num_engines),
        id_column=jo.id_column, prompt_column=jo.prompt_column)
    log.info("jetbeam: %d input file(s), %d engine shard(s), output %s, run %s", len(files), num_engines,
             output, run_id)
    return {"completions": gen.completions, "errors": errors, "metrics": metrics, "run_id": run_id,
            "output": output, "num_engines": num_engines, "files": files}


def make_options(argv=None, **overrides) -> PipelineOptions:
    options = PipelineOptions(argv, **overrides)
    apply_default_runner(options)
    return options


def check_options(options: PipelineOptions) -> list:
    """Fail fast, in the launcher, on settings the workers would reject (ConfigError, one line);
    returns the input files."""
    jo, _ = job_settings(options)
    return fs.expand_inputs(jo.input)


def run(argv=None, wait: bool = True, options: Optional[PipelineOptions] = None,
        files: Optional[list] = None):
    """Build and run the job; returns (PipelineResult, metrics dict or None, build info)."""
    options = options or make_options(argv)
    launch_time = time.time()
    if files is None:
        files = check_options(options)
    p = beam.Pipeline(options=options)
    info = build_pipeline(p, options, files=files, launch_time=launch_time)
    result = p.run()
    metrics = None
    if wait:
        result.wait_until_finish()
        metrics = read_metrics(info["output"], info["run_id"])
    return result, metrics, info


def read_metrics(output: str, run_id: Optional[str] = None) -> Optional[dict]:
    import json
    path = fs.join(output, "metrics.json")
    try:
        m = json.loads(fs.read_bytes(path))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if run_id and m.get("run_id") != run_id:
        return None
    return m
