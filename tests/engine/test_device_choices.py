"""What the engine picks for its devices (engine/device_choices.py): attention paths, cache layout,
and the matmul kernels its programs compile with on GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import make_settings
from engine.device_choices import chunked_cache, choose_attention, compiler_options, gemm_choice
from engine.llm import load_engine, resolve_model
from engine.quantize import FP8
from engine.settings import ConfigError


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


@pytest.mark.parametrize("model,backend,dtype,kw,want", [
    ("tiny-llama", "gpu", jnp.bfloat16, {}, ("cudnn", "cudnn")),       # 16-bit cache: cuDNN both ways
    ("tiny-llama", "gpu", jnp.float32, {}, ("xla", "xla")),            # cuDNN takes 16-bit only
    ("tiny-llama", "cpu", jnp.float32, {"quantize_kv_cache": True}, ("xla", "xla")),
    ("tiny-llama", "tpu", jnp.bfloat16, {}, ("xla", "xla")),
    ("tiny-gemma2", "gpu", jnp.bfloat16, {}, ("xla", "xla")),          # soft-caps and local windows
])
def test_choose_attention(model, backend, dtype, kw, want):
    s = make_settings(model, batch_size=2, max_cache_length=64, context_size=16, **kw)
    assert choose_attention(s.engine, resolve_model(s.source)[0], backend, dtype, 1, {}) == want


def test_chunked_cache_where_it_works():
    cfg = lambda **kw: make_settings("tiny-llama", max_cache_length=64, context_size=16, **kw).engine  # noqa: E731
    assert chunked_cache(cfg(), "xla", 1, "cpu")
    assert not chunked_cache(cfg(), "xla", 1, "gpu") and not chunked_cache(cfg(), "xla", 2, "cpu")
    assert not chunked_cache(cfg(kv_layout="tokens"), "xla", 1, "cpu")
    with pytest.raises(ConfigError, match="chunks needs one device and XLA attention"):
        chunked_cache(cfg(kv_layout="chunks"), "cudnn", 1, "gpu")
