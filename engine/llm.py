"""`LLM`: the few-line Python entry point (vLLM's offline `LLM.generate`, for our engine).

    from engine.llm import LLM
    from engine.request import Request, SamplingParams
    llm = LLM()                                    # the embedded SmolLM2 default
    llm = LLM("tiny-llama", batch_size=4)          # any setting of engine/config.py by name
    for r in llm.generate([Request(id=1, prompt="Hello")]):
        print(r.id, r.completion)

`load_engine` is the same start-up without the batcher, for code that drives the Engine API
itself (benchmarks of one decode step, tests of the cache layout). `resolve_model` (what a
ModelSource names, no weight read) lives in engine/model_files.py and is importable from here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

from engine.batcher import ContinuousBatcher
from engine.config import EngineConfig, SchedulerConfig, Settings, make_settings
from engine.engine import JaxEngine
from engine.model_config import ModelConfig
from engine.model_files import resolve_model
from engine.request import Request, Result, SamplingParams
from engine.settings import from_mapping

log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    """An engine with its weights and tokenizer, as `load_engine` returns it."""

    engine: JaxEngine
    params: Any
    tokenizer: Any
    model_name: str
    settings: Settings


def load_engine(settings: Settings, device_group: int = 0) -> LoadedEngine:
    """Open the model `settings` names and build a JaxEngine with its weights on the devices
    (with platform "gpu=N/M", on the `device_group`-th M of them)."""
    mc, checkpoint, tokenizer, name = resolve_model(settings.source)
    enable_compilation_cache(settings.engine.compilation_cache_dir)
    engine = JaxEngine(settings.engine, mc, checkpoint, device_group)
    return LoadedEngine(engine, engine.load_params(), tokenizer, name, settings)


class LLM:
    """A resident engine with its weights, decode state and batcher; reuse it for many calls.

    `LLM(model, **settings)`: `model` as `--model` takes it (None: the embedded default) and any
    setting of engine/config.py by name; `settings=` passes a whole Settings instead. The
    `sampling` settings are the defaults of `generate` for plain prompt strings. With platform
    "gpu=N/M" it is the engine of the `device_group`-th M devices (engine/data_parallel.py runs
    one per group)."""

    def __init__(self, model: Optional[str] = None, tokenizer=None, *, settings: Optional[Settings] = None,
                 device_group: int = 0, **flat):
        t0 = time.perf_counter()
        self.settings = make_settings(model, settings, **flat)
        loaded = load_engine(self.settings, device_group)
        self._engine, self._params = loaded.engine, loaded.params
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        self.model_name = loaded.model_name
        self._batcher = ContinuousBatcher(self._engine, self._params, self.tokenizer,
                                          scheduler=self.settings.scheduler, seed=self.settings.engine.random_seed)
        warmup = self.settings.engine.warmup
        if warmup is None:  # compiling every shape up front pays on accelerators; on CPU, compile lazily
            warmup = self._engine.mesh.devices.flat[0].platform != "cpu"
        if warmup:
            self._batcher.warmup()
        self.load_time_s = time.perf_counter() - t0

    # ---- what was built ----
    @property
    def engine_config(self) -> EngineConfig:
        """The engine's config as it runs (an "auto" page pool resolved to its tokens)."""
        return self._engine.config

    @property
    def model_config(self) -> ModelConfig:
        return self._engine.model_config

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return self._batcher.scheduler

    def engine_info(self) -> dict:
        """The engine's choices (attention paths, dtype, page pool) and devices (Engine.describe)."""
        return self._engine.describe()

    def device_info(self) -> dict:
        info = self.engine_info()
        return {k: info[k] for k in ("device_kind", "platform", "device_count")}

    # ---- serving ----
    def validate(self, request: Request) -> None:
        """Raise RequestError(reason) if the request cannot be served."""
        self._batcher.prepare(request)

    def generate(self, requests: Iterable[Union[Request, str]],
                 sampling: Optional[SamplingParams] = None) -> Iterator[Result]:
        """Yield a Result per request as each finishes (completion order, not input order).

        Plain strings become Requests numbered from 0 with `sampling` (default: the settings'
        sampling). A request that cannot be served yields a Result with `error` set; nothing
        raises mid-stream.
        """
        sampling = sampling or self.settings.sampling
        return self._batcher.run(_as_request(i, r, sampling) for i, r in enumerate(requests))

    def generate_all(self, requests, sampling: Optional[SamplingParams] = None) -> list[Result]:
        """Like generate, but returns the Results in input order."""
        return in_input_order(self.generate, requests, sampling or self.settings.sampling)

    def render_chat(self, messages: list[dict]) -> str:
        """Messages rendered with the tokenizer's chat template; RequestError(reason) if they cannot be."""
        from engine.rows import render_messages
        return render_messages(self.tokenizer, messages)

    # ---- scheduling, statistics, profiling ----
    def set_scheduler(self, **changes) -> SchedulerConfig:
        """Serve the next calls under a SchedulerConfig with `changes` (checked like flags; no
        recompilation). Returns the one replaced, to restore it with set_scheduler(**vars)."""
        old = self._batcher.scheduler
        self._batcher.set_scheduler(from_mapping(SchedulerConfig, changes, "set_scheduler", base=old))
        return old

    def stats(self) -> dict:
        """The batcher's counters since the last reset_stats(): scheduling (SCHEDULER_STATS), rows
        completed and refused, tokens, and with sync_timing the seconds per call kind; for a
        paged cache the pool's size and its peak use."""
        out = {k: (round(v, 4) if isinstance(v, float) and not v.is_integer() else int(v))
               for k, v in self._batcher.stats.items()}
        out.update(self._batcher.scheduler_stats())
        return out

    def reset_stats(self, prefix_cache: bool = False) -> None:
        """Zero the counters; with `prefix_cache` also forget every cached prompt page, so the
        next run starts as cold as the first (benchmarks that serve the same prompts twice)."""
        self._batcher.stats.clear()
        if prefix_cache and self._batcher.pages is not None:
            self._batcher.pages.forget_prefixes()
        if self._batcher.pages is not None:
            self._batcher.pages.peak_used = self._batcher.pages.used_pages

    def warmup(self, prefill_shapes=None) -> None:
        """Compile every prefill shape (or the (prompt count, bucket) pairs of `prefill_shapes`),
        the inserts and the decode step now (Engine.warmup)."""
        self._batcher.warmup(prefill_shapes)


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
    """Point JAX's persistent compilation cache at `path` (EngineConfig.compilation_cache_dir).

    Compiling a 7B model's prefill shapes and decode step takes tens of seconds on a GPU; a
    scheduled job that reruns with the same shapes loads them from this cache instead. Returns
    the directory used, or None when off. JAX keeps the first directory set in a process.
    """
    import jax
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
        # Every program, however quick to compile: a job loads its many small ones (prefill
        # shapes, insert, sampling) from the cache faster than XLA compiles them.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return jax.config.jax_compilation_cache_dir


def in_input_order(generate, requests, sampling: SamplingParams) -> list[Result]:
    """`generate`'s Results (completion order) put back in the order of `requests`."""
    reqs = [_as_request(i, r, sampling) for i, r in enumerate(requests)]
    out: list = [None] * len(reqs)
    by_id: dict = {}
    for i, r in enumerate(reqs):
        by_id.setdefault(r.id, []).append(i)
    for res in generate(reqs):
        out[by_id[res.id].pop(0)] = res
    return out


def _as_request(index: int, r: Union[Request, str], sampling: SamplingParams) -> Request:
    """A Request as given, or a plain prompt string as Request `index` with `sampling`."""
    if isinstance(r, Request):
        return r
    return Request(id=index, prompt=r, sampling=sampling)

