"""Placing weights on the mesh: from a checkpoint, tensor by tensor, or random (by shape only).

Each tensor is cast, optionally 8-bit quantized on device (engine/quantize.py: weight-only int8
or W8A8), and laid out with its PartitionSpec as it arrives, so host memory holds at most one
tensor at a time. Before the first tensor goes to a device, the weights' size on each device is
checked against what JAX may allocate there (`check_weights_fit`): a model too large for the
device is a one-line ConfigError, not an out-of-memory error halfway through the load.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from engine import sharding as shd
from engine.model_config import ModelConfig
from engine.host_memory import return_freed_memory
from engine.kv_budget import MARGIN_FRACTION, format_size, room
from engine.checkpoint import LAYER_KEYS, POST_NORMS, Checkpoint, CheckpointError, expected_shapes
from engine.settings import ConfigError
from engine.quantize import QuantizedWeight, W8A8Weight, quantize_w8a8, quantize_weight, w8a8_dtype

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")


def _is_matrix(name: str) -> bool:
    return name.split(".")[-1] in MATRICES


def _stored_dtype(name: str, dtype, matrix_dtype):
    """The dtype a tensor is kept in: matrices and the embedding table in `matrix_dtype` (when
    given), norms and everything else in the compute dtype."""
    if matrix_dtype is not None and (_is_matrix(name) or name == "embed"):
        return matrix_dtype
    return dtype


def weight_form(quantize, mesh):
    """(mode, 8-bit dtype) of a quantize_weights value on this mesh: ("none" | "int8", None) or
    ("w8a8", int8 | fp8), the 8-bit type chosen for the mesh's devices."""
    mode = {True: "int8", False: "none", None: "none"}.get(quantize, quantize)
    if str(mode).startswith("w8a8"):
        dev = mesh.devices.flat[0]
        return "w8a8", w8a8_dtype(mode, dev.platform, getattr(dev, "compute_capability", None))
    return mode, None


def _w8a8_shardings(mesh, spec):
    """A W8A8Weight's shardings: the [in, out] spec transposed, scales split like the output."""
    t = shd.P(*reversed(tuple(spec))) if len(spec) == 2 else spec
    return W8A8Weight(NamedSharding(mesh, t), NamedSharding(mesh, shd.scale_spec(spec)))


@functools.lru_cache(maxsize=None)
def _quantizer(q8, spec, mesh):
    """The compiled quantizer of one weight layout (q8: the W8A8 type, or None for int8): one
    per distinct sharding and type, so the layers' same-shaped matrices share its compilations."""
    if q8 is None:
        wsh, ssh = NamedSharding(mesh, spec), NamedSharding(mesh, shd.scale_spec(spec))
        return jax.jit(quantize_weight, out_shardings=QuantizedWeight(wsh, ssh))
    return jax.jit(functools.partial(quantize_w8a8, dtype=q8), out_shardings=_w8a8_shardings(mesh, spec))


def _place(name, value, cfg, mesh, dtype, quantize, matrix_dtype=None):
    """Put one tensor on the mesh in its final form (dtype, or 8-bit values + scales)."""
    dtype = _stored_dtype(name, dtype, matrix_dtype)
    spec = shd.param_spec(name, tuple(value.shape), cfg, mesh)
    wsh = NamedSharding(mesh, spec)
    ssh = NamedSharding(mesh, shd.scale_spec(spec))
    mode, q8 = weight_form(quantize, mesh)
    if mode == "w8a8" and _is_matrix(name):
        f = _quantizer(q8, spec, mesh)
        if isinstance(value, QuantizedWeight):
            return f(QuantizedWeight(jax.device_put(np.asarray(value.q, np.int8), wsh),
                                     jax.device_put(np.asarray(value.scale, np.float32), ssh)))
        return f(jax.device_put(np.asarray(value), wsh))
    quantize = mode == "int8"
    if isinstance(value, QuantizedWeight):
        if quantize:
            return QuantizedWeight(jax.device_put(np.asarray(value.q, np.int8), wsh),
                                   jax.device_put(np.asarray(value.scale, np.float32), ssh))
        deq = np.asarray(value.q, np.float32) * np.asarray(value.scale, np.float32)[None, :]
        return jax.device_put(deq.astype(jnp.dtype(dtype)), wsh)
    if quantize and _is_matrix(name):
        return _quantizer(None, spec, mesh)(jax.device_put(np.asarray(value), wsh))
    host = np.asarray(value)
    if host.dtype != jnp.dtype(dtype):
        host = host.astype(jnp.dtype(dtype))
    return jax.device_put(host, wsh)


def _assemble(cfg: ModelConfig, flat: dict) -> dict:
    params = {"embed": flat["embed"], "final_norm": flat["final_norm"],
              "layers": [{k: flat[f"layers.{i}.{k}"] for k in LAYER_KEYS + (POST_NORMS if cfg.post_norms else ())}
                         for i in range(cfg.num_layers)]}
    if not cfg.tie_embeddings:
        params["lm_head"] = flat["lm_head"]
    return params


def device_bytes(cfg: ModelConfig, mesh, dtype, quantize, matrix_dtype=None) -> int:
    """Bytes the loaded weights take on each device of `mesh`: 8-bit matrices with their float32
    per-output scales, or each tensor in its stored dtype, split as its PartitionSpec splits it."""
    mode, _ = weight_form(quantize, mesh)
    total = 0
    for name, shape in expected_shapes(cfg).items():
        split = 1
        for axes in shd.param_spec(name, shape, cfg, mesh):
            for axis in (axes if isinstance(axes, tuple) else (axes,)):
                split *= mesh.shape[axis] if axis is not None else 1
        if mode != "none" and _is_matrix(name):
            size = math.prod(shape) + 4 * shape[-1]
        else:
            size = math.prod(shape) * jnp.dtype(_stored_dtype(name, dtype, matrix_dtype)).itemsize
        total += size // split
    return total


def check_weights_fit(cfg: ModelConfig, mesh, dtype, quantize, matrix_dtype, memory_stats: dict) -> None:
    """ConfigError when the weights (device_bytes) exceed what the allocator's limit leaves on a
    device after the bytes in use there and the KV budget's margin. Devices without memory
    statistics (the CPU) are not checked."""
    if "bytes_limit" not in memory_stats:
        return
    need = device_bytes(cfg, mesh, dtype, quantize, matrix_dtype)
    limit, in_use, left = room(memory_stats)
    if need > left:
        mode = weight_form(quantize, mesh)[0]
        form = "8-bit" if mode != "none" else jnp.dtype(_stored_dtype("wq", dtype, matrix_dtype)).name
        fixes = ["quantize them (quantize_weights w8a8 or int8)"] if mode == "none" else []
        fixes += ["spread them over more devices (platform gpu=N or tpu=N)",
                  "raise XLA_PYTHON_CLIENT_MEM_FRACTION (JAX takes 75% of the device unless it is set)"]
        advice = ", ".join(fixes[:-1]) + ", or " + fixes[-1]
        raise ConfigError(
            f"model {cfg.name}: its weights ({form} matrices) need {format_size(need)} "
            f"{'on each of its ' + str(mesh.size) + ' devices' if mesh.size > 1 else 'on its device'}, "
            f"but {format_size(max(left, 0))} is left of the {format_size(limit)} "
            f"JAX may use there ({format_size(in_use)} in use, a {MARGIN_FRACTION:.0%} margin). "
            f"{advice[0].upper()}{advice[1:]}")


def load_params(cfg: ModelConfig, checkpoint: Optional[Checkpoint], mesh, dtype, quantize,
                seed: int = 0, matrix_dtype=None) -> dict:
    """The model's params on `mesh`; `quantize` is a quantize_weights mode (or a bool: int8);
    unquantized matrices and the embedding table are kept in `matrix_dtype` (None: `dtype`)."""
    check_weights_fit(cfg, mesh, dtype, quantize, matrix_dtype, mesh.devices.flat[0].memory_stats() or {})
    if checkpoint is None:
        return random_params(cfg, mesh, dtype, quantize, seed, matrix_dtype)
    shapes = expected_shapes(cfg)
    flat = {}
    src = checkpoint.source or "checkpoint"
    for name, value in checkpoint.tensors():
        if name == "lm_head" and cfg.tie_embeddings:
            continue
        if name not in shapes:
            raise CheckpointError(f"{src}: unexpected tensor {name!r}")
        if tuple(value.shape) != shapes[name]:
            raise CheckpointError(f"{src}: tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"expected {shapes[name]} for this config")
        flat[name] = _place(name, value, cfg, mesh, dtype, quantize, matrix_dtype)
    missing = [n for n in shapes if n not in flat]
    if missing:
        raise CheckpointError(f"{src}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return_freed_memory()  # the float32 temporaries of the tensors read
    return _assemble(cfg, flat)


def random_params(cfg: ModelConfig, mesh, dtype, quantize, seed: int = 0, matrix_dtype=None) -> dict:
    """Random weights of the right shapes, made on device (speed depends on shapes, not values).

    One compiled generator per distinct (shape, layout), reused across layers.
    """
    base = jax.random.PRNGKey(seed)
    mode, q8 = weight_form(quantize, mesh)
    makers = {}
    flat = {}
    for name, shape in expected_shapes(cfg).items():
        spec = shd.param_spec(name, shape, cfg, mesh)
        kind = "norm" if name.endswith("norm") else (mode if mode != "none" and _is_matrix(name) else "w")
        std = 0.02 if name == "embed" else shape[0] ** -0.5
        stored = _stored_dtype(name, dtype, matrix_dtype)
        sig = (shape, spec, kind, std, jnp.dtype(stored))
        if sig not in makers:
            makers[sig] = _random_maker(shape, spec, kind, std, mesh, stored,
                                        1.0 - cfg.norm_weight_offset, q8)
        flat[name] = makers[sig](jax.random.fold_in(base, zlib.crc32(name.encode())))
    return _assemble(cfg, flat)


def _random_maker(shape, spec, kind, std, mesh, dtype, norm_fill, q8=None):
    wsh = NamedSharding(mesh, spec)
    if kind == "norm":
        return jax.jit(lambda key: jnp.full(shape, norm_fill, dtype), out_shardings=wsh)

    def make(key):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    if kind == "int8":
        ssh = NamedSharding(mesh, shd.scale_spec(spec))
        return jax.jit(lambda key: quantize_weight(make(key)), out_shardings=QuantizedWeight(wsh, ssh))
    if kind == "w8a8":
        return jax.jit(lambda key: quantize_w8a8(make(key), q8), out_shardings=_w8a8_shardings(mesh, spec))
    return jax.jit(make, out_shardings=wsh)


def add_embed_bits(params: dict) -> dict:
    """Adds "embed_bits": the embedding table's 16-bit patterns, which `engine.model.embed`
    gathers the token rows from.

    Why: XLA's CPU backend gathers rows of a bf16 or f16 table by converting the whole table to
    float32 first; inside the decode loop that conversion is loop-invariant, so XLA hoists it into
    a float32 copy of the table made on every call (113 MB and ~27 ms an 8-step call for
    SmolLM2-135M). A uint16 gather needs no conversion. Costs one more 16-bit copy of the table;
    a no-op for other table dtypes. Changes `params` in place.
    """
    table = params["embed"]
    if jnp.dtype(table.dtype).itemsize == 2 and jnp.issubdtype(table.dtype, jnp.floating):
        to_bits = jax.jit(lambda t: jax.lax.bitcast_convert_type(t, jnp.uint16),
                          out_shardings=getattr(table, "sharding", None))
        params["embed_bits"] = to_bits(table)
    return params


FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_projections(params: dict) -> dict:
    """Concatenate each layer's q|k|v and gate|up matrices along their output columns.

    Why: a decode step at a few hundred rows runs each projection as its own small GEMM, and
    seven small GEMMs a layer take longer than their weight traffic; two larger ones come
    closer to it. `engine.model` splits the outputs again. Works for plain and 8-bit weights
    (their per-output scales concatenate too; a W8A8Weight is stored [out, in]). Only for unsharded weights: a
    column-split mesh would need per-shard interleaving. Changes `params` in place; each
    layer's parts are freed as its fused matrix is built.
    """
    def cat(parts):
        if isinstance(parts[0], W8A8Weight):
            return W8A8Weight(jnp.concatenate([p.q for p in parts], axis=0),
                              jnp.concatenate([p.scale for p in parts]))
        if isinstance(parts[0], QuantizedWeight):
            return QuantizedWeight(jnp.concatenate([p.q for p in parts], axis=1),
                                   jnp.concatenate([p.scale for p in parts]))
        return jnp.concatenate(parts, axis=1)

    for layer in params["layers"]:
        for fused, names in FUSED.items():
            layer[fused] = cat([layer.pop(n) for n in names])
    return params
