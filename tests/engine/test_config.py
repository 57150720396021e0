"""Settings (engine/config.py): JetStream's model.json and the shipped configs load into the same
frozen dataclasses, bad keys and values are one-line errors naming the key, and every setting is
declared once."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest

import configs
from engine.config import (SETTING_CLASSES, EngineConfig, ModelSource, SchedulerConfig, Settings, make_settings,
                           parse_platform)
from engine.model_config import ModelConfig
from engine.request import SamplingParams
from engine.settings import ConfigError, fields_of, from_mapping


def test_jetstream_model_json(tmp_path):
    """The model.json JetStream's Triton backend used, booleans as strings, relative paths resolved."""
    doc = {"checkpoint_path": "jet-llama2-7b/model.safetensors", "tokenizer_path": "/data/tokenizer.model",
           "param_size": "7b", "batch_size": 40, "max_cache_length": 2408, "quantize_weights": "True",
           "quantize_kv_cache": "False", "context_size": 1024, "platform": "tpu=8"}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc))
    s = Settings.from_file(str(path))
    ec = s.engine
    assert ec.quantize_weights == "int8" and ec.quantize_kv_cache is False  # JetStream's "True": int8
    assert ec.batch_size == 40 and ec.max_cache_length == 2408 and ec.context_size == 1024
    assert s.source.checkpoint_path == str(tmp_path / "jet-llama2-7b/model.safetensors")
    assert s.source.tokenizer_path == "/data/tokenizer.model" and s.source.param_size == "7b"
    assert ec.prefill_buckets() == (16, 32, 64, 128, 256, 512, 1024)
    assert make_settings(str(path), batch_size=8).engine.batch_size == 8  # --model model.json, flags over it


@pytest.mark.parametrize("bad,message", [
    ({"batch_size": 0}, "settings: batch_size: must be >= 1, got 0"),
    ({"batch_size": "eight"}, "settings: batch_size: must be an integer, got 'eight'"),
    ({"context_size": 512, "max_cache_length": 512}, "settings: context_size: 512 must be smaller than max_cache_length"),
    ({"quantize_weights": "maybe"}, "settings: quantize_weights: must be one of none, int8, w8a8, w8a8_int8, "
                                    "w8a8_fp8; got 'maybe'"),
    ({"dtype": "int4"}, "settings: dtype: must be one of float32, bfloat16, float16; got 'int4'"),
    ({"schedule": "random"}, "settings: schedule: must be one of longest_first, arrival"),
    ({"kv_cache_tokens": "lots"}, "settings: kv_cache_tokens: must be one of auto"),
    ({"kv_cache_tokens": "auto"}, "settings: kv_cache_tokens: auto sizes a paged cache: set kv_page_size too"),
    ({"platform": "fpga=2"}, "settings: platform: must look like"),
    ({"top_p": 0}, "invalid sampling parameter: top_p: must be in (0, 1]"),
    ({"seed": 2**64}, "invalid sampling parameter: seed: must be <= 18446744073709551615"),
    ({"stop": [""]}, "invalid sampling parameter: stop: strings must not be empty"),
    ({"nonsense": 1}, "settings: unknown key 'nonsense' (known: "),
    ({"min_refil": 2}, "settings: unknown key 'min_refil' (did you mean 'min_refill'?)"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(bad, message):
    with pytest.raises(ConfigError) as e:
        Settings.from_flat(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_file_names_the_file(tmp_path):
    path = tmp_path / "job.json"
    path.write_text('{"batch_size": 8, "min_refil": 2}')
    with pytest.raises(ConfigError, match=f"^{path}: unknown key 'min_refil'"):
        Settings.from_file(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        Settings.from_file(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_file(str(tmp_path / "missing.json"))


def test_every_setting_is_declared_once_with_help():
    """One flat namespace: no setting name in two concerns, each with a help line, defaults valid."""
    names = [f.name for cls in SETTING_CLASSES.values() for f in fields_of(cls)]
    assert len(names) == len(set(names)) == len(Settings.keys())
    for cls in SETTING_CLASSES.values():
        assert len(fields_of(cls)) == len(dataclasses.fields(cls))  # every field is a setting
        assert all(f.metadata["help"] and "\n" not in f.metadata["help"] for f in fields_of(cls))
        cls()  # the defaults pass their own checks
    assert Settings().to_flat() == Settings.from_flat(Settings().to_flat()).to_flat()


def test_configs_are_frozen_and_derived_values_make_new_ones():
    s = Settings()
    for part in (s, s.source, s.engine, s.scheduler, s.sampling):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, dataclasses.fields(part)[0].name, None)
    t = s.replace(batch_size=8, min_refill="4", max_tokens=5)
    assert (t.engine.batch_size, t.scheduler.min_refill, t.sampling.max_tokens) == (8, 4, 5)
    assert s.engine.batch_size == EngineConfig().batch_size  # the original is unchanged
    assert from_mapping(SchedulerConfig, {"schedule": "arrival"}).schedule == "arrival"
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        dataclasses.replace(s.engine, batch_size=0)  # replace checks again


def test_values_set_from_python_are_held_to_the_same_rules():
    with pytest.raises(ConfigError, match="batch_size: must be an integer"):
        EngineConfig(batch_size="8")
    with pytest.raises(ConfigError, match="early_refill: must be true or false"):
        SchedulerConfig(early_refill=1)
    with pytest.raises(ValueError, match="max_tokens: must be >= 1"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(stop="###").stop == ("###",)


def test_every_shipped_config_loads():
    for name in configs.model_config_names():
        cfg = ModelConfig.from_dict(configs.load_model_config_dict(name))
        assert cfg.name == name
    assert ModelConfig.from_dict(configs.load_model_config_dict("llama2-7b")).param_count() == 6_738_415_616
    with pytest.raises(KeyError, match="known"):
        configs.load_model_config_dict("llama9-1t")
    jobs = [j for j in resources.files("configs").joinpath("jobs").iterdir() if j.name.endswith(".json")]
    assert jobs
    for job in jobs:
        s = Settings.from_file(str(job))
        assert s.source.model in configs.model_config_names()


def test_platform_strings():
    assert parse_platform("tpu=8") == ("tpu", 8)
    assert parse_platform("gpu=1") == ("gpu", 1)
    assert parse_platform("cpu") == ("cpu", 1)
    assert parse_platform("auto") == (None, None)
    with pytest.raises(ConfigError, match="platform"):
        parse_platform("fpga=2")


def test_model_source_picks_the_model():
    from engine.llm import resolve_model
    assert resolve_model(ModelSource(model="tiny-llama"))[3] == "tiny-llama"
    assert resolve_model(ModelSource(param_size="7B"))[0].name == "llama2-7b"
    with pytest.raises(ConfigError, match="neither a file, a checkpoint directory nor a known config name"):
        resolve_model(ModelSource(model="no-such-model"))
