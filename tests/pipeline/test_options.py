"""The job's settings: defaults, then a settings file (--config, or a JetStream model.json as
--model), then the flags given; bad keys and values stop the launcher with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import Settings
from engine.settings import ConfigError
from pipeline.build import make_options
from pipeline.options import JobOptions, job_settings
from tests import REPO


def test_file_then_flags(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"model": "tiny-llama", "batch_size": 4, "flush_rows": 64, "min_refill": 2,
                                "max_tokens": 7, "quantize_kv_cache": "True"}))
    job, s = job_settings(make_options(["--config", str(path), "--batch_size", "6", "--output", "o"]))
    assert (job.flush_rows, job.output, job.config) == (64, "o", str(path))
    assert (s.source.model, s.engine.batch_size, s.scheduler.min_refill, s.sampling.max_tokens) == ("tiny-llama", 6, 2, 7)
    assert s.engine.quantize_kv_cache is True
    job, s = job_settings(make_options(["--model", str(path)]))  # JetStream's spelling of the same
    assert job.flush_rows == 64 and s.engine.batch_size == 4
    assert job_settings(make_options([])) == (JobOptions(), Settings())


@pytest.mark.parametrize("argv,message", [
    (["--config", "{path}", "--model", "{path}"], "--model names a settings file and --config names another"),
    (["--config", "{bad}"], "unknown key 'flush_row' (did you mean 'flush_rows'?)"),
    (["--stop", ""], "invalid sampling parameter: stop: strings must not be empty"),
    (["--num_engines", "0"], "flags: num_engines: must be >= 1, got 0"),
    (["--overwrite", "perhaps"], "flags: overwrite: must be true or false"),
    (["--quantize_weights", "w4"], "flags: quantize_weights: must be one of none, int8, w8a8"),
    (["--skip_existing"], "--skip_existing: runs resume their --output by default"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, argv, message):
    path, bad = tmp_path / "a.json", tmp_path / "bad.json"
    path.write_text('{"batch_size": 4}')
    bad.write_text('{"flush_row": 4}')
    argv = [a.format(path=path, bad=bad) for a in argv]
    with pytest.raises(ConfigError) as e:
        job_settings(make_options(argv))
    assert message in str(e.value)


def test_the_launcher_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_size": 0}')
    proc = subprocess.run([sys.executable, "run_pipeline.py", "--config", str(bad), "--output", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("jetbeam: error:")]
    assert errors == [f"jetbeam: error: {bad}: batch_size: must be >= 1, got 0"], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
