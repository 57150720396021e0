"""The JaxEngine's profiling and lowering hooks: its compiled programs lowered (for HLO, XLA's
memory analysis, or `jax.export` to a platform this host lacks, as engine/lower.py does), and a
decode state with every slot filled, for timing one step alone (benchmarks/decode_step.py).

A mixin of JaxEngine: it reads the engine's jitted programs and settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engine.sampling import SlotSampling


def _lower(jitted, platforms, *args):
    if platforms is None:
        return jitted.lower(*args)
    from jax import export
    return export.export(jitted, platforms=tuple(platforms))(*args)


def _i32(*shape):
    """An int32 argument of this shape."""
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _greedy_avals(n: int) -> SlotSampling:
    """Shapes of n rows of greedy sampling settings (a prefill program's `sampling` argument)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), SlotSampling.greedy(n))


class LoweringHooks:
    def lower_generate(self, params, decode_state, max_length: Optional[int] = None,
                       platforms: Optional[tuple] = None, logprobs: bool = False):
        """The `generate` program for this state, lowered (`.compile().as_text()` gives its HLO),
        or with `platforms` exported for them (`jax.export`: e.g. ("tpu",) from a CPU host)."""
        window = self.window_for(max_length)
        return _lower(self._generate_jit, platforms, params, self._blocks(decode_state, window)[0], window,
                      bool(logprobs))

    def lower_insert(self, decode_state, prefix, slots, page_rows=None,
                     platforms: Optional[tuple] = None):
        """The `insert` program for this prefix, lowered (or exported); arguments as `insert` takes them."""
        slots = np.atleast_1d(np.asarray(slots, np.int32))
        if self.paged and page_rows is None:
            page_rows = np.full((len(slots), self.pages_per_slot), self.num_kv_pages, np.int32)
        state = self._blocks(decode_state, prefix.cache.k[0].shape[1])[0]
        return _lower(self._insert_jit, platforms, state, prefix, slots, page_rows)

    def lower_prefill(self, params, n: int, length: int, platforms: Optional[tuple] = None,
                      decode_state: Optional[Any] = None, context_tokens: int = 0):
        """The prefill program for `n` prompts of bucket `length`, lowered (or exported); with
        `context_tokens` (and the decode state), the one that continues that many cached positions."""
        samp = _greedy_avals(n)
        if not context_tokens:
            return _lower(self._prefill_jit, platforms, params, _i32(n, length), _i32(n), samp)
        context = (decode_state.cache, _i32(n, -(-context_tokens // self.config.kv_page_size)), _i32(n))
        return _lower(self._prefill_jit, platforms, params, _i32(n, length), _i32(n), samp, None, None, context)

    def lower_prefill_packed(self, params, length: int, platforms: Optional[tuple] = None):
        """The packed prefill program for a row of `length` tokens, lowered (or exported)."""
        m = self._geometry.packed_rows
        return _lower(self._prefill_packed_jit, platforms, params, _i32(length), _i32(length), _i32(length), _i32(m),
                      _i32(m), _greedy_avals(m))

    def lower_masked_step(self, params, decode_state, platforms: Optional[tuple] = None):
        """The two halves of a structured-output step (decode_logits, sample_logits), lowered."""
        b, v = self.config.batch_size, self.model_config.vocab_size
        logits = jax.ShapeDtypeStruct((b, v), jnp.float32)
        mask = jax.ShapeDtypeStruct((b, -(-v // 32)), jnp.int32)
        window = self._windows[-1]
        return (_lower(self._decode_logits_jit, platforms, params, self._blocks(decode_state, window)[0], window),
                _lower(self._sample_logits_jit, platforms, self._blocks(decode_state, 1)[0], logits, mask, False))

    def filled_state(self, decode_state, length: int):
        """Every slot live at position `length` (cache contents as they are): the state a decode
        step meets once each slot holds `length` tokens, for timing one step in isolation."""
        b = self.config.batch_size
        return dataclasses.replace(decode_state, pos=jnp.full((b,), length, jnp.int32),
                                   step=jnp.ones((b,), jnp.int32))

    def workspace_bytes(self) -> int:
        """Device bytes, beyond params and cache, of the largest prefill call, bucketed or packed
        (its K/V output waits for the insert), plus one decode call: temporaries and outputs from
        XLA's memory analysis of the compiled programs (the decode step compiled over a one-page pool:
        its workspace does not grow with the pool)."""
        from engine.kv_budget import compiled_workspace
        if self._param_avals is None:
            raise RuntimeError("workspace_bytes needs the params' shapes: call load_params() first")
        n, s = self._geometry.prefill_sizes[-1], self.buckets[-1]
        prefill = compiled_workspace(self.lower_prefill(self._param_avals, n, s).compile())
        if self._geometry.packed_sizes:
            packed = self.lower_prefill_packed(self._param_avals, self._geometry.packed_sizes[-1]).compile()
            prefill = max(prefill, compiled_workspace(packed))
        decode = self.lower_generate(self._param_avals, jax.eval_shape(lambda: self._build_state(1))).compile()
        return prefill + compiled_workspace(decode)
