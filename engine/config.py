"""Every setting of a run, once, in frozen dataclasses split by concern.

    ModelSource      what the model is: a config name, a checkpoint, a tokenizer
    EngineConfig     how the engine is shaped and quantized: slots, cache, buckets, dtype, devices
    SchedulerConfig  how the batcher fills slots: refill policy, serving order, profiling
    SamplingParams   what a request asks for unless its row says otherwise (engine/request.py)

`Settings` holds one of each. Its keys form one flat namespace (no name is used twice), so a
JetStream-style `model.json`, a job config in configs/jobs/ and the command line all spell a
setting the same way; `Settings.from_flat` splits such a mapping by owner and refuses unknown
keys and bad values with a one-line `ConfigError`. The front ends (`run_pipeline.py`,
`python -m engine.generate`, `engine.convert`, the benchmarks) generate their flags from these
fields (engine/settings.py). A value derived later (an "auto" page pool) makes a new config with
`dataclasses.replace`; nothing is written into a config once it is built.

This module imports neither JAX nor Beam: a launcher checks flags before either loads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from engine.request import SamplingParams
from engine.settings import (ConfigError, add_arguments, check_fields, fields_of, from_mapping, set_flags,
                             read_json_object, setting, to_mapping, unknown_key)

DTYPE_NAMES = ("float32", "bfloat16", "float16")
WEIGHT_MODES = ("none", "int8", "w8a8", "w8a8_int8", "w8a8_fp8")
_WEIGHT_MODE_ALIASES = {True: "int8", False: "none", "true": "int8", "false": "none", "1": "int8", "0": "none",
                        "yes": "int8", "no": "none", "on": "int8", "off": "none"}
PLATFORMS = ("tpu", "gpu", "cpu", "cuda", "rocm")


def _platform_parts(platform: str) -> tuple[Optional[str], Optional[int], Optional[int]]:
    """(backend, devices, devices per engine or None) of a platform string, checked once here."""
    platform = (platform or "auto").strip().lower()
    if platform == "auto":
        return None, None, None
    name, _, count = platform.partition("=")
    if name not in PLATFORMS:
        raise ConfigError(f"platform: must look like 'tpu=8', 'gpu=1', 'gpu=8/2', 'cpu' or 'auto', got {platform!r}")
    if name in ("cuda", "rocm"):
        name = "gpu"
    if not count:
        return name, 1 if name == "cpu" else None, None
    total, _, per = count.partition("/")
    if not total.isdigit() or int(total) < 1 or (per and (not per.isdigit() or int(per) < 1)):
        raise ConfigError(f"platform: bad device count in {platform!r}")
    if per and int(total) % int(per):
        raise ConfigError(f"platform: {platform!r} does not split {total} devices into engines of {per}")
    return name, int(total), int(per) if per else None


def parse_platform(platform: str) -> tuple[Optional[str], Optional[int]]:
    """"tpu=8" -> ("tpu", 8); "cpu" -> ("cpu", 1); "gpu" -> ("gpu", all); "auto" -> (None, all);
    "gpu=8/2" -> ("gpu", 8): the devices of a worker process, whatever their grouping."""
    return _platform_parts(platform)[:2]


def device_groups(platform: str) -> tuple[Optional[int], int]:
    """(devices per engine, engines per worker process): "gpu=8/2" -> (2, 4), data parallel over
    four tensor-parallel engines of two GPUs; "gpu=4" -> (4, 1); "auto" -> (None, 1): one engine
    on every visible device."""
    _, total, per = _platform_parts(platform)
    return (total, 1) if per is None else (per, total // per)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass(frozen=True)
class ModelSource:
    """Which model to serve. With none of these set, the embedded SmolLM2-135M-Instruct."""

    model: Optional[str] = setting(
        None, "A checkpoint directory (Hugging Face, Meta, jetbeam-converted), a .gguf file, a settings "
              ".json (JetStream model.json), or a config name from configs/models (random weights, for "
              "tests and benchmarks); none: the embedded SmolLM2-135M-Instruct")
    checkpoint_path: Optional[str] = setting(
        None, "Checkpoint directory or .gguf file (JetStream's model.json key; --model is the short form)")
    tokenizer_path: Optional[str] = setting(
        None, "A tokenizer file or directory that replaces the checkpoint's")
    param_size: Optional[str] = setting(
        None, "JetStream's model.json size (e.g. 7b): picks configs/models/llama2-<size>.json "
              "when no checkpoint is given")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's shapes, dtypes, quantization and devices: what its compiled programs depend on."""

    batch_size: int = setting(16, "Decode slots: sequences generated concurrently", minimum=1)
    max_cache_length: int = setting(1024, "KV cache tokens per slot: prompt plus completion", minimum=2)
    context_size: int = setting(512, "Longest prompt accepted, in tokens; longer rows become error rows",
                                minimum=1)
    dtype: Optional[str] = setting(None, "Compute dtype; none: bfloat16 on accelerators, float32 on CPU",
                                   choices=DTYPE_NAMES)
    weight_dtype: Optional[str] = setting(
        None, "Dtype of the weight matrices and embedding table that are not 8-bit quantized; dots "
              "multiply in it and accumulate in float32; none: bfloat16 under float32 compute on a "
              "CPU with bf16 matrix instructions (AMX or AVX512-BF16), else the compute dtype",
        choices=DTYPE_NAMES)
    platform: str = setting(
        "auto", "Devices of a worker process: auto, cpu, gpu=N or tpu=N (one engine over N devices, "
                "tensor parallel), or gpu=N/M (N devices, one engine per M of them: N/M engines "
                "serving one stream of rows, data parallel)")
    quantize_weights: str = setting(
        "none", "Weight matrices in 8 bits with per-output-channel scales: int8 = int8 weights, bf16 "
                "math; w8a8 = 8-bit weights and per-token 8-bit activations on 8-bit tensor cores (fp8 "
                "e4m3 on NVIDIA GPUs of compute capability 8.9+, int8 elsewhere); w8a8_int8 / w8a8_fp8 "
                "pick the 8-bit type; the bare flag (or true) means int8",
        choices=WEIGHT_MODES, aliases=_WEIGHT_MODE_ALIASES, flag_const="int8")
    quantize_kv_cache: bool = setting(False, "8-bit KV cache with per-token, per-head scales (kv_cache_dtype)")
    kv_cache_dtype: str = setting(
        "int8", "Element type of a quantized KV cache: int8, or fp8 (e4m3, read by a hardware convert on "
                "NVIDIA GPUs of compute capability 8.9+); needs quantize_kv_cache", choices=("int8", "fp8"))
    min_prefill_bucket: int = setting(16, "Shortest prompt-length bucket compiled for prefill", minimum=1)
    prefill_batch: int = setting(2, "Most prompts prefilled together in one call (2 suits the embedded "
                                    "model on CPU; GPU job configs use 16-32)", minimum=1)
    packed_prefill: int = setting(
        0, "Token budget of a packed prefill call: a refill's prompts back to back in one row of up "
           "to this many tokens (rows in steps of budget/8; engine/packed.py), instead of one call "
           "per length bucket padded to it; at least the longest prefill bucket (0: off)", minimum=0)
    decode_steps: int = setting(8, "Decode steps per host round-trip (one compiled loop)", minimum=1)
    kv_page_size: int = setting(
        0, "Paged KV cache: tokens per page, from one pool shared by the slots (0: one "
           "max_cache_length region per slot)", minimum=0)
    kv_cache_tokens: Union[int, str] = setting(
        0, "Tokens in the page pool (0: batch_size x max_cache_length), or auto: what the device has "
           "free after the weights and the compiled programs' workspace", choices=("auto",), minimum=0)
    kv_layout: str = setting(
        "auto", "Layout of an unpaged KV cache: tokens = [slots, T, kv_heads, head_dim] per layer (what "
                "cuDNN and the Pallas kernel read); chunks = blocks of 128 positions, [slots, kv_heads, 128, "
                "head_dim], which XLA's CPU dots read in place (XLA attention on one device); auto: chunks "
                "on a single CPU device with XLA attention, else tokens", choices=("auto", "tokens", "chunks"))
    attention: str = setting("auto", "Attention implementation; auto picks per device and cache",
                             choices=("auto", "xla", "cudnn", "pallas"))
    decode_kernel: str = setting(
        "", "Settings of the ragged decode kernel as KEY=VALUE,... (block_t, method, num_splits, "
            "num_warps, num_stages, mask_loads, convert, terms, heads; engine/kernels/ragged_decode.py)")
    gpu_gemms: str = setting(
        "auto", "How XLA picks matmul kernels on NVIDIA GPUs: cublas = cuBLAS/cuBLASLt only (a program "
                "compiles in seconds); autotune = XLA also times its Triton GEMM tilings and keeps the "
                "fastest (up to 90 s a program with fp8 weights); auto: cublas for fp8 W8A8 weights, else "
                "autotune", choices=("auto", "cublas", "autotune"))
    fuse_projections: bool = setting(
        True, "One GEMM for q|k|v and one for gate|up (single-device meshes only)")
    random_seed: int = setting(
        0, "Seed of random weights (config-name models) and of the seeds drawn for requests that "
           "give none", minimum=0, maximum=2**32 - 1)
    warmup: Optional[bool] = setting(
        None, "Compile every prefill shape and the decode step at load; none: on accelerators only")
    compilation_cache_dir: Optional[str] = setting(
        None, "Persistent XLA compilation cache; none: $JETBEAM_COMPILATION_CACHE, else "
              "~/.cache/jetbeam/xla; empty: off")

    def __post_init__(self):
        check_fields(self)
        parse_platform(self.platform)
        if self.context_size >= self.max_cache_length:
            raise ConfigError(
                f"context_size: {self.context_size} must be smaller than max_cache_length "
                f"({self.max_cache_length}) so at least one token can be generated")
        if self.kv_page_size and self.max_cache_length % self.kv_page_size:
            raise ConfigError(f"kv_page_size: {self.kv_page_size} must divide max_cache_length "
                              f"({self.max_cache_length})")
        if self.kv_cache_dtype != "int8" and not self.quantize_kv_cache:
            raise ConfigError(f"kv_cache_dtype: {self.kv_cache_dtype} is the type of a quantized KV cache: "
                              "set quantize_kv_cache too")
        if self.kv_layout == "chunks" and self.kv_page_size:
            raise ConfigError("kv_layout: chunks is a layout of an unpaged cache: set kv_page_size 0")
        if self.kv_cache_tokens == "auto" and not self.kv_page_size:
            raise ConfigError("kv_cache_tokens: auto sizes a paged cache: set kv_page_size too")
        if (self.kv_page_size and isinstance(self.kv_cache_tokens, int)
                and 0 < self.kv_cache_tokens < self.kv_page_size):
            raise ConfigError("kv_cache_tokens: must hold at least one page")
        kernel_settings(self.decode_kernel)
        if self.packed_prefill and self.packed_prefill < max(self.prefill_buckets()):
            raise ConfigError(f"packed_prefill: {self.packed_prefill} tokens cannot hold a prompt of the "
                              f"longest prefill bucket ({max(self.prefill_buckets())}); give at least that")
        if self.packed_prefill and self.kv_layout == "chunks":
            raise ConfigError("packed_prefill: writes the cache token by token: use kv_layout tokens or a "
                              "paged cache, not chunks")

    @property
    def num_kv_pages(self) -> int:
        """Pages in the pool of a paged cache (without the trash page); 0 when not paged."""
        if not self.kv_page_size:
            return 0
        if self.kv_cache_tokens == "auto":
            raise ConfigError("kv_cache_tokens: auto is sized from device memory by the engine "
                              "(JaxEngine.init_decode_state, after load_params)")
        return (self.kv_cache_tokens or self.batch_size * self.max_cache_length) // self.kv_page_size

    def kv_quant_dtype(self):
        """The quantized KV cache's element dtype, or None for a cache in the compute dtype."""
        if not self.quantize_kv_cache:
            return None
        import jax.numpy as jnp  # this module stays importable without JAX
        return jnp.float8_e4m3fn if self.kv_cache_dtype == "fp8" else jnp.int8

    def prefill_buckets(self) -> tuple[int, ...]:
        """Power-of-two prompt lengths compiled for prefill, up to context_size."""
        top = next_power_of_two(self.context_size)
        b = min(next_power_of_two(self.min_prefill_bucket), top)
        out = []
        while b <= top:
            out.append(min(b, self.max_cache_length))
            b *= 2
        return tuple(sorted(set(out)))

    def packed_sizes(self) -> tuple[int, ...]:
        """Row lengths of packed prefill calls: multiples of an eighth of packed_prefill (at least
        the shortest bucket) up to packed_prefill, below that powers of two from a sixteenth;
        empty when packing is off. A refill's row then pads at most an eighth of the budget."""
        if not self.packed_prefill:
            return ()
        top, low = self.packed_prefill, min(self.prefill_buckets())
        step = max(top // 8, low)
        out, t = [], max(next_power_of_two(max(1, top // 16)), low)
        while t < step:
            out.append(t)
            t *= 2
        return tuple(out + list(range(step, top, step)) + [top])

    def packed_rows(self) -> int:
        """Prompts one packed call holds: as many of the shortest bucket as the budget fits, at
        least prefill_batch, at most the slots (0 when packing is off)."""
        if not self.packed_prefill:
            return 0
        return min(self.batch_size, max(self.prefill_batch, self.packed_prefill // min(self.prefill_buckets())))

    def prefill_sizes(self) -> tuple[int, ...]:
        """Prompt counts per prefill call: the powers of two below min(prefill_batch, batch_size),
        and that number. A same-bucket group splits into these exactly (7 = 4 + 2 + 1), so no
        call computes padding rows."""
        top = min(self.prefill_batch, self.batch_size)
        sizes, n = [], 1
        while n < top:
            sizes.append(n)
            n *= 2
        return tuple(sizes + [top])


def kernel_settings(text: str) -> tuple[tuple[str, object], ...]:
    """`decode_kernel` text as sorted (key, value) pairs, checked against the kernel's settings."""
    from engine.kernels.settings import parse_setting  # no JAX: the kernel's own setting names
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise ConfigError(f"decode_kernel: {item!r} is not KEY=VALUE")
        try:
            k, v = parse_setting(key, val)
        except ValueError as e:
            raise ConfigError(f"decode_kernel: {e}") from None
        out[k] = v
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SchedulerConfig:
    """How the continuous batcher fills slots (engine/batcher.py). Changing these needs no new
    compilation: a live engine can run under another SchedulerConfig."""

    early_refill: bool = setting(
        True, "Refill a slot as soon as the decode calls already dispatched carry its request to "
              "max_tokens, instead of after its tokens are read")
    min_refill: int = setting(
        1, "Refill free slots only once this many are free (or nothing else decodes): fewer, fuller "
           "prefill calls for length mixes", minimum=1)
    park_free_slots: bool = setting(
        True, "Park free slots that no refill took, so decode stops reading their stale caches")
    schedule: str = setting(
        "longest_first", "Order in which waiting requests take slots: longest max_tokens first within "
                         "each window of schedule_window requests, or as they arrive",
        choices=("longest_first", "arrival"))
    schedule_window: int = setting(4096, "Requests ordered together by schedule=longest_first", minimum=1)
    prefix_caching: bool = setting(
        True, "With a paged KV cache (kv_page_size): a prompt that starts with whole pages of an earlier "
              "prompt reuses their cached K/V and prefills only the rest")
    sync_timing: bool = setting(
        False, "Profiling: wait for the device after every prefill, insert and decode call and add up "
               "their times (gives up the overlap of host and device)")

    def __post_init__(self):
        check_fields(self)


SETTING_CLASSES = {"source": ModelSource, "engine": EngineConfig, "scheduler": SchedulerConfig,
                   "sampling": SamplingParams}
SETTING_TITLES = {"source": "model", "engine": "engine (shapes, quantization, devices)",
                  "scheduler": "scheduler (how decode slots are filled)",
                  "sampling": "sampling defaults (a row's own columns of the same names win)"}


def add_settings_arguments(parser, defaults: Optional[Mapping] = None, skip: tuple = ()) -> None:
    """Every setting as a --flag, grouped by concern; `defaults` replaces some for this front end."""
    for part, kind in SETTING_CLASSES.items():
        add_arguments(parser, kind, title=SETTING_TITLES[part], defaults=defaults, skip=skip)


def settings_flags(namespace, skip: tuple = ()) -> dict:
    """{name: text} of the settings flags given on a command line (less `skip`, the settings a
    front end does not offer: its namespace may use those names for flags of its own)."""
    out = {}
    for kind in SETTING_CLASSES.values():
        out.update(set_flags(namespace, kind))
    return {k: v for k, v in out.items() if k not in skip}


@dataclass(frozen=True)
class Settings:
    """One run's settings, a frozen dataclass per concern."""

    source: ModelSource = field(default_factory=ModelSource)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @staticmethod
    def keys() -> dict[str, str]:
        """{setting name: the concern that owns it}."""
        return {f.name: part for part, cls in SETTING_CLASSES.items() for f in fields_of(cls)}

    @classmethod
    def from_flat(cls, flat: Mapping, where: str = "settings", base: Optional["Settings"] = None) -> "Settings":
        """Settings from one flat mapping (a model.json, a job config, flags), over `base`."""
        if not isinstance(flat, Mapping):
            raise ConfigError(f"{where}: must be a JSON object, got {type(flat).__name__}")
        owner = cls.keys()
        unknown = sorted(k for k in flat if k not in owner)
        if unknown:
            raise unknown_key(where, unknown[0], owner)
        base = base or cls()
        parts = {}
        for part, kind in SETTING_CLASSES.items():
            mine = {k: v for k, v in flat.items() if owner[k] == part}
            parts[part] = from_mapping(kind, mine, where, base=getattr(base, part)) if mine else getattr(base, part)
        return cls(**parts)

    @classmethod
    def from_file(cls, path: str, base: Optional["Settings"] = None) -> "Settings":
        """A JSON settings file (JetStream model.json, configs/jobs/*.json); relative checkpoint
        and tokenizer paths are taken from the file's directory."""
        return cls.from_flat(read_settings_file(path), where=path, base=base)

    def to_flat(self) -> dict:
        out = {}
        for part in SETTING_CLASSES:
            out.update(to_mapping(getattr(self, part)))
        return out

    def replace(self, **flat) -> "Settings":
        """A copy with some settings changed, by flat name (checked like a file's)."""
        return Settings.from_flat(flat, where="settings", base=self)


def read_settings_file(path: str) -> dict:
    """The JSON object of a settings file, with relative paths resolved; ConfigError if unreadable."""
    d = read_json_object(path)
    base = os.path.dirname(os.path.abspath(path))
    for key in ("checkpoint_path", "tokenizer_path"):
        v = d.get(key)
        if isinstance(v, str) and v and not os.path.isabs(v) and "://" not in v:
            d[key] = os.path.join(base, v)
    return d


def make_settings(model: Optional[str] = None, settings: Optional[Settings] = None, **flat) -> Settings:
    """Settings from `--model` (a name, a checkpoint, or a settings .json file), over `settings`,
    with `flat` settings by name on top."""
    settings = settings or Settings()
    if model is not None and model.endswith(".json") and os.path.isfile(model):
        settings = Settings.from_file(model, base=settings)
    elif model is not None:
        flat = {"model": model, **flat}
    return Settings.from_flat(flat, where="settings", base=settings) if flat else settings
