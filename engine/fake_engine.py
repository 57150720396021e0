"""A fake engine: the Engine API in plain numpy, with tokens a test can compute by hand.

Like JetStream's mock engine, it lets the batcher run without a model or a device: tests check
slot refill, serving order and page-pool admission against it, and benchmarks/dry_run.py counts
the calls a real run would make for a length mix.

The "model": a sequence's first token is (last prompt token + 1) mod vocab, and each next
token is the one before plus 1, mod vocab (under a token mask: the next allowed one). Its
"logprobs": the chosen token 0, the j-th alternative (token + j) mod vocab at -j. So a prompt
ending in token t generates t+1, t+2, ...; a test picks where EOS falls by picking t. Every
call is recorded in `calls`.

It also checks the batcher's side of the contract, and raises `ContractError` when broken:
a prompt longer than its bucket or not in one, a call size the geometry does not offer, and,
with a paged cache, a page written for a slot while another live slot's row still names it,
or a cached page (prefix caching) reused before an insert filled it with prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from engine.engine_api import Engine, EngineGeometry, ResultTokens, geometry_of


class ContractError(AssertionError):
    """The batcher asked the engine for something the Engine API does not allow."""


@dataclass
class FakeState:
    """Per-slot host arrays: last token, position, tokens generated (0: parked), page-table row."""

    tokens: np.ndarray
    pos: np.ndarray
    step: np.ndarray
    page_table: Optional[np.ndarray] = None


@dataclass
class FakePrefix:
    first_token: np.ndarray  # [R]
    true_length: np.ndarray  # [R]
    offset: np.ndarray  # [R]: cached positions before the prompt tokens given
    tokens: list  # [R] the prompt tokens given


@dataclass
class FakeEngine(Engine):
    """An engine of the given geometry whose tokens count up from each prompt's last token."""

    geo: EngineGeometry
    calls: list = field(default_factory=list)  # ("prefill", n, bucket) | ("insert", slots) | ("generate", live)
    page_tokens: dict = field(default_factory=dict)  # page -> the prompt tokens an insert wrote there

    @property
    def geometry(self) -> EngineGeometry:
        return self.geo

    def load_params(self):
        return None

    def init_decode_state(self) -> FakeState:
        b, g = self.geo.slots, self.geo
        table = np.full((b, g.pages_per_slot), g.num_kv_pages, np.int32) if g.paged else None
        return FakeState(np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32), table)

    def _allowed(self, want, mask):
        """`want` [N], each moved to the first token at or after it (cyclically) that mask row allows."""
        if mask is None:
            return want
        v = self.geo.vocab_size
        out = want.copy()
        for i, t in enumerate(want):
            bits = (np.asarray(mask)[i, np.arange(v) // 32] >> (np.arange(v) % 32)) & 1
            order = (int(t) + np.arange(v)) % v
            allowed = order[bits[order] == 1]
            out[i] = allowed[0] if len(allowed) else t
        return out.astype(np.int32)

    def prefill(self, *, params, padded_tokens, true_length, existing_prefix=None, sampling=None, token_mask=None,
                sample_rows=None, prompt_logprobs=False):
        tokens = np.asarray(padded_tokens, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        lengths = np.atleast_1d(np.asarray(true_length, np.int32))
        n, bucket = tokens.shape
        if bucket not in self.geo.prefill_buckets:
            raise ContractError(f"padded length {bucket} is not a prefill bucket {self.geo.prefill_buckets}")
        if n not in self.geo.prefill_sizes:
            raise ContractError(f"{n} prompts in one call; the engine takes {self.geo.prefill_sizes}")
        if (lengths < 1).any() or (lengths > min(bucket, self.geo.context_size)).any():
            raise ContractError(f"true_length {lengths.tolist()} out of range for bucket {bucket}")
        rows = np.arange(n) if sample_rows is None else np.asarray(sample_rows, np.int32)
        if len(rows) not in self.geo.prefill_sizes or ((rows < 0) | (rows >= n)).any():
            raise ContractError(f"sample_rows {rows.tolist()} of {n} prompts: not a call size or out of range")
        offset = np.zeros(n, np.int32)
        if existing_prefix is not None:
            offset = np.asarray(existing_prefix.length, np.int32)
            for i in range(n):  # cached pages must have been filled by an earlier insert
                for j in range(offset[i] // self.geo.kv_page_size):
                    page = int(existing_prefix.pages[i][j])
                    if len(self.page_tokens.get(page, ())) != self.geo.kv_page_size:
                        raise ContractError(f"prompt {i} reuses page {page}, not filled with prompt tokens")
        first = self._allowed((tokens[rows, lengths[rows] - 1] + 1) % self.geo.vocab_size, token_mask)
        self.calls.append(("prefill", n, bucket) if sample_rows is None and existing_prefix is None
                          else ("prefill", n, bucket, len(rows), int(offset.max())))
        total = (lengths + offset)[rows]
        return (FakePrefix(first.astype(np.int32), total, offset[rows], [list(tokens[i, :lengths[i]]) for i in rows]),
                ResultTokens(first[:, None], np.ones((len(rows), 1), bool), total[:, None],
                             *self._logprobs(first[:, None]),
                             prompt=self._logprobs(tokens[:, 1:]) if prompt_logprobs else None))

    def prefill_packed(self, *, params, tokens, lengths, sampling=None, token_mask=None):
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        lengths = np.asarray(lengths, np.int32).reshape(-1)
        g, used = self.geo, lengths > 0
        if len(tokens) not in g.packed_sizes:
            raise ContractError(f"packed row of {len(tokens)} tokens; the engine takes {g.packed_sizes}")
        if len(lengths) != g.packed_rows or not used[0] or (used[1:] & ~used[:-1]).any():
            raise ContractError(f"lengths {lengths.tolist()}: not {g.packed_rows} rows, used ones first")
        if lengths.sum() > len(tokens) or lengths.max() > g.context_size:
            raise ContractError(f"lengths {lengths.tolist()} overflow a row of {len(tokens)} or context_size")
        ends = np.cumsum(lengths)
        first = self._allowed((tokens[np.maximum(ends - 1, 0)] + 1) % g.vocab_size, token_mask)
        first = np.where(used, first, 0).astype(np.int32)
        self.calls.append(("prefill_packed", len(tokens), int(used.sum())))
        segs = [list(tokens[e - n:e]) for e, n in zip(ends, lengths)]
        return (FakePrefix(first, lengths.copy(), np.zeros(len(lengths), np.int32), segs),
                ResultTokens(first[:, None], used[:, None], lengths[:, None], *self._logprobs(first[:, None])))

    def _logprobs(self, toks):
        """(logprobs, top_ids, top_logprobs) of tokens [N, S] under the fake model."""
        from engine.sampling import MAX_LOGPROBS
        j = np.arange(MAX_LOGPROBS)
        return (np.zeros(toks.shape, np.float32), ((toks[..., None] + j) % self.geo.vocab_size).astype(np.int32),
                np.broadcast_to(-j.astype(np.float32), toks.shape + (MAX_LOGPROBS,)))

    def insert(self, prefix: FakePrefix, decode_state: FakeState, slot, page_rows=None) -> FakeState:
        slots = np.atleast_1d(np.asarray(slot, np.int32))
        g, st = self.geo, decode_state
        if g.paged and page_rows is None:
            raise ContractError("a paged engine's insert needs page rows")
        for row, s in enumerate(slots):
            if s < 0:
                continue
            if g.paged:
                row_pages = [int(p) for p in np.asarray(page_rows)[row]]
                first_written = int(prefix.offset[row]) // g.kv_page_size
                pages = {p for p in row_pages[first_written:] if p != g.num_kv_pages}
                for other in np.flatnonzero(st.step > 0):
                    if other == s:  # the insert replaces the slot's own row
                        continue
                    shared = pages & {int(p) for p in st.page_table[other]}
                    if shared:
                        raise ContractError(f"pages {sorted(shared)} written for slot {s} while live slot "
                                            f"{other} holds them")
                toks = prefix.tokens[row]
                for j, p in enumerate(row_pages[first_written:]):
                    if p != g.num_kv_pages:
                        self.page_tokens[p] = tuple(toks[j * g.kv_page_size:(j + 1) * g.kv_page_size])
                st.page_table[s] = np.asarray(page_rows)[row]
            st.tokens[s] = prefix.first_token[row]
            st.pos[s] = prefix.true_length[row]
            st.step[s] = 1
        self.calls.append(("insert", [int(s) for s in slots if s >= 0]))
        return st

    def release_slots(self, decode_state: FakeState, slots) -> FakeState:
        mask = np.asarray(slots, bool)
        decode_state.step[mask] = 0
        decode_state.pos[mask] = 0
        if decode_state.page_table is not None:
            decode_state.page_table[mask] = self.geo.num_kv_pages
        return decode_state

    def decode_logits(self, params, decode_state: FakeState, max_length=None):
        """The fake "logits": each slot's next token before any mask."""
        self.calls.append(("decode_logits", int((decode_state.step > 0).sum())))
        return decode_state, (decode_state.tokens + 1) % self.geo.vocab_size

    def _advance(self, st: FakeState, want, token_mask) -> np.ndarray:
        """One step: each live slot takes `want` (moved to what its mask row allows); returns the
        live mask."""
        live = st.step > 0
        st.tokens = np.where(live, self._allowed(np.asarray(want), token_mask), st.tokens).astype(np.int32)
        st.pos = np.where(live, np.minimum(st.pos + 1, self.geo.max_cache_length - 1), st.pos).astype(np.int32)
        st.step = st.step + live
        return live

    def sample_logits(self, decode_state: FakeState, logits, token_mask=None, logprobs: bool = False):
        st = decode_state
        live = self._advance(st, logits, token_mask)
        toks = st.tokens[:, None].copy()
        extra = self._logprobs(toks) if logprobs else ()
        return st, ResultTokens(toks, live[:, None].copy(), st.pos[:, None].copy(), *extra)

    def generate(self, params, decode_state: FakeState, max_length=None, logprobs: bool = False, token_mask=None):
        st, g = decode_state, self.geo
        steps = g.decode_steps if token_mask is None else 1
        live = st.step > 0
        toks = np.zeros((g.slots, steps), np.int32)
        lengths = np.zeros((g.slots, steps), np.int32)
        for i in range(steps):
            self._advance(st, (st.tokens + 1) % g.vocab_size, token_mask)
            toks[:, i], lengths[:, i] = st.tokens, st.pos
        self.calls.append(("generate", int(live.sum())))
        extra = self._logprobs(toks) if logprobs else ()
        return st, ResultTokens(toks, np.repeat(live[:, None], steps, 1), lengths, *extra)


def fake_geometry(slots: int = 4, max_cache_length: int = 64, context_size: int = 32, decode_steps: int = 2,
                  prefill_batch: int = 4, min_prefill_bucket: int = 8, vocab_size: int = 256,
                  eos_token_ids: tuple = (2,), kv_page_size: int = 0, kv_cache_tokens: int = 0,
                  packed_prefill: int = 0) -> EngineGeometry:
    """The geometry a JaxEngine of these EngineConfig settings would have."""
    from engine.config import EngineConfig
    ec = EngineConfig(batch_size=slots, max_cache_length=max_cache_length, context_size=context_size,
                      decode_steps=decode_steps, prefill_batch=prefill_batch, min_prefill_bucket=min_prefill_bucket,
                      kv_page_size=kv_page_size, kv_cache_tokens=kv_cache_tokens, packed_prefill=packed_prefill)
    return geometry_of(ec, vocab_size, eos_token_ids)
