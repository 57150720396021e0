"""On-device sampling with per-slot settings: greedy, temperature, top-k, top-p.

Each slot carries its own PRNG key; the noise for a slot's n-th token is drawn from
fold_in(key, n) over that slot's vocabulary alone, so a seeded request samples the same
tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class SlotSampling:
    """Sampling settings for N slots (arrays of shape [N])."""

    temperature: Any  # float32, 0 = greedy
    top_k: Any  # int32, 0 = off
    top_p: Any  # float32, 1 = off
    key: Any  # uint32 [N, 2] raw PRNG keys

    @classmethod
    def from_params(cls, params_list) -> "SlotSampling":
        """Host-side: build arrays from a list of request SamplingParams (seed must be set)."""
        return cls(
            temperature=np.asarray([p.temperature for p in params_list], np.float32),
            top_k=np.asarray([p.top_k for p in params_list], np.int32),
            top_p=np.asarray([p.top_p for p in params_list], np.float32),
            key=np.stack([_raw_key(p.seed) for p in params_list]),
        )

    @classmethod
    def greedy(cls, n: int) -> "SlotSampling":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                   np.zeros((n, 2), np.uint32))


jax.tree_util.register_dataclass(SlotSampling, data_fields=["temperature", "top_k", "top_p", "key"],
                                 meta_fields=[])


def _raw_key(seed: int) -> np.ndarray:
    """The raw threefry key jax.random.PRNGKey(seed) would make, computed on the host (no device call)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def _sample_one(logits, temperature, top_k, top_p, key, step):
    """One slot: logits [V] float32 -> token id."""
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    rank = jnp.arange(v)
    keep = jnp.where(top_k > 0, rank < top_k, True)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    cum_before = jnp.cumsum(probs) - probs
    keep = keep & (cum_before < top_p)  # the top token always stays
    # Noise is drawn in vocabulary order (as in _sample_unfiltered) and then permuted, so a
    # slot draws the same token whichever path the rest of the batch selects.
    noise = jax.random.gumbel(jax.random.fold_in(key, step), (v,), jnp.float32)[order]
    choice = jnp.argmax(jnp.where(keep, sorted_logits + noise, -jnp.inf))
    return order[choice]


def _sample_unfiltered(logits, temperature, key, step):
    """Temperature sampling over the whole vocabulary: Gumbel-max, no sort needed."""
    noise = jax.random.gumbel(jax.random.fold_in(key, step), logits.shape[-1:], jnp.float32)
    return jnp.argmax(logits / jnp.maximum(temperature, 1e-6) + noise)


def sample(logits, s: SlotSampling, step):
    """logits [B, V] float32, per-slot settings, step [B] (tokens generated so far) -> tokens [B].

    Three paths, chosen on device per batch: all greedy (argmax only); sampling without
    top-k/top-p (Gumbel-max, no sort); and the general path (one sort per slot).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = s.temperature > 0
    filtered = sampling & ((s.top_k > 0) | (s.top_p < 1))

    def pick(drawn):
        return jnp.where(sampling, drawn.astype(jnp.int32), greedy)

    def general():
        return pick(jax.vmap(_sample_one)(logits, s.temperature, s.top_k, s.top_p, s.key, step))

    def unfiltered():
        return pick(jax.vmap(_sample_unfiltered)(logits, s.temperature, s.key, step))

    branch = jnp.where(jnp.any(filtered), 2, jnp.where(jnp.any(sampling), 1, 0))
    return jax.lax.switch(branch, [lambda: greedy, unfiltered, general])
