"""`LLM`: the few-line Python entry point (vLLM's offline `LLM.generate`, for our engine).

    from engine.llm import LLM
    from engine.request import Request, SamplingParams
    llm = LLM()                                    # the embedded SmolLM2 default
    for r in llm.generate([Request(id=1, prompt="Hello")]):
        print(r.id, r.completion)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Iterable, Iterator, Optional, Union

import jax

from engine.batcher import ContinuousBatcher
from engine.config import EngineConfig, ModelConfig
from engine.engine import JaxEngine
from engine.request import Request, RequestError, Result, SamplingParams

log = logging.getLogger(__name__)


def resolve_model(model: Optional[str], overrides: dict):
    """Turn `--model` into (EngineConfig, ModelConfig, Checkpoint | None, Tokenizer | None).

    `model` is None (the embedded default), a config name from configs/models (random
    weights: for benchmarks and tests), a JetStream-style model.json, a checkpoint
    directory (HF, Meta, converted) or a .gguf file.
    """
    import configs
    from engine.loaders import open_checkpoint
    from engine.tokenizer import load_tokenizer

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if model and model.endswith(".json") and os.path.isfile(model):
        ec = EngineConfig.from_json(model)
        for k, v in overrides.items():
            setattr(ec, k, v)
        ec.__post_init__()
    else:
        ec = EngineConfig(**overrides)
        if model is None and ec.checkpoint_path is None and ec.model is None and ec.param_size is None:
            from engine.default_model import default_model_path
            ec.checkpoint_path = default_model_path()
        elif model is not None and (os.path.exists(model) or "/" in model or model.endswith(".gguf")):
            ec.checkpoint_path = model
        elif model is not None:
            ec.model = model
    if ec.checkpoint_path:
        ckpt = open_checkpoint(ec.checkpoint_path)
        tokenizer = load_tokenizer(ec.tokenizer_path) if ec.tokenizer_path else ckpt.tokenizer
        return ec, ckpt.config, ckpt, tokenizer
    name = ec.model or (f"llama2-{ec.param_size.lower()}" if ec.param_size else None)
    try:
        mc = ModelConfig.from_dict(configs.load_model_config_dict(name))
    except KeyError as e:
        raise ValueError(
            f"--model {model!r} is neither a file, a checkpoint directory nor a known config name: {e.args[0]}") from None
    log.warning("model %s: config only, RANDOM weights (use a checkpoint for real output)", name)
    return ec, mc, None, load_tokenizer(ec.tokenizer_path)


class LLM:
    """A resident engine with its weights, decode state and batcher; reuse it for many calls."""

    def __init__(self, model: Optional[str] = None, tokenizer=None, **engine_overrides):
        t0 = time.perf_counter()
        self.engine_config, self.model_config, checkpoint, self.tokenizer = resolve_model(model, engine_overrides)
        if tokenizer is not None:  # an explicit Tokenizer object wins over the checkpoint's
            self.tokenizer = tokenizer
        # A short name for output rows: the checkpoint's file or directory name, else the config name.
        source = checkpoint.source if checkpoint is not None and checkpoint.source else None
        enable_compilation_cache(self.engine_config.compilation_cache_dir)
        self.model_name = os.path.basename(os.path.normpath(source)) if source else (model or self.model_config.name)
        self.engine = JaxEngine(self.engine_config, self.model_config, checkpoint)
        self.params = self.engine.load_params()
        self.batcher = ContinuousBatcher(self.engine, self.params, self.tokenizer, seed=self.engine_config.seed)
        warmup = self.engine_config.warmup
        if warmup is None:  # compiling every shape up front pays on accelerators; on CPU, compile lazily
            warmup = self.engine.mesh.devices.flat[0].platform != "cpu"
        if warmup:
            self.batcher.state = self.engine.warmup(self.params, self.batcher.state)
        self.load_time_s = time.perf_counter() - t0

    def validate(self, request: Request) -> None:
        """Raise RequestError(reason) if the request cannot be served."""
        self.batcher.prepare(request)

    def generate(self, requests: Iterable[Union[Request, str]],
                 sampling: Optional[SamplingParams] = None) -> Iterator[Result]:
        """Yield a Result per request as each finishes (completion order, not input order).

        Plain strings become Requests numbered from 0 with `sampling` (or defaults). A request
        that cannot be served yields a Result with `error` set; nothing raises mid-stream.
        """
        return self.batcher.run(_as_request(i, r, sampling) for i, r in enumerate(requests))

    def generate_all(self, requests, sampling: Optional[SamplingParams] = None) -> list[Result]:
        """Like generate, but returns the Results in input order."""
        reqs = [_as_request(i, r, sampling) for i, r in enumerate(requests)]
        out: list = [None] * len(reqs)
        by_id = {}
        for i, r in enumerate(reqs):
            by_id.setdefault(r.id, []).append(i)
        for res in self.generate(reqs):
            out[by_id[res.id].pop(0)] = res
        return out

    def render_chat(self, messages: list[dict]) -> str:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it cannot render chat messages")
        try:
            return self.tokenizer.render_chat(messages)
        except RequestError:
            raise
        except Exception as e:  # template errors are a bad row, not a crash
            raise RequestError(f"cannot render messages with the chat template: {e}") from None

    def device_info(self) -> dict:
        devs = self.engine.mesh.devices.flat
        first = next(iter(devs))
        return {"device_kind": first.device_kind, "platform": first.platform,
                "device_count": int(self.engine.mesh.devices.size)}


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
    """Point JAX's persistent compilation cache at `path` (see EngineConfig.compilation_cache_dir).

    Compiling a 7B model's prefill shapes and decode step takes 25-40 s on an H100; a scheduled
    job that reruns with the same shapes loads them from this cache instead. Returns the
    directory used, or None when off. JAX keeps the first directory set in a process.
    """
    if path is None:
        path = os.environ.get("JETBEAM_COMPILATION_CACHE", os.path.join("~", ".cache", "jetbeam", "xla"))
    if not path:
        return None
    path = os.path.expanduser(path)
    if jax.config.jax_compilation_cache_dir in (None, ""):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:  # a read-only home, say: run without the cache
            log.warning("compilation cache disabled: cannot create %s (%s)", path, e)
            return None
        jax.config.update("jax_compilation_cache_dir", path)
    return jax.config.jax_compilation_cache_dir


def _as_request(index: int, r: Union[Request, str], sampling: Optional[SamplingParams]) -> Request:
    """A Request as given, or a plain prompt string as Request `index` with its own copy of `sampling`."""
    if isinstance(r, Request):
        return r
    return Request(id=index, prompt=r, sampling=dataclasses.replace(sampling or SamplingParams()))
