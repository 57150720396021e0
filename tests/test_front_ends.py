"""Every front end's --help states the defaults its run uses: the flags are generated from the
settings dataclasses (engine/config.py, pipeline/options.py), and a run given no flags ends up
with exactly the values its help prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from engine.config import SETTING_CLASSES, Settings
from engine.settings import fields_of, flag_help_defaults, shown_value
from tests import REPO


def _run_values(settings: Settings, job=None) -> dict:
    """{name: value as help prints it} of every setting a run holds."""
    parts = [getattr(settings, part) for part in SETTING_CLASSES] + ([job] if job is not None else [])
    return {f.name: shown_value(getattr(p, f.name)) for p in parts for f in fields_of(type(p))}


def _check(helped: dict, used: dict, derived=()):
    setting_names = set(Settings.keys())
    assert setting_names & set(helped), "no settings flags in this front end"
    for name, text in helped.items():
        if name in used and name not in derived:
            assert text == used[name], f"--{name}: help says {text!r}, a run uses {used[name]!r}"


def test_pipeline_help_states_what_a_run_uses():
    import argparse

    from pipeline.build import make_options
    from pipeline.options import JetbeamOptions, JobOptions, job_settings
    parser = argparse.ArgumentParser()
    JetbeamOptions._add_argparse_args(parser)
    helped = flag_help_defaults(parser)
    job, settings = job_settings(make_options([]))
    assert job == JobOptions() and settings == Settings()
    used = _run_values(settings, job)
    assert set(helped) == set(used)  # every setting and job option is a flag, and nothing else
    _check(helped, used)


def test_run_pipeline_help_output_prints_those_defaults():
    """The text `python run_pipeline.py --help` prints, one flag a line (a wide terminal)."""
    env = dict(os.environ, COLUMNS="3000")
    res = subprocess.run([sys.executable, "run_pipeline.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    printed, flag = {}, None
    for line in res.stdout.splitlines():  # a flag's help is on its line or the next one
        m = re.match(r"\s+--(\w+)\b", line)
        if m:
            flag = m.group(1)
        d = re.search(r"\(default: (.*)\)\s*$", line)
        if d and flag:
            printed[flag] = d.group(1)
    from pipeline.options import JobOptions
    used = _run_values(Settings(), JobOptions())
    assert set(printed) == set(used)
    _check(printed, used)


def test_engine_generate_help_states_what_a_run_uses():
    from engine.generate import build_parser, settings_from_args
    parser = build_parser()
    settings = settings_from_args(parser.parse_args(["--input", "x", "--output", "y"]))
    assert settings == Settings()
    helped = flag_help_defaults(parser)
    assert set(Settings.keys()) <= set(helped)
    _check(helped, _run_values(settings))


def test_convert_quantize_flag_is_the_engine_setting():
    from engine.config import EngineConfig
    from engine.convert import build_parser
    helped = flag_help_defaults(build_parser())
    assert helped["quantize_weights"] == shown_value(EngineConfig().quantize_weights)
    field = {f.name: f for f in fields_of(EngineConfig)}["quantize_weights"]
    assert field.metadata["help"] in " ".join(build_parser().format_help().split())


def test_benchmark_help_states_what_a_run_uses():
    from benchmarks import decode_step, pipeline_e2e, profile_step, throughput
    args = throughput.parse_args([])
    ins, outs = throughput.make_lengths(args)
    used = _run_values(throughput.settings_for(args, ins, outs))
    # pipeline_e2e resolves its own flags through the same function, to the same settings.
    assert _run_values(throughput.settings_for(pipeline_e2e.build_parser().parse_args([]), ins, outs)) == used
    for parser in (throughput.build_parser(), pipeline_e2e.build_parser()):
        helped = flag_help_defaults(parser)
        _check(helped, used, derived=(*throughput.DERIVED, *throughput.SAMPLING))
        for name in throughput.DERIVED:
            assert helped[name] == throughput.DERIVED[name]
    shape = _run_values(decode_step.shape_settings(decode_step.build_parser().parse_args([])))
    for parser in (decode_step.build_parser(), profile_step.build_parser()):
        _check(flag_help_defaults(parser), shape, derived=decode_step._skipped())
    # The benchmark's own defaults are the only ones that differ from the dataclasses'.
    base = _run_values(Settings())
    assert {k for k in used if used[k] != base[k]} - set(throughput.DERIVED) == \
        {k for k, v in throughput.BENCH_DEFAULTS.items() if shown_value(v) != base[k]}
    assert np.array_equal(ins, np.full(1000, 256))


def test_every_setting_class_is_reachable_from_each_product_front_end():
    from engine.generate import build_parser
    helped = flag_help_defaults(build_parser())
    for cls in SETTING_CLASSES.values():
        assert {f.name for f in fields_of(cls)} <= set(helped), cls.__name__
