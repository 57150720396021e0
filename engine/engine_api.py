"""The small abstract API that the batcher and the engines meet at.

It follows JetStream's `engine_api.Engine` contract (we implement it ourselves:
the google-jetstream package is archived and imports seqio/TensorFlow):

    params = engine.load_params()
    state = engine.init_decode_state()
    prefix, first = engine.prefill(params=params, padded_tokens=toks, true_length=n)
    state = engine.insert(prefix, state, slot=3)
    state, result = engine.generate(params, state)
    result.get_result_at_slot(3).tokens

One extension: `prefill` takes an optional per-request `sampling` (temperature,
top-k, top-p, seed) which `insert` installs in the slot, so every slot samples
with its own settings on device.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

Params = Any
Prefix = Any
DecodeState = Any


@dataclass
class SlotData:
    """The tokens one slot produced in one `generate` call."""

    tokens: np.ndarray  # [steps]
    valid: np.ndarray  # [steps] bool: False for an empty slot
    lengths: np.ndarray  # [steps]: tokens in the slot's sequence after each step


@dataclass
class ResultTokens:
    """Per-slot tokens of one `generate` call (or the first token of a prefill).

    Arrays are [slots, steps]; `generate` may run several decode steps per call.
    They may live on device until read: call `to_host()` once per call, not per slot.
    """

    tokens: Any
    valid: Any
    lengths: Any

    def to_host(self) -> "ResultTokens":
        return ResultTokens(np.asarray(self.tokens), np.asarray(self.valid), np.asarray(self.lengths))

    def get_result_at_slot(self, slot: int) -> SlotData:
        return SlotData(np.asarray(self.tokens[slot]), np.asarray(self.valid[slot]),
                        np.asarray(self.lengths[slot]))


class Engine(abc.ABC):
    """JetStream's Engine API."""

    @abc.abstractmethod
    def load_params(self) -> Params:
        """Load (or build) the weights, placed on the engine's mesh."""

    @abc.abstractmethod
    def init_decode_state(self) -> DecodeState:
        """A fresh decode state: preallocated KV cache and per-slot bookkeeping."""

    @abc.abstractmethod
    def prefill(self, *, params: Params, padded_tokens: Any, true_length: int,
                existing_prefix: Optional[Prefix] = None,
                sampling: Optional[Any] = None) -> tuple[Prefix, ResultTokens]:
        """Run the prompt; return its KV prefix and its first sampled token."""

    @abc.abstractmethod
    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int,
               page_rows: Any = None) -> DecodeState:
        """Place a prefix into a decode slot (the old state is donated). An engine with a
        paged KV cache also takes the slot's page-table row (an extension of JetStream's API)."""

    @abc.abstractmethod
    def generate(self, params: Params, decode_state: DecodeState) -> tuple[DecodeState, ResultTokens]:
        """Advance every slot by `decode_steps` tokens (the old state is donated)."""

    @property
    @abc.abstractmethod
    def max_concurrent_decodes(self) -> int:
        """Number of decode slots."""

    @property
    @abc.abstractmethod
    def max_prefill_length(self) -> int:
        """Longest prompt accepted (context_size)."""

    @property
    @abc.abstractmethod
    def mesh(self):
        """The `jax.sharding.Mesh` the engine runs on."""

    def free_resource(self, slot: int) -> None:  # JetStream has this hook; nothing to free here
        return None

    def release_slots(self, decode_state: DecodeState, slots: Any) -> DecodeState:
        """Park the slots in the [B] bool mask `slots` until their next insert, so decode
        spends nothing on them (an extension of JetStream's API; the default parks nothing)."""
        return decode_state
