"""The small abstract API that the batcher and the engines meet at: everything the batcher uses.

It follows JetStream's `engine_api.Engine` contract (we implement it ourselves: the
google-jetstream package is archived and imports seqio/TensorFlow):

    params = engine.load_params()
    state = engine.init_decode_state()
    prefix, first = engine.prefill(params=params, padded_tokens=toks, true_length=n)
    state = engine.insert(prefix, state, slot=3)
    state, result = engine.generate(params, state)
    result.get_result_at_slot(3).tokens

Extensions, each declared here so that any engine (the JAX one, the fake one in
engine/fake_engine.py) serves the batcher unchanged:

* `geometry`: the static shapes the batcher schedules around (slots, prefill buckets and call
  sizes, decode steps per call, the page pool, EOS ids, vocabulary size);
* `prefill` takes N prompts at once and a per-request `sampling`, which `insert` installs in
  the slots, so every slot samples with its own settings on device; `prefill_packed` takes
  prompts back to back in one row (a length mix without padding);
* `insert` takes page-table rows for a paged KV cache; `release_slots` parks free slots;
* `generate(max_length=)` bounds the positions the decode attention must read;
* `warmup`, `sync` and `describe`: compile up front, wait for device work (profiling), report
  what the engine chose (attention path, pool size).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from engine.config import EngineConfig

Params = Any
Prefix = Any
DecodeState = Any


@dataclass(frozen=True)
class EngineGeometry:
    """The static shapes of an engine: what the batcher may ask of it."""

    slots: int  # decode slots
    max_cache_length: int  # tokens per slot, prompt + completion
    context_size: int  # longest prompt accepted
    prefill_buckets: tuple[int, ...]  # padded prompt lengths prefill accepts, ascending
    prefill_sizes: tuple[int, ...]  # prompt counts one prefill call accepts, ascending (1 first)
    decode_steps: int  # tokens each slot advances per generate call
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    kv_page_size: int = 0  # 0: one contiguous region per slot
    num_kv_pages: int = 0  # pages in the pool, the trash page (index num_kv_pages) not counted
    packed_sizes: tuple[int, ...] = ()  # row lengths prefill_packed accepts, ascending (): no packing
    packed_rows: int = 0  # prompts (rows of lengths) per packed call

    @property
    def paged(self) -> bool:
        return self.kv_page_size > 0

    @property
    def pages_per_slot(self) -> int:
        return self.max_cache_length // self.kv_page_size if self.paged else 0

    def bucket_for(self, length: int) -> int:
        """The smallest prefill bucket that holds `length` tokens."""
        for b in self.prefill_buckets:
            if b >= length:
                return b
        raise ValueError(f"prompt of {length} tokens exceeds context_size {self.context_size}")


def geometry_of(config: EngineConfig, vocab_size: int, eos_token_ids, num_kv_pages: Optional[int] = None
                ) -> EngineGeometry:
    """The geometry of an engine built from `config` (num_kv_pages: an "auto" pool once sized)."""
    if num_kv_pages is None:
        num_kv_pages = 0 if config.kv_cache_tokens == "auto" else config.num_kv_pages
    return EngineGeometry(
        slots=config.batch_size, max_cache_length=config.max_cache_length, context_size=config.context_size,
        prefill_buckets=config.prefill_buckets(), prefill_sizes=config.prefill_sizes(),
        decode_steps=config.decode_steps, eos_token_ids=tuple(eos_token_ids), vocab_size=vocab_size,
        kv_page_size=config.kv_page_size, num_kv_pages=num_kv_pages, packed_sizes=config.packed_sizes(),
        packed_rows=config.packed_rows())


@dataclass
class CachedPrompt:
    """Prompt positions already in a paged KV cache (prefix caching), passed to
    `prefill(existing_prefix=)`: prompt row n continues its first length[n] positions (whole
    pages) held in pages[n]; padded_tokens then carry only the rest of each prompt, and `insert`
    writes that rest from page length[n] / page_size of the row's pages on."""

    decode_state: Any
    pages: np.ndarray  # int32 [N, context bucket / page_size], trash-padded
    length: np.ndarray  # int32 [N], multiples of page_size


@dataclass
class SlotData:
    """The tokens one slot produced in one `generate` call."""

    tokens: np.ndarray  # [steps]
    valid: np.ndarray  # [steps] bool: False for an empty slot
    lengths: np.ndarray  # [steps]: tokens in the slot's sequence after each step
    logprobs: Optional[np.ndarray] = None  # [steps] float32, when asked for
    top_ids: Optional[np.ndarray] = None  # [steps, MAX_LOGPROBS] int32
    top_logprobs: Optional[np.ndarray] = None  # [steps, MAX_LOGPROBS] float32


@dataclass
class ResultTokens:
    """Per-slot tokens of one `generate` call (or the first token of a prefill).

    Arrays are [slots, steps]; `generate` may run several decode steps per call.
    They may live on device until read: call `to_host()` once per call, not per slot.
    With logprobs asked for, each token's log-probability and the engine's top alternatives
    (engine.sampling.token_logprobs) come along: [slots, steps] and [slots, steps, k].
    """

    tokens: Any
    valid: Any
    lengths: Any
    logprobs: Any = None
    top_ids: Any = None
    top_logprobs: Any = None
    # a prefill with prompt_logprobs: per prompt row, each prompt token's (logprob [N, S-1],
    # top ids [N, S-1, k], top logprobs [N, S-1, k]) given the tokens before it
    prompt: Any = None

    def to_host(self) -> "ResultTokens":
        host = lambda x: None if x is None else np.asarray(x)
        return ResultTokens(*(host(x) for x in (self.tokens, self.valid, self.lengths, self.logprobs,
                                                 self.top_ids, self.top_logprobs)),
                            prompt=None if self.prompt is None else tuple(host(x) for x in self.prompt))

    def get_result_at_slot(self, slot: int) -> SlotData:
        row = lambda x: None if x is None else np.asarray(x[slot])
        return SlotData(*(row(x) for x in (self.tokens, self.valid, self.lengths, self.logprobs,
                                           self.top_ids, self.top_logprobs)))


class Engine(abc.ABC):
    """JetStream's Engine API, with the extensions above."""

    @abc.abstractmethod
    def load_params(self) -> Params:
        """Load (or build) the weights, placed on the engine's devices."""

    @abc.abstractmethod
    def init_decode_state(self) -> DecodeState:
        """A fresh decode state: preallocated KV cache and per-slot bookkeeping, every slot parked.
        An engine whose page pool is sized from device memory fixes `geometry` here."""

    @abc.abstractmethod
    def prefill(self, *, params: Params, padded_tokens: Any, true_length: Any,
                existing_prefix: Optional[Prefix] = None,
                sampling: Optional[Any] = None, token_mask: Any = None,
                sample_rows: Any = None, prompt_logprobs: bool = False) -> tuple[Prefix, ResultTokens]:
        """Run N prompts (padded_tokens [N, bucket], true_length [N]; or one prompt [bucket]);
        return their KV prefix and first sampled tokens ([R, 1]), with their logprobs. With
        `existing_prefix` (a CachedPrompt; paged engines) the prompts continue cached positions
        and true_length counts only the tokens given. R = N
        unless `sample_rows` [R] (a call size) maps rows to prompts: several samples of one
        prompt share its prefill, each row sampling its own first token. `sampling` is an
        engine.sampling.SlotSampling of R rows (seeds set); None: greedy. `token_mask`
        [R, ceil(vocab / 32)] int32 bits: the tokens each first token may be (structured output).
        With `prompt_logprobs` the result's `prompt` holds each prompt token's logprobs."""

    def prefill_packed(self, *, params: Params, tokens: Any, lengths: Any, sampling: Optional[Any] = None,
                       token_mask: Any = None) -> tuple[Prefix, ResultTokens]:
        """Run prompts packed back to back in one row (tokens [T], T in geometry.packed_sizes;
        lengths [geometry.packed_rows], unused rows 0 after the used ones), each attending only
        to itself; return their prefix (row i: prompt i) and first tokens as `prefill` does.
        Only engines whose geometry has packed_sizes implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no packed prefill")

    @abc.abstractmethod
    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: Any,
               page_rows: Any = None) -> DecodeState:
        """Place prefix row i into slot[i] (-1 skips the row); the old state is donated. A paged
        engine also takes each row's page-table row, page_rows [R, pages_per_slot]."""

    @abc.abstractmethod
    def generate(self, params: Params, decode_state: DecodeState, max_length: Optional[int] = None,
                 logprobs: bool = False, token_mask: Any = None) -> tuple[DecodeState, ResultTokens]:
        """Advance every live slot by `geometry.decode_steps` tokens (the old state is donated).
        `max_length`, if given, bounds every live slot's position through this call; with
        `logprobs` the result carries each token's logprobs and top alternatives. With `token_mask`
        [slots, ceil(vocab / 32)] int32 bits it advances one step, each slot's token allowed by its row."""

    @abc.abstractmethod
    def decode_logits(self, params: Params, decode_state: DecodeState,
                      max_length: Optional[int] = None) -> tuple[DecodeState, Any]:
        """The forward half of one decode step (structured output): dispatch it and return
        (state, the step's logits, left on device), so the host can build the step's token masks
        while it runs. `sample_logits` must follow before any other call on the state."""

    @abc.abstractmethod
    def sample_logits(self, decode_state: DecodeState, logits: Any, token_mask: Any = None,
                      logprobs: bool = False) -> tuple[DecodeState, ResultTokens]:
        """The sampling half: each slot's next token from `logits`, allowed by its token_mask row
        ([slots, ceil(vocab / 32)] int32 bits; None: any). Returns one step's ResultTokens."""

    @abc.abstractmethod
    def release_slots(self, decode_state: DecodeState, slots: Any) -> DecodeState:
        """Park the slots of the [slots] bool mask until their next insert: decode spends
        nothing on them, and a paged engine drops their page-table rows."""

    @property
    @abc.abstractmethod
    def geometry(self) -> EngineGeometry:
        """The engine's static shapes (final once init_decode_state has run)."""

    @property
    def max_concurrent_decodes(self) -> int:
        """Number of decode slots (JetStream's name)."""
        return self.geometry.slots

    @property
    def max_prefill_length(self) -> int:
        """Longest prompt accepted (JetStream's name)."""
        return self.geometry.context_size

    def free_resource(self, slot: int) -> None:
        """JetStream's hook for per-slot resources; slots here hold none beyond the decode state."""
        return None

    def warmup(self, params: Params, decode_state: DecodeState, prefill_shapes=None) -> DecodeState:
        """Compile every program a run can call, or of prefill only the (prompt count, bucket)
        pairs in `prefill_shapes`; returns the (donated) state. Default: nothing."""
        return decode_state

    def sync(self, value: Any) -> Any:
        """Wait until `value`'s device work is done (profiling); returns it. Default: no wait."""
        return value

    def describe(self) -> dict:
        """What the engine chose and holds, for metrics and benchmark reports (JSON values)."""
        return {}
