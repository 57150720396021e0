"""Device mesh and tensor-parallel layouts.

One mesh axis, "tp", over the devices `platform` names. Attention heads and MLP columns
are split across it (Megatron style: column-parallel wq/wk/wv/w_gate/w_up, row-parallel
wo/w_down) and the KV cache is split by KV head. A dimension that does not divide by the
device count stays replicated, so the same code runs on any number of devices and XLA's
partitioner inserts the collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from engine.config import device_groups, parse_platform
from engine.model_config import ModelConfig

AXIS = "tp"


def make_mesh(platform: str, group: int = 0) -> Mesh:
    """The mesh of one engine: the platform's devices, or with "gpu=N/M" the `group`-th M of them."""
    backend, count = parse_platform(platform)
    try:
        devices = jax.devices(backend) if backend else jax.devices()
    except RuntimeError as e:
        raise ValueError(f"platform {platform!r}: no {backend} devices available ({e})") from None
    if count is not None:
        if count > len(devices):
            raise ValueError(f"platform {platform!r} asks for {count} devices but only {len(devices)} "
                             f"{devices[0].platform} device(s) are visible")
        devices = devices[:count]
    per, groups = device_groups(platform)
    if not 0 <= group < groups:
        raise ValueError(f"platform {platform!r} has {groups} engine group(s), not a group {group}")
    if groups > 1:
        devices = devices[group * per:(group + 1) * per]
    return Mesh(np.array(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _div(n: int, mesh: Mesh) -> bool:
    return n % mesh.shape[AXIS] == 0


def param_spec(name: str, shape: tuple, cfg: ModelConfig, mesh: Mesh) -> P:
    """PartitionSpec for a canonical tensor name (see engine/loaders) of the given shape."""
    leaf = name.split(".")[-1]
    heads_ok = _div(cfg.num_heads, mesh)
    kv_ok = _div(cfg.num_kv_heads, mesh)
    ff_ok = _div(cfg.intermediate_size, mesh)
    if leaf == "wq":
        return P(None, AXIS) if heads_ok else P()
    if leaf in ("wk", "wv"):
        return P(None, AXIS) if kv_ok else P()
    if leaf == "wo":
        return P(AXIS, None) if heads_ok else P()
    if leaf in ("w_gate", "w_up"):
        return P(None, AXIS) if ff_ok else P()
    if leaf == "w_down":
        return P(AXIS, None) if ff_ok else P()
    if leaf == "lm_head":
        return P(None, AXIS) if _div(cfg.vocab_size, mesh) else P()
    if leaf == "embed":
        return P(AXIS, None) if _div(cfg.vocab_size, mesh) else P()
    return P()  # norms


def scale_spec(weight_spec: P) -> P:
    """Per-output-column scales follow the weight's column split."""
    return P(weight_spec[1]) if len(weight_spec) == 2 else P()


def cache_shardings(mesh: Mesh, cfg: ModelConfig, quantized: bool, chunked_length: int = 0):
    """The KV cache's shardings: heads split over the mesh where they divide. `chunked_length`:
    a chunked cache of that many positions (one device: every block replicated)."""
    from engine.kv_cache import KVCache
    from engine.kv_chunks import chunk_sizes
    if chunked_length:
        blocks = [tuple(NamedSharding(mesh, P()) for _ in chunk_sizes(chunked_length))] * cfg.num_layers
        return KVCache(list(blocks), list(blocks), *((list(blocks), list(blocks)) if quantized else ()))
    spec = P(None, None, AXIS, None) if _div(cfg.num_kv_heads, mesh) else P()
    sspec = P(None, AXIS, None) if _div(cfg.num_kv_heads, mesh) else P()
    kv = [NamedSharding(mesh, spec)] * cfg.num_layers
    if not quantized:
        return KVCache(list(kv), list(kv))
    sc = [NamedSharding(mesh, sspec)] * cfg.num_layers
    return KVCache(list(kv), list(kv), list(sc), list(sc))
