"""Sizing a paged KV cache from device memory: `kv_cache_tokens="auto"`.

A paged pool should hold as many tokens as the device has room for: each extra page is a
request admitted sooner (with a length mix the pool, not the slot count, bounds the job). By
hand that needs the weights' size, the compiled programs'
workspace and the allocator's limit. "auto" takes them from the device instead, as vLLM's
gpu_memory_utilization does: once the weights are loaded, the pool gets the allocator's free
bytes less

- the workspace of the largest prefill call and of a decode call: the temporaries and outputs
  that XLA's memory analysis reports for their compiled programs (a prefill's K/V output lives
  until its insert), and
- a margin of MARGIN_FRACTION of the allocator's limit, for fragmentation and small buffers,

and never more pages than every slot at max_cache_length could use. JAX's allocator limit is
XLA_PYTHON_CLIENT_MEM_FRACTION of the device (75% unless set), so that variable is the knob
that plays gpu_memory_utilization's part. Devices without memory statistics (the CPU) have no
free-memory figure: there "auto" sizes the pool like the contiguous cache,
batch_size * max_cache_length tokens.

A cache sized by hand (a number of pool tokens, or a contiguous cache of batch_size x
max_cache_length) is checked against the same figures before it is allocated (`check_fits`):
one that cannot fit beside the weights is a one-line ConfigError naming the sizes, not an
out-of-memory error from XLA mid-compilation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import jax.numpy as jnp

from engine.model_config import ModelConfig
from engine.settings import ConfigError

log = logging.getLogger(__name__)

# Kept free beyond the measured workspace: allocator fragmentation, sampling keys, host
# transfers' staging buffers, the runtime's own allocations.
MARGIN_FRACTION = 0.04


def cache_bytes_per_token(cfg: ModelConfig, dtype, quantized: bool, kv_shards: int = 1) -> int:
    """Device bytes one cached token takes on each device, over all layers: K and V (int8 or
    `dtype`), plus their float32 scales per KV head when quantized. The cache is split by KV
    head over `kv_shards` devices."""
    per_head = 2 * cfg.head_dim * (1 if quantized else jnp.dtype(dtype).itemsize)
    if quantized:
        per_head += 2 * 4
    heads = cfg.num_kv_heads // kv_shards if cfg.num_kv_heads % kv_shards == 0 else cfg.num_kv_heads
    return cfg.num_layers * heads * per_head


@dataclass
class PoolPlan:
    """How the free device memory was split; `pages` excludes the trash page."""

    pages: int
    page_size: int
    bytes_limit: int
    bytes_in_use: int
    workspace_bytes: int
    margin_bytes: int
    bytes_per_token: int
    capped: bool  # more would fit than every slot at max_cache_length can use

    @property
    def tokens(self) -> int:
        return self.pages * self.page_size

    def describe(self) -> str:
        return (f"KV page pool: {self.pages} pages of {self.page_size} tokens ({self.tokens} tokens, "
                f"{format_size(self.tokens * self.bytes_per_token)}) from a {format_size(self.bytes_limit)} "
                f"allocator limit: {format_size(self.bytes_in_use)} in use (weights), "
                f"{format_size(self.workspace_bytes)} workspace, {format_size(self.margin_bytes)} margin"
                + (" (capped at every slot's max_cache_length)" if self.capped else ""))


def room(memory_stats: dict) -> tuple[int, int, int]:
    """(allocator limit, bytes in use, bytes left after them and the margin) of a device's
    memory statistics, which must hold "bytes_limit"."""
    limit, in_use = int(memory_stats["bytes_limit"]), int(memory_stats.get("bytes_in_use", 0))
    return limit, in_use, limit - in_use - int(MARGIN_FRACTION * limit)


def format_size(n: int) -> str:
    """Bytes as GiB (or MiB below one GiB), as the memory messages print them."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_pool(bytes_limit: int, bytes_in_use: int, workspace_bytes: int, bytes_per_token: int,
              page_size: int, max_pages: int, min_pages: int) -> PoolPlan:
    """Pages for the pool (plus one trash page, which is counted here too) in what is left.

    Raises ValueError when fewer than `min_pages` fit (one request of max_cache_length
    tokens): the weights and workspace leave too little room for a useful cache."""
    margin = int(MARGIN_FRACTION * bytes_limit)
    left = bytes_limit - bytes_in_use - workspace_bytes - margin
    per_page = bytes_per_token * page_size
    fit = max(0, left // per_page - 1)  # one page is the trash page
    pages = min(fit, max_pages)
    if pages < min_pages:
        raise ValueError(
            f"kv_cache_tokens=auto: only {fit} KV pages of {page_size} tokens fit "
            f"({format_size(max(left, 0))} left of a {format_size(bytes_limit)} allocator limit after "
            f"{format_size(bytes_in_use)} in use and {format_size(workspace_bytes)} of workspace); one "
            f"request of max_cache_length needs {min_pages}. Use fewer slots or prefill rows, quantize "
            f"(int8 weights or KV cache), raise XLA_PYTHON_CLIENT_MEM_FRACTION, or shard over more devices")
    return PoolPlan(int(pages), page_size, int(bytes_limit), int(bytes_in_use), int(workspace_bytes),
                    margin, int(bytes_per_token), capped=fit > max_pages)


def compiled_workspace(compiled) -> int:
    """Bytes a compiled program needs beyond its arguments: temporaries and outputs, less the
    outputs that alias donated arguments (an in-place cache update allocates nothing new)."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def size_pool(engine, memory_stats: dict) -> tuple[int, Optional[PoolPlan]]:
    """(tokens, PoolPlan) for a JaxEngine's kv_cache_tokens="auto". Without a "bytes_limit" in
    `memory_stats` (the CPU) the pool holds batch_size * max_cache_length tokens and the plan
    is None."""
    cfg = engine.config
    pages_per_slot = cfg.max_cache_length // cfg.kv_page_size
    full = cfg.batch_size * pages_per_slot
    if "bytes_limit" not in memory_stats:
        log.warning("kv_cache_tokens=auto: the %s device reports no memory statistics; the page pool "
                    "holds batch_size x max_cache_length tokens", engine.mesh.devices.flat[0].platform)
        return full * cfg.kv_page_size, None
    per_token = cache_bytes_per_token(engine.model_config, engine.dtype, cfg.quantize_kv_cache,
                                      kv_shards=engine.mesh.size)
    plan = plan_pool(int(memory_stats["bytes_limit"]), int(memory_stats["bytes_in_use"]),
                     engine.workspace_bytes(), per_token, cfg.kv_page_size, max_pages=full,
                     min_pages=pages_per_slot)
    log.info(plan.describe())
    return plan.tokens, plan


def check_fits(engine, memory_stats: dict) -> None:
    """ConfigError when the KV cache a JaxEngine's settings ask for is larger than what the
    allocator's limit leaves after the bytes in use (the loaded weights) and the margin. The
    programs' workspace comes on top, so passing this check is necessary, not sufficient.
    Devices without memory statistics (the CPU) are not checked."""
    if "bytes_limit" not in memory_stats:
        return
    cfg = engine.config
    per_token = cache_bytes_per_token(engine.model_config, engine.dtype, cfg.quantize_kv_cache,
                                      kv_shards=engine.mesh.size)
    if cfg.kv_page_size:
        tokens = (engine.geometry.num_kv_pages + 1) * cfg.kv_page_size  # with the trash page
        what = f"kv_cache_tokens {cfg.kv_cache_tokens}"
        fix = "kv_cache_tokens=auto (the pool that fits) or fewer tokens"
    else:
        tokens = cfg.batch_size * cfg.max_cache_length
        what = f"batch_size {cfg.batch_size} x max_cache_length {cfg.max_cache_length}"
        fix = "fewer slots, a shorter max_cache_length, or a paged cache with kv_cache_tokens=auto"
    need = tokens * per_token
    limit, in_use, left = room(memory_stats)
    if need > left:
        raise ConfigError(
            f"{what}: the KV cache needs {format_size(need)} of device memory, but "
            f"{format_size(max(left, 0))} is left of the {format_size(limit)} JAX may use after "
            f"{format_size(in_use)} in use (weights) and a {MARGIN_FRACTION:.0%} margin. Use {fix}, "
            f"{'' if cfg.quantize_kv_cache else 'quantize_kv_cache, '}or raise XLA_PYTHON_CLIENT_MEM_FRACTION "
            f"(JAX takes 75% of the device unless it is set)")
