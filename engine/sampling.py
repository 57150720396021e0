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

    def padded_to(self, n: int) -> "SlotSampling":
        """Host-side: these rows followed by greedy ones, n in all."""
        extra = SlotSampling.greedy(n - len(self.temperature))
        return SlotSampling(*(np.concatenate([np.asarray(getattr(self, f)), getattr(extra, f)])
                              for f in ("temperature", "top_k", "top_p", "key")))

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


# Tokens ranked per slot before top-k / top-p are applied: a filter that fits in them (top_k at
# most this, a nucleus inside them) is cut exactly from the ranked list.
FILTER_CANDIDATES = 256


def _bisected_mask(scaled, top_k, top_p):
    """Which tokens survive top-k then top-p, by bisection on thresholds over the whole
    vocabulary (32 passes of a masked reduction each): the fallback of _keep_mask."""
    col = lambda x: x[:, None]
    kth = _bisect(scaled.min(-1), scaled.max(-1),
                  lambda t: jnp.sum(scaled >= col(t), -1) >= jnp.maximum(top_k, 1))
    keep = jnp.where(col(top_k > 0), scaled >= col(kth), True)
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    tau = _bisect(jnp.zeros_like(top_p), probs.max(-1),
                  lambda t: jnp.sum(jnp.where(probs >= col(t), probs, 0.0), -1) >= top_p)
    return keep & jnp.where(col(top_p < 1), probs >= col(tau), True)


def _keep_mask(scaled, top_k, top_p):
    """Which tokens survive top-k then top-p (ties at a cut are kept), never by sorting the
    whole vocabulary.

    The FILTER_CANDIDATES best tokens of each slot are ranked (one top_k); where every slot's
    filter fits in them, each cut is read off that list. Otherwise (a larger top_k, or a nucleus
    reaching past them) the mask comes from bisection over the whole vocabulary, several times
    slower (64 masked reductions).
    """
    c = min(FILTER_CANDIDATES, scaled.shape[-1])
    vals = jax.lax.top_k(scaled, c)[0]  # [B, c], descending
    use_k, use_p = top_k > 0, top_p < 1
    kk = jnp.clip(top_k, 1, c)
    in_k = jnp.where(use_k[:, None], jnp.arange(c)[None, :] < kk[:, None], True)
    # probabilities over the tokens top-k keeps: within the candidates, or the whole vocabulary
    lse = jnp.where(use_k, jax.nn.logsumexp(jnp.where(in_k, vals, -jnp.inf), axis=-1),
                    jax.nn.logsumexp(scaled, axis=-1))
    cum = jnp.cumsum(jnp.where(in_k, jnp.exp(vals - lse[:, None]), 0.0), axis=-1)
    reached = cum >= top_p[:, None]
    last = jnp.argmax(reached, axis=-1)  # the nucleus ends at the first rank reaching top_p
    cut_k = jnp.where(use_k, jnp.take_along_axis(vals, (kk - 1)[:, None], -1)[:, 0], -jnp.inf)
    cut_p = jnp.where(use_p, jnp.take_along_axis(vals, last[:, None], -1)[:, 0], -jnp.inf)
    fits = (top_k <= c) & (~use_p | reached[:, -1] | use_k)
    return jax.lax.cond(jnp.all(fits), lambda: scaled >= jnp.maximum(cut_k, cut_p)[:, None],
                        lambda: _bisected_mask(scaled, top_k, top_p))


def _draw(scaled, keep, key, step):
    """Gumbel-max over the kept tokens; noise for a slot's n-th token comes from fold_in(key, n)."""
    noise = jax.random.gumbel(jax.random.fold_in(key, step), scaled.shape[-1:], jnp.float32)
    return jnp.argmax(jnp.where(keep, scaled + noise, -jnp.inf))


def sample(logits, s: SlotSampling, step, per_slot: bool = False):
    """logits [B, V] float32, per-slot settings, step [B] (tokens generated so far) -> tokens [B].

    All-greedy batches take argmax only. Otherwise each slot draws from its own filtered
    distribution with noise drawn in vocabulary order, so its token does not depend on what
    else shares the batch (or on whether any other slot uses top-k/top-p).
    `per_slot` (static; the CPU engine's choice): draw slot by slot, skipping greedy slots,
    instead of drawing vocabulary-sized noise for every slot at once; the same tokens.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = s.temperature > 0

    def stochastic():
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        filtered = sampling & ((s.top_k > 0) | (s.top_p < 1))
        keep = jax.lax.cond(jnp.any(filtered), lambda: _keep_mask(scaled, s.top_k, s.top_p),
                            lambda: jnp.ones(scaled.shape, bool))
        if per_slot:
            def one(args):
                row, kept, key, n, on, g = args
                return jax.lax.cond(on, lambda: _draw(row, kept, key, n).astype(jnp.int32), lambda: g)
            return jax.lax.map(one, (scaled, keep, s.key, step, sampling, greedy))
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
