"""XLA compiler options of the engine's programs: how matmul kernels are chosen on NVIDIA GPUs.

With fp8 W8A8 weights, XLA's default GEMM autotuning compiles and times many Triton tilings of
every matmul fusion, up to 90 s a program, and then keeps cuBLASLt's fp8 kernels for the decode
step all the same. Asking for cuBLAS kernels alone compiles each program in seconds at the same
speed (BENCHMARKS.md, "Compiling W8A8 programs"). Other weights keep XLA's default.
"""

from __future__ import annotations

from engine.quantize import FP8


def gemm_choice(setting: str, platform: str, w8a8_dtype=None) -> str:
    """"cublas" or "autotune" for EngineConfig.gpu_gemms on `platform`, with the W8A8 8-bit
    type (None: other weights); "autotune" is XLA's default and the only choice off GPUs."""
    if platform != "gpu":
        return "autotune"
    if setting == "auto":
        return "cublas" if w8a8_dtype == FP8 else "autotune"
    return setting


def compiler_options(choice: str) -> dict | None:
    """The `jax.jit(compiler_options=...)` of a gemm_choice (None: XLA's defaults)."""
    return {"xla_gpu_enable_triton_gemm": False} if choice == "cublas" else None
