"""JaxEngine's packed prefill (engine/packed.py): the Engine API's `prefill_packed`, its compiled
program, and the warm-up of every packed size. A mixin of JaxEngine: it reads the engine's model,
settings and jitted programs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from engine.decode_state import Prefix
from engine.engine_api import ResultTokens
from engine.kv_cache import pack_prefix
from engine.model import prefill as model_prefill
from engine.packed import segment_layout
from engine.sampling import SlotSampling, apply_token_mask, sample, token_logprobs


class PackedPrefill:
    """Packed prefill for JaxEngine."""

    def _prefill_packed_impl(self, params, tokens, positions, seg, starts, lengths, sampling, token_mask=None):
        last = jnp.maximum(starts + lengths - 1, 0)
        logits, ks, vs = model_prefill(params, self.model_config, tokens[None], self.dtype, last_index=last,
                                       attn_impl=self.prefill_attention, segments=(positions, seg, starts, lengths),
                                       span=self.buckets[-1])
        masked = logits if token_mask is None else apply_token_mask(logits, token_mask)
        first = sample(masked, sampling, jnp.zeros_like(lengths), self.per_slot_draws)
        prefix = Prefix(pack_prefix(ks, vs, self.config.kv_quant_dtype()), lengths, first, sampling,
                        packed=(seg, positions))
        return prefix, token_logprobs(logits, first)

    def prefill_packed(self, *, params, tokens, lengths, sampling=None, token_mask=None):
        """Engine API: prompts packed in tokens [T] with lengths [packed_rows] (engine/packed.py)."""
        geo = self._geometry
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        lengths = np.asarray(lengths, np.int32).reshape(-1)
        t, m = len(tokens), geo.packed_rows
        if t not in geo.packed_sizes:
            raise ValueError(f"packed row of {t} tokens is not a packed size {geo.packed_sizes}")
        used = lengths > 0
        if len(lengths) != m or (lengths < 0).any() or (used[1:] & ~used[:-1]).any() or not used[0]:
            raise ValueError(f"lengths must be {m} values, the used (> 0) ones first, got {lengths.tolist()}")
        if lengths.sum() > t or lengths.max() > min(self.buckets[-1], self.config.context_size):
            raise ValueError(f"lengths {lengths.tolist()} do not fit a row of {t} or exceed the longest prompt")
        starts, seg, pos = segment_layout(lengths, t)
        if sampling is None:
            sampling = SlotSampling.greedy(m)
        if token_mask is not None:
            token_mask = np.asarray(token_mask, np.int32).reshape(m, -1)
        prefix, (lp, top_ids, top_lp) = self._prefill_packed_jit(params, tokens, pos, seg, starts, lengths,
                                                                  sampling, token_mask)
        self._programs.after_call()
        first = ResultTokens(prefix.first_token[:, None], jnp.asarray(used)[:, None], lengths[:, None],
                             lp[:, None], top_ids[:, None], top_lp[:, None])
        return prefix, first

    def _warm_packed(self, params, decode_state):
        """Compile each packed size's prefill and insert; returns the (donated) state."""
        geo = self._geometry
        lengths = np.zeros(geo.packed_rows, np.int32)
        lengths[0] = 1
        for t in geo.packed_sizes:
            prefix, _ = self.prefill_packed(params=params, tokens=np.zeros(t, np.int32), lengths=lengths)
            decode_state = self.insert(prefix, decode_state, np.full(geo.packed_rows, -1, np.int32))
        return decode_state
