"""What the engine picks for its devices: compute and matrix dtypes, the attention paths, the
cache layout, and the XLA options its programs compile with.

Each choice is a function of the settings and the backend, so `JaxEngine` makes them in its
constructor and `describe()` reports them.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import jax.numpy as jnp

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.quantize import FP8
from engine.settings import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: Optional[str], backend: str):
    """The dtype EngineConfig.dtype names; None: float32 on CPU, bfloat16 on accelerators."""
    if name is not None:
        return DTYPES[name]
    return jnp.float32 if backend == "cpu" else jnp.bfloat16


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> bool:
    """Whether this host's CPU multiplies bf16 matrices in hardware (x86 AMX-BF16 or AVX512-BF16,
    Arm BF16), where XLA's bf16 x bf16 -> f32 dots run several times faster than float32 ones."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return bool({"amx_bf16", "avx512_bf16", "bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def matrix_dtype(name: Optional[str], backend: str, dtype):
    """The dtype EngineConfig.weight_dtype names; None: bfloat16 for float32 compute on a CPU with
    bf16 matrix instructions (half the bytes, dots on its bf16 units; accuracy in BENCHMARKS.md,
    CPU), else the compute dtype. The KV cache stays in the compute dtype: XLA's CPU scatter
    into a bf16 cache is several times slower than the float32 one."""
    if name is not None:
        return DTYPES[name]
    if backend == "cpu" and dtype == jnp.float32 and cpu_has_bf16_matmul():
        return jnp.bfloat16
    return dtype


def choose_attention(config: EngineConfig, cfg: ModelConfig, backend: str, dtype, devices: int,
                     kernel: dict) -> tuple[str, str]:
    """(prefill, decode) attention implementations.

    On NVIDIA GPUs in 16-bit, "auto" takes cuDNN's fused attention: flash attention for
    prefill and, for a 16-bit cache, its decode kernel with per-slot kv lengths (reads only
    the filled cache). An int8 cache goes to our ragged Pallas kernel (engine/kernels),
    which is faster than XLA's masked einsum (BENCHMARKS.md), provided Triton
    compiles it for this model's head shapes; otherwise, and on CPU/TPU, XLA. A paged
    16-bit cache goes to the Pallas kernel too: cuDNN's decode reads no page table.
    """
    if cfg.attn_logit_softcap is not None or cfg.sliding_window is not None:
        return "xla", "xla"  # Gemma 2's soft-cap and local windows: only the XLA path has them
    cudnn_ok = backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    attn = config.attention
    prefill = "cudnn" if cudnn_ok and attn in ("auto", "cudnn", "pallas") else "xla"
    paged = config.kv_page_size > 0

    def misfit() -> str:
        """Why decode_kernel's settings do not fit this model's heads ("" if they do)."""
        from engine.kernels.checks import model_settings_error  # Pallas: imported when asked
        return model_settings_error(cfg, config, devices)

    def pallas_or_xla():
        if backend != "gpu":
            return "xla"
        why = misfit()
        if why:
            log.warning("ragged Pallas decode kernel unavailable (decode_kernel: %s); XLA attention", why)
            return "xla"
        ok = kernel_compiles(cfg, dtype, config.kv_page_size, config.kv_quant_dtype(), kernel)
        return "pallas" if ok else "xla"

    if attn == "auto":
        attn = pallas_or_xla() if config.quantize_kv_cache else ("cudnn" if cudnn_ok else "xla")
    if attn == "cudnn" and config.quantize_kv_cache:
        attn = "xla"  # cuDNN reads 16-bit K/V only
    if attn == "cudnn" and paged:  # cuDNN reads no page table; our kernel does
        attn = pallas_or_xla()
    if attn == "pallas" and config.attention == "pallas":  # asked for: misfits refused
        why = misfit()
        if why:
            raise ConfigError(f"decode_kernel: {why}")
    return prefill, attn


def kernel_compiles(cfg: ModelConfig, dtype, page: int = 0, kv_dtype=None, settings=None) -> bool:
    """Whether the ragged Pallas decode kernel compiles for this model's head shapes (and the
    cache's 8-bit type, default int8, and the `decode_kernel` settings) here."""
    from engine.kernels.checks import compiles_for
    ok, why = compiles_for(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, dtype, page,
                           kv_dtype, **(settings or {}))
    if not ok:
        log.warning("ragged Pallas decode kernel unavailable (%s); 8-bit cache read by XLA", why)
    return ok


def chunked_cache(config: EngineConfig, attention: str, devices: int, backend: str) -> bool:
    """Whether the cache is chunked (engine/kv_chunks.py): "auto" takes it where it pays, on one
    CPU device with XLA attention; "chunks" asks for it where it works."""
    layout = config.kv_layout
    fits = not config.kv_page_size and not config.packed_prefill and attention == "xla" and devices == 1
    if layout == "chunks" and not fits:
        raise ConfigError(f"kv_layout: chunks needs one device and XLA attention; this engine has "
                          f"{devices} device(s) and {attention} attention")
    return layout == "chunks" or (layout == "auto" and fits and backend == "cpu")


def gemm_choice(setting: str, platform: str, w8a8_dtype=None) -> str:
    """"cublas" or "autotune" for EngineConfig.gpu_gemms on `platform`, with the W8A8 8-bit
    type (None: other weights); "autotune" is XLA's default and the only choice off GPUs.

    With fp8 W8A8 weights, XLA's default GEMM autotuning compiles and times many Triton tilings
    of every matmul fusion, up to 90 s a program, and then keeps cuBLASLt's fp8 kernels for the
    decode step all the same. Asking for cuBLAS kernels alone compiles each program in seconds
    at the same speed (BENCHMARKS.md, "Compiling W8A8 programs").
    """
    if platform != "gpu":
        return "autotune"
    if setting == "auto":
        return "cublas" if w8a8_dtype == FP8 else "autotune"
    return setting


def compiler_options(choice: str) -> dict | None:
    """The `jax.jit(compiler_options=...)` of a gemm_choice (None: XLA's defaults)."""
    return {"xla_gpu_enable_triton_gemm": False} if choice == "cublas" else None
