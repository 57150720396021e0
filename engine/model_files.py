"""What a ModelSource names, read without loading a weight: the checkpoint (headers only), the
ModelConfig and the tokenizer.

`load_tokenizer_for` is the one place that decides which tokenizer a model is served with; the
engine (`LLM`, through `resolve_model`) and the Beam validate step, which tokenizes rows before
any engine exists, both call it. This module imports neither JAX nor Beam.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

from engine.config import ModelSource, Settings
from engine.model_config import ModelConfig
from engine.settings import ConfigError

log = logging.getLogger(__name__)


def locate_model(source: ModelSource) -> tuple[Optional[str], Optional[str]]:
    """(checkpoint path, config name): exactly one is set. A `model` that is a path or a .gguf file
    is a checkpoint; another `model` (or `param_size`) names a config in configs/models; nothing
    set is the embedded SmolLM2 default's file."""
    path, name = source.checkpoint_path, None
    model = source.model
    if path is None and model is not None:
        if os.path.exists(model) or "/" in model or model.endswith(".gguf"):
            path = model
        else:
            name = model
    if path is None and name is None:
        if source.param_size:
            name = f"llama2-{source.param_size.lower()}"
        else:
            from engine.default_model import default_model_path
            path = default_model_path()
    return path, name


def load_tokenizer_for(settings: Union[Settings, ModelSource], checkpoint=None):
    """The tokenizer `settings` serve with, no weight read: `tokenizer_path` if set, else the
    checkpoint's own (a GGUF file carries it in its metadata; HF, Meta and converted directories
    hold tokenizer files), else None (a config name: token-id prompts only). `checkpoint` is the
    source's checkpoint when the caller has it open already."""
    from engine.tokenizer import load_tokenizer
    source = settings.source if isinstance(settings, Settings) else settings
    if source.tokenizer_path:
        return load_tokenizer(source.tokenizer_path)
    if checkpoint is None:
        path, _ = locate_model(source)
        if path is None:
            return None
        from engine.loaders import open_checkpoint
        checkpoint = open_checkpoint(path)
    return checkpoint.tokenizer


def resolve_model(source: ModelSource):
    """(ModelConfig, Checkpoint | None, Tokenizer | None, display name) of a ModelSource.

    A checkpoint is opened (headers checked, no weight read: `Checkpoint.tensors()` reads them);
    a config name from configs/models (or `param_size`) gives random weights, for benchmarks and
    tests; nothing set gives the embedded SmolLM2 default.
    """
    import configs
    path, name = locate_model(source)
    if path is not None:
        from engine.loaders import open_checkpoint
        ckpt = open_checkpoint(path)
        shown = os.path.basename(os.path.normpath(ckpt.source or path))
        return ckpt.config, ckpt, load_tokenizer_for(source, ckpt), shown
    try:
        mc = ModelConfig.from_dict(configs.load_model_config_dict(name))
    except KeyError as e:
        raise ConfigError(f"model: {name!r} is neither a file, a checkpoint directory nor a known "
                          f"config name: {e.args[0]}") from None
    log.warning("model %s: config only, RANDOM weights (use a checkpoint for real output)", name)
    return mc, None, load_tokenizer_for(source), name
