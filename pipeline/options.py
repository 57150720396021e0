"""The batch job's settings and its command line (`python run_pipeline.py --help`).

`JobOptions` holds what only the pipeline has (inputs, outputs, sharding, flushing); the model,
engine, scheduler and sampling settings are engine/config.py's `Settings`. Every flag is
generated from those dataclasses, so `--help` states the defaults a run uses. A settings file
(`--config`, or `--model` naming a .json: a JetStream model.json or configs/jobs/*.json) is read
first; flags given on the command line override it.

`JetbeamOptions` is an ordinary Beam `PipelineOptions` view, so the same flags work for every
runner (the local FnApiRunner, Dataflow, Flink, ...) next to Beam's own flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from engine.config import Settings, add_settings_arguments, device_groups, read_settings_file, settings_flags
from engine.settings import (ConfigError, add_arguments, check_fields, fields_of, from_mapping, set_flags, setting,
                             unknown_key)

# The shipped sample prompts: what a run with no flags serves.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(REPO_ROOT, "data", "prompts.jsonl")

# A runner that needs no network: Beam's DirectRunner first tries the Prism runner, which
# downloads a Go binary from GitHub. The FnApiRunner is what DirectRunner falls back to for
# batch jobs, and it honours --direct_num_workers / --direct_running_mode.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


@dataclass(frozen=True)
class JobOptions:
    """What the pipeline reads and writes, and how it spreads rows over engines."""

    input: str = setting(
        DEFAULT_INPUT, "Files, globs or directories (comma-separated) of Parquet (*.parquet) or JSONL (*.jsonl, "
                       "*.json, *.ndjson, OpenAI batch files; also .gz, .bz2, .xz, .zst) inputs, local or gs://; a "
                       "directory is read with its partition folders, skipping _* and .* names and jetbeam outputs; "
                       "the default is the sample prompts in data/")
    output: str = setting(
        "output", "Output directory, local or gs://: completions-*.parquet, errors-*.jsonl, "
                  "metrics-<run>.json/.csv per run, metrics.json/.csv over every run")
    output_format: str = setting(
        "parquet", "What --output holds: parquet (completions-*.parquet, errors-*.jsonl, metrics), or openai: "
                   "those plus openai-batch-output.jsonl, OpenAI's batch output file for the rows of OpenAI "
                   "batch input (rewritten from every committed row when the job ends)",
        choices=("parquet", "openai"))
    config: Optional[str] = setting(
        None, "A JSON settings file (JetStream model.json, configs/jobs/*.json); flags override it")
    prompt_column: str = setting(
        "prompt", "Column holding the prompt text (or a list of token ids); rows without it may carry "
                  "'messages' (chat) or 'prompt_token_ids'")
    id_column: str = setting(
        "id", "Column holding a stable row id; rows without one get '<file basename>:<row number>'")
    overwrite: bool = setting(
        False, "Replace what --output holds: its earlier pieces, metrics and run records are removed "
               "before this run writes. Without it a run resumes the directory: it serves only the ids "
               "that have no committed completion or error row yet")
    retry_errors: bool = setting(
        False, "When resuming, serve again the ids whose committed record is an error row (their "
               "error rows are replaced by the new outcome)")
    num_engines: Optional[int] = setting(
        None, "Engine shards: rows are keyed onto this many shards, each served by one resident engine "
              "(one per worker process); none: 1 on local runners, else max(--num_workers, "
              "--max_num_workers, 1)", minimum=1)
    flush_rows: Optional[int] = setting(
        None, "Rows buffered per engine shard before they go to the engine in one continuous-batching "
              "run; none: max(256, 8 x batch_size x engines per process)", minimum=1)
    commit_seconds: float = setting(
        30.0, "Finished rows are committed to --output at least this often (and every flush_rows "
              "rows): a killed job loses at most the rows in flight", minimum=0)
    flush_seconds: float = setting(
        30.0, "A shard's buffer is also flushed this many seconds after its first row arrived; < 0 "
              "disables (Beam's local runner flushes when the bundle is done)")

    def __post_init__(self):
        check_fields(self)

    def rows_per_flush(self, settings: Settings) -> int:
        """--flush_rows, or enough rows for 8 waves of the decode slots of every engine of the
        process (platform "gpu=N/M": N/M engines), at least 256."""
        if self.flush_rows is not None:
            return self.flush_rows
        engines = device_groups(settings.engine.platform)[1]
        return max(256, 8 * settings.engine.batch_size * engines)


class JetbeamOptions(PipelineOptions):
    """Every jetbeam flag: JobOptions and Settings, generated from their fields."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_arguments(parser, JobOptions, title="input / output")
        add_settings_arguments(parser)


def job_settings(options: PipelineOptions) -> tuple[JobOptions, Settings]:
    """The job's (JobOptions, Settings): defaults, then the settings file, then the flags given.

    Bad keys and values raise ConfigError, one line naming the flag or the file's key."""
    view = options.view_as(JetbeamOptions)
    job_flags = set_flags(view, JobOptions)
    flags = settings_flags(view)
    path = job_flags.get("config")
    model = flags.get("model")
    if model and model.endswith(".json") and os.path.isfile(model):  # JetStream's --model model.json
        if path:
            raise ConfigError("--model names a settings file and --config names another: give one")
        path = flags.pop("model")
        job_flags["config"] = path
    file_job, file_settings = {}, {}
    if path:
        owner = Settings.keys()
        job_keys = {f.name for f in fields_of(JobOptions)} - {"config"}
        for k, v in read_settings_file(path).items():
            if k not in job_keys and k not in owner:
                raise unknown_key(path, k, job_keys | set(owner))
            (file_job if k in job_keys else file_settings)[k] = v
    settings = Settings.from_flat(file_settings, where=path or "settings")
    settings = Settings.from_flat(flags, where="flags", base=settings)
    job = from_mapping(JobOptions, file_job, where=path or "settings")
    job = from_mapping(JobOptions, job_flags, where="flags", base=job)
    return job, settings


RENAMED_FLAGS = {"skip_existing": "runs resume their --output by default now (--overwrite replaces it instead), "
                                  "so --skip_existing is not needed"}


def beam_parser():
    """One parser holding every registered PipelineOptions view's flags, as Beam collects them."""
    from apache_beam.options import pipeline_options as po
    parser = po._BeamArgumentParser(prog="run_pipeline.py", allow_abbrev=False)
    for cls in {str(c): c for c in po.PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def check_known_flags(argv: list) -> None:
    """ConfigError naming the first flag no view knows (Beam would drop it with a warning)."""
    import difflib
    parser = beam_parser()
    _, unknown = parser.parse_known_args(list(argv))
    known = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for arg in unknown:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name is None:
            raise ConfigError(f"unexpected argument {arg!r} (flags look like --name=value)")
        if name in RENAMED_FLAGS:
            raise ConfigError(f"--{name}: {RENAMED_FLAGS[name]}")
        near = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(f"unknown flag --{name}" + (f" (did you mean --{near[0]}?)" if near else ""))
