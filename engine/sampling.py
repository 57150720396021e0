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


def _bisect(lo, hi, pred, iters: int = 32):
    """Per row, the largest x in [lo, hi] with pred(x) true (pred monotone: true, then false)."""
    def body(_, carry):
        lo, hi = carry
        mid = (lo + hi) / 2
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iters, body, (lo, hi))[0]


def _keep_mask(scaled, top_k, top_p):
    """Which tokens survive top-k then top-p, found by bisection on thresholds, not by sorting.

    A sort of the whole vocabulary per slot per step is slow (on CPU it dominated the step);
    32 bisection passes of a masked reduction give the same set up to ties.
    """
    col = lambda x: x[:, None]
    kth = _bisect(scaled.min(-1), scaled.max(-1),
                  lambda t: jnp.sum(scaled >= col(t), -1) >= jnp.maximum(top_k, 1))
    keep = jnp.where(col(top_k > 0), scaled >= col(kth), True)
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    tau = _bisect(jnp.zeros_like(top_p), probs.max(-1),
                  lambda t: jnp.sum(jnp.where(probs >= col(t), probs, 0.0), -1) >= top_p)
    return keep & jnp.where(col(top_p < 1), probs >= col(tau), True)


def _draw(scaled, keep, key, step):
    """Gumbel-max over the kept tokens; noise for a slot's n-th token comes from fold_in(key, n)."""
    noise = jax.random.gumbel(jax.random.fold_in(key, step), scaled.shape[-1:], jnp.float32)
    return jnp.argmax(jnp.where(keep, scaled + noise, -jnp.inf))


def sample(logits, s: SlotSampling, step):
    """logits [B, V] float32, per-slot settings, step [B] (tokens generated so far) -> tokens [B].

    All-greedy batches take argmax only. Otherwise each slot draws from its own filtered
    distribution with noise drawn in vocabulary order, so its token does not depend on what
    else shares the batch (or on whether any other slot uses top-k/top-p).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = s.temperature > 0

    def stochastic():
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        filtered = sampling & ((s.top_k > 0) | (s.top_p < 1))
        keep = jax.lax.cond(jnp.any(filtered), lambda: _keep_mask(scaled, s.top_k, s.top_p),
                            lambda: jnp.ones(scaled.shape, bool))
        drawn = jax.vmap(_draw)(scaled, keep, s.key, step).astype(jnp.int32)
        return jnp.where(sampling, drawn, greedy)

    return jax.lax.cond(jnp.any(sampling), stochastic, lambda: greedy)


MAX_LOGPROBS = 20  # top alternatives computed per token when any request asks for logprobs


def token_logprobs(logits, tokens, k: int = MAX_LOGPROBS):
    """The model's log-probabilities (float32 log-softmax of the raw logits: temperature 1,
    before top-k/top-p and any constraint) of `tokens` [B], and the `k` most likely tokens.

    Returns (logprob [B], top_ids [B, k] int32, top_logprobs [B, k])."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(lp, k)
    chosen = jnp.take_along_axis(lp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return chosen, top_ids.astype(jnp.int32), top_lp


def apply_token_mask(logits, mask):
    """Logits [B, V] with the tokens a bitmask [B, ceil(V / 32)] int32 forbids (bit t % 32 of word
    t // 32 clear) pushed to -1e30, so no sampling setting can pick them."""
    b, v = logits.shape
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(b, -1)[:, :v].astype(bool)
    return jnp.where(allowed, logits, -1e30)
