"""Checks before any work: every mistake the launcher can see is one line and exit 2, in seconds.

`preflight(options)` checks the flags and settings file, lists the inputs, opens the model's
checkpoint and tokenizer (headers only, on local runners: on Dataflow the model lives on the
workers), checks that the output can be written (a missing bucket, an unwritable directory),
takes the output directory's lock, heals what a killed run left there, and refuses to resume
into a directory whose earlier runs used another model or other sampling settings. It returns
the `RunPlan` the pipeline is built from; `RunPlan.end()` gives the lock back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from engine.config import ModelSource, Settings
from engine.request import SamplingParams
from engine.settings import ConfigError, fields_of, to_mapping
from pipeline.options import JobOptions, job_settings
from pipeline.run_lock import RunLock
from transforms import fs
from transforms.openai_output import output_path as openai_output_path
from transforms.output_dir import (COMPLETIONS, ERRORS, OutputError, Scan, heal, list_pieces, new_run_id,
                                   read_manifests, state_path, write_manifest)

log = logging.getLogger(__name__)

# Settings that change what a row's output is: a resume must not mix two of them in one directory
# (which model, how it computes, and every request default).
OUTPUT_SETTINGS = (*(f.name for f in fields_of(ModelSource)), "dtype", "quantize_weights", "quantize_kv_cache",
                   "context_size", "random_seed", *(f.name for f in fields_of(SamplingParams)))
OUTPUT_JOB_OPTIONS = ("prompt_column", "id_column")


class PreflightError(ValueError):
    """A mistake found before any work; the message is one line."""


@dataclass
class RunPlan:
    """What preflight found and holds: the job's settings, its inputs, its run id and lock."""

    job: JobOptions
    settings: Settings
    files: list
    output: str
    run_id: str
    launch_time: float
    scan: Scan
    lock: Optional[RunLock] = None

    def end(self, status: Optional[str] = None) -> None:
        """Give the lock back; `status` (e.g. "failed") is recorded in the run's manifest."""
        if self.lock is None:
            return
        try:
            if status:
                manifests = {m["run_id"]: m for m in read_manifests(self.output)}
                mine = manifests.get(self.run_id)
                if mine is not None and mine.get("status") == "running":
                    mine.update(status=status, ended=time.time())
                    write_manifest(self.output, self.run_id, mine)
        finally:
            self.lock.release()
            self.lock = None


def output_path(job: JobOptions) -> str:
    return job.output.rstrip("/") if fs.is_remote(job.output) else os.path.abspath(job.output)


def check_model(settings: Settings) -> None:
    """Open the checkpoint's headers and the tokenizer (no weights); PreflightError if they fail."""
    from engine.checkpoint import CheckpointError
    from engine.model_files import resolve_model
    try:
        model_config = resolve_model(settings.source)[0]
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        raise PreflightError(f"model: {e}") from None
    check_decode_kernel(settings, model_config)


def check_devices(settings: Settings) -> None:
    """The devices `platform` names are visible to this process (an in-process run, whose engine
    loads here): a wrong platform fails now, not after reading and validating every input row."""
    from engine.sharding import make_mesh
    try:
        make_mesh(settings.engine.platform)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_decode_kernel(settings: Settings, model_config) -> None:
    """With attention pallas asked for, the decode_kernel settings must fit the model's heads
    (an engine on one device; the engine checks its own share under tensor parallelism)."""
    if settings.engine.attention != "pallas":
        return
    from engine.kernels.checks import model_settings_error
    why = model_settings_error(model_config, settings.engine)
    if why:
        raise PreflightError(f"decode_kernel: {why}")


def check_writable(output: str) -> None:
    """Write and remove a probe under `output`; PreflightError naming what is wrong."""
    if output.startswith(("gs://", "gcs://")):
        fsys, stripped = fs.get_fs(output)
        bucket = stripped.split("/", 1)[0]
        try:
            found = fsys.exists(bucket)
        except Exception as e:  # credentials, network: say so now, not after the work
            raise PreflightError(f"--output {output}: cannot reach gs://{bucket} ({type(e).__name__}: {e})") from None
        if not found:
            raise PreflightError(f"--output {output}: bucket gs://{bucket} does not exist (or is not visible to "
                                 f"these credentials)")
    probe = state_path(output, f"probe-{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(state_path(output))
        fs.write_bytes(probe, b"jetbeam write probe\n")
        fs.remove(probe)
    except Exception as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise PreflightError(f"--output {output}: cannot write there ({why})") from None


def incompatible(manifests: list, job: JobOptions, settings: Settings) -> Optional[str]:
    """Why this run must not resume the directory's earlier runs, or None."""
    earlier = [m for m in manifests if m.get("settings")]
    if not earlier:
        return None
    last = earlier[-1]
    now = {**{k: v for k, v in settings.to_flat().items() if k in OUTPUT_SETTINGS},
           **{k: v for k, v in to_mapping(job).items() if k in OUTPUT_JOB_OPTIONS}}
    before = last["settings"]
    changed = [k for k in now if k in before and _same(before[k]) != _same(now[k])]
    if not changed:
        return None
    diffs = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:4])
    return (f"--output {job.output} holds rows of run {last['run_id']} made with other settings ({diffs}); "
            f"resuming would mix them: pass --overwrite to replace them, or use another --output")


def _same(v):
    return list(v) if isinstance(v, tuple) else v


def _clear(output: str) -> int:
    """Remove every piece, metrics file and manifest (--overwrite); returns how many files."""
    paths = [p.path for p in list_pieces(output)]
    paths += fs.list_files(output, "metrics", ".json") + fs.list_files(output, "metrics", ".csv")
    paths += fs.list_files(state_path(output, "runs"), "", ".json")
    for path in paths:
        fs.remove(path)
    return len(paths)


def preflight(options: PipelineOptions, *, check_model_files: bool = True, devices_here: bool = False,
              lock: bool = True) -> RunPlan:
    """The checked plan of a run; PreflightError (one line) for any mistake found. `devices_here`:
    the engine loads in this process, so the platform's devices are checked here too."""
    try:
        job, settings = job_settings(options)
        files = fs.expand_inputs(job.input)
    except ValueError as e:  # ConfigError included
        raise PreflightError(str(e)) from None
    if check_model_files:
        check_model(settings)
    if devices_here:
        check_devices(settings)
    output = output_path(job)
    inside = [path for path, _ in files if path.startswith(output.rstrip("/") + "/")]
    if inside:
        raise PreflightError(f"--input takes {len(inside)} file(s) inside --output {output} (e.g. {inside[0]}): "
                             f"earlier outputs would be read back as prompts; give --input the prompts alone")
    plan = RunPlan(job, settings, files, output, new_run_id(), time.time(), Scan())
    if not lock:
        return plan
    check_writable(output)
    try:
        plan.lock = RunLock.acquire(output, plan.run_id)
    except OutputError as e:
        raise PreflightError(str(e)) from None
    try:
        fs.remove(openai_output_path(output))  # rewritten when the job ends (transforms/openai_output.py)
        if job.overwrite:
            removed = _clear(output)
            if removed:
                log.info("jetbeam: --overwrite: removed %d earlier files from %s", removed, output)
        else:
            plan.scan = heal(output)
            why = incompatible(read_manifests(output), job, settings)
            if why:
                raise PreflightError(why)
            if plan.scan.removed_records or plan.scan.removed_tmp:
                log.warning("jetbeam: %s: healed a killed run's leftovers: %d duplicate records, %d partial pieces",
                            output, plan.scan.removed_records, plan.scan.removed_tmp)
        write_manifest(output, plan.run_id, {
            "run_id": plan.run_id, "status": "running", "started": plan.launch_time,
            "host": socket.gethostname(), "pid": os.getpid(), "mode": "overwrite" if job.overwrite else "resume",
            "committed_before": {COMPLETIONS: plan.scan.completions, ERRORS: plan.scan.errors},
            "settings": {**settings.to_flat(), **{k: getattr(job, k) for k in OUTPUT_JOB_OPTIONS}},
            "job": to_mapping(job)})
    except OutputError as e:
        plan.end()
        raise PreflightError(str(e)) from None
    except BaseException:
        plan.end()
        raise
    return plan
