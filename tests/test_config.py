"""Engine and model configs: JetStream's model.json fields, config names, platforms, validation."""

from __future__ import annotations

import json
from importlib import resources

import pytest

import configs
from engine.config import EngineConfig, ModelConfig
from engine.sharding import parse_platform


def test_jetstream_model_json(tmp_path):
    """The model.json JetStream's Triton backend used, booleans as strings, relative paths resolved."""
    doc = {"checkpoint_path": "jet-llama2-7b/model.safetensors", "tokenizer_path": "/data/tokenizer.model",
           "param_size": "7b", "batch_size": 40, "max_cache_length": 2408, "quantize_weights": "True",
           "quantize_kv_cache": "False", "context_size": 1024, "platform": "tpu=8"}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc))
    ec = EngineConfig.from_json(str(path))
    assert ec.quantize_weights is True and ec.quantize_kv_cache is False
    assert ec.batch_size == 40 and ec.max_cache_length == 2408 and ec.context_size == 1024
    assert ec.checkpoint_path == str(tmp_path / "jet-llama2-7b/model.safetensors")
    assert ec.tokenizer_path == "/data/tokenizer.model"
    assert ec.prefill_buckets() == [16, 32, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize("bad,match", [
    ({"batch_size": 0}, "batch_size"),
    ({"context_size": 512, "max_cache_length": 512}, "context_size"),
    ({"quantize_weights": "maybe"}, "boolean"),
    ({"dtype": "int4"}, "dtype"),
    ({"nonsense": 1}, "unknown engine config"),
])
def test_engine_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_dict(bad)


def test_every_shipped_config_loads():
    for name in configs.model_config_names():
        cfg = ModelConfig.from_dict(configs.load_model_config_dict(name))
        assert cfg.name == name
    assert ModelConfig.from_dict(configs.load_model_config_dict("llama2-7b")).param_count() == 6_738_415_616
    with pytest.raises(KeyError, match="known"):
        configs.load_model_config_dict("llama9-1t")
    for job in resources.files("configs").joinpath("jobs").iterdir():
        ec = EngineConfig.from_dict(json.loads(job.read_text()))
        assert ec.model in configs.model_config_names()


def test_platform_strings():
    assert parse_platform("tpu=8") == ("tpu", 8)
    assert parse_platform("gpu=1") == ("gpu", 1)
    assert parse_platform("cpu") == ("cpu", 1)
    assert parse_platform("auto") == (None, None)
    with pytest.raises(ValueError):
        parse_platform("fpga=2")
