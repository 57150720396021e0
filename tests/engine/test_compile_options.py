"""How the engine's programs pick GPU matmul kernels (engine/compile_options.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.compile_options import compiler_options, gemm_choice
from engine.config import make_settings
from engine.llm import load_engine
from engine.quantize import FP8


@pytest.mark.parametrize("setting,platform,w8a8,want", [
    ("auto", "gpu", FP8, "cublas"),            # fp8 W8A8: cuBLASLt, compiled in seconds
    ("auto", "gpu", jnp.int8, "autotune"),     # int8 W8A8: XLA's default
    ("auto", "gpu", None, "autotune"),         # bf16 or weight-only int8: XLA's default
    ("cublas", "gpu", None, "cublas"),
    ("autotune", "gpu", FP8, "autotune"),
    ("cublas", "cpu", FP8, "autotune"),        # off GPUs the option does not apply
    ("auto", "tpu", jnp.int8, "autotune"),
])
def test_gemm_choice(setting, platform, w8a8, want):
    assert gemm_choice(setting, platform, w8a8) == want


def test_cublas_option_is_one_xla_accepts():
    """The option's name is a real XLA compile option in this jaxlib (a misspelt one is refused)."""
    a = jnp.arange(16.0).reshape(4, 4)
    assert compiler_options("autotune") is None
    got = jax.jit(lambda x: x @ x, compiler_options=compiler_options("cublas"))(a)
    np.testing.assert_allclose(got, a @ a)
    with pytest.raises(Exception, match="xla_gpu_enable_triton_gemmz"):
        jax.jit(lambda x: x @ x, compiler_options={"xla_gpu_enable_triton_gemmz": False})(a)


def test_engine_reports_its_choice():
    loaded = load_engine(make_settings("tiny-llama", batch_size=2, max_cache_length=32, context_size=8,
                                       quantize_weights="w8a8", gpu_gemms="cublas"))
    assert loaded.engine.describe()["gpu_gemms"] == "autotune"  # a CPU run keeps XLA's defaults
