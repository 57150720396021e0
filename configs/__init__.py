"""Model and job configs shipped as data (configs/models/*.json, configs/jobs/*.json)."""

from __future__ import annotations

import json
from importlib import resources


def model_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).joinpath("models").iterdir()
                  if p.name.endswith(".json"))


def load_model_config_dict(name: str) -> dict:
    """The JSON of configs/models/NAME.json; raises KeyError naming the known configs."""
    path = resources.files(__name__).joinpath("models", f"{name}.json")
    if not path.is_file():
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(model_config_names())}")
    return json.loads(path.read_text())
