"""The JaxEngine's device-side state: the decode state its programs donate and update, and the
prefix a prefill hands to insert. Both are pytrees (jit arguments and results)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from engine.kv_cache import KVCache
from engine.sampling import SlotSampling


@dataclass
class DecodeState:
    cache: KVCache
    tokens: Any  # int32 [B]: last sampled token of each slot (the next input)
    pos: Any  # int32 [B]: position that token will occupy (= tokens already in the cache)
    step: Any  # int32 [B]: tokens generated so far by the slot's request; 0: the slot is parked
    sampling: SlotSampling  # per-slot settings
    page_table: Any = None  # int32 [B, max_cache_length / page] for a paged cache, else None


@dataclass
class Prefix:
    """The result of prefilling N prompts for R rows (R = N unless several samples share a
    prompt): the prompts' K/V, and per row its length, first token, sampling and prompt."""

    cache: KVCache  # per layer [N, S, Hkv, D]
    true_length: Any  # int32 [R]
    first_token: Any  # int32 [R]
    sampling: SlotSampling  # R rows
    rows: Any = None  # int32 [R]: the prompt (cache row) of each row; None: row i is prompt i
    offset: Any = None  # int32 [R]: cached positions the K/V follow (prefix caching); None: 0
    packed: Any = None  # (segment [T], position [T]) of each token when cache is one packed row [1, T]


for _cls, _fields in ((DecodeState, ["cache", "tokens", "pos", "step", "sampling", "page_table"]),
                      (Prefix, ["cache", "true_length", "first_token", "sampling", "rows", "offset", "packed"])):
    jax.tree_util.register_dataclass(_cls, data_fields=_fields, meta_fields=[])
