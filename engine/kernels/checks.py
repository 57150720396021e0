"""Whether the ragged decode kernel takes given settings (no compile) or compiles here (a tiny run).

The engine asks both before it picks the Pallas kernel, and preflight asks the first before a
job starts, so a misfit setting is a one-line refusal or an XLA fallback, never a failure in
the middle of a run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.kernels.ragged_decode import ragged_decode_attention


def settings_error(kv_heads: int, group: int, head_dim: int, page: int = 0, quantized: bool = True,
                   kv_dtype=None, **settings) -> str:
    """"" if the kernel takes `settings` (decode_kernel) for these head shapes and this cache
    (8-bit elements of kv_dtype, int8 unless given), else why not, in one line. Only traces
    the kernel (jax.eval_shape, interpret mode): no compile, any platform."""
    s = jax.ShapeDtypeStruct
    b, t = 2, max(256, page)
    kv_dtype = (kv_dtype or jnp.int8) if quantized else jnp.bfloat16
    if page:
        w = t // page
        kv = s((b * w, page, kv_heads, head_dim), kv_dtype)
        sc = s((b * w, kv_heads, page), jnp.float32) if quantized else None
        table = s((b, w), jnp.int32)
    else:
        kv = s((b, t, kv_heads, head_dim), kv_dtype)
        sc = s((b, kv_heads, t), jnp.float32) if quantized else None
        table = None
    q = s((b, kv_heads * group, head_dim), jnp.bfloat16)

    def attend(q, k, v, k_scale, v_scale, lengths, page_table):
        return ragged_decode_attention(q, k, v, k_scale, v_scale, lengths, 1.0,
                                       page_table=page_table, interpret=True, **settings)

    try:
        jax.eval_shape(attend, q, kv, kv, sc, sc, s((b,), jnp.int32), table)
    except (ValueError, TypeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return ""


def model_settings_error(model_config, engine_config, devices: int = 1) -> str:
    """settings_error of engine_config's decode_kernel for model_config's heads and the
    engine's cache, on each device's share of the kv heads when `devices` split them evenly
    (tensor parallelism runs the kernel per device)."""
    from engine.config import kernel_settings
    kv = model_config.num_kv_heads
    if devices > 1 and kv % devices == 0:
        kv //= devices
    return settings_error(kv, model_config.num_heads // model_config.num_kv_heads, model_config.head_dim,
                          engine_config.kv_page_size, engine_config.quantize_kv_cache,
                          engine_config.kv_quant_dtype(), **dict(kernel_settings(engine_config.decode_kernel)))


def compiles_for(kv_heads: int, group: int, head_dim: int, dtype, page: int = 0,
                 kv_dtype=None, **settings) -> tuple[bool, str]:
    """(True, "") if the kernel compiles and runs here for these head shapes (and kernel
    `settings`), else (False, why).

    Runs it once on tiny inputs: 2 slots of 128 tokens, or, paged, the same 256 tokens as pages
    of `page` tokens. A Triton or Pallas version that rejects the kernel is not an error: the
    engine reads the cache with XLA instead."""
    try:
        q = jnp.zeros((2, kv_heads * group, head_dim), dtype)
        rows, t, table = 2, 128, None
        if page:
            rows, t = max(1, 256 // page), page
            table = jnp.arange(rows, dtype=jnp.int32).reshape(2, -1) if rows > 1 else jnp.zeros((2, 1), jnp.int32)
        k = jnp.zeros((rows, t, kv_heads, head_dim), kv_dtype or jnp.int8)
        s = jnp.ones((rows, kv_heads, t), jnp.float32)  # scales [B or pages, Hkv, T or page]
        out = ragged_decode_attention(q, k, k, s, s, jnp.array([1, 100], jnp.int32), head_dim ** -0.5,
                                      page_table=table, **settings)
        jax.block_until_ready(out)
        return True, ""
    except Exception as e:  # noqa: BLE001  (any rejection means: not here)
        return False, f"{type(e).__name__}: {str(e)[:200]}"
