"""`JaxEngine`: the JetStream Engine API over our model, KV cache and sampler.

Everything that runs per token is one jit-compiled function with static shapes:
prefill per (prompt-count, length bucket), insert per the same, and `generate`, which
runs `decode_steps` decode steps in one `lax.fori_loop` with sampling on device, so the
host syncs once per several tokens. Decode state and cache are donated: updated in place.
(A little over 400 lines: the whole Engine API of one engine in one place. What it picks for its
devices is in engine/device_choices.py; the hooks that lower its programs for profiling and for
other platforms are in engine/engine_hooks.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from engine import sharding as shd
from engine.config import EngineConfig, kernel_settings
from engine.decode_state import DecodeState, Prefix
from engine.device_choices import (chunked_cache, choose_attention, compiler_options, compute_dtype, gemm_choice,
                                   matrix_dtype)
from engine.engine_api import Engine, EngineGeometry, ResultTokens, geometry_of
from engine.engine_hooks import LoweringHooks
from engine.host_memory import ProgramWatch
from engine.kv_cache import KVCache, init_cache, insert_prefix, insert_prefix_paged, pack_prefix
from engine.kv_chunks import CHUNK, join_layers, split_layers
from engine.model import decode_step, prefill as model_prefill
from engine.model_config import ModelConfig
from engine.engine_packed import PackedPrefill
from engine.packed import insert_packed, packed_attention_impl
from engine.weights import weight_form
from engine.sampling import MAX_LOGPROBS, SlotSampling, apply_token_mask, sample, token_logprobs

log = logging.getLogger(__name__)

class JaxEngine(PackedPrefill, LoweringHooks, Engine):
    """One model on one mesh, with `batch_size` decode slots of `max_cache_length` tokens."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, checkpoint=None, device_group: int = 0):
        self.config = config
        model_config = model_config.within_cache(config.max_cache_length)
        self.model_config = model_config
        self.checkpoint = checkpoint  # None: random weights (benchmarks, config-name models)
        self.paged = config.kv_page_size > 0
        self._mesh = shd.make_mesh(config.platform, device_group)  # "gpu=N/M": the group's M devices
        backend = self._mesh.devices.flat[0].platform
        self.dtype = compute_dtype(config.dtype, backend)
        self.weight_dtype = matrix_dtype(config.weight_dtype, backend, self.dtype)
        # A CPU draws a vocabulary of noise per sampling slot in ~1 ms: skip the greedy slots
        # (engine.lower sets this for its target platform).
        self.per_slot_draws = backend == "cpu"
        self._kernel = kernel_settings(config.decode_kernel)
        self._geometry = geometry_of(config, model_config.vocab_size, model_config.eos_token_ids)
        self.prefill_attention, self.attention_impl = choose_attention(
            config, model_config, backend, self.dtype, self._mesh.size, dict(self._kernel))
        self.kv_chunked = chunked_cache(config, self.attention_impl, self._mesh.size, backend)
        # A chunked cache starts with one block and grows (_blocks); others hold every position.
        self._initial_cache_length = (min(CHUNK, config.max_cache_length) if self.kv_chunked
                                      else config.max_cache_length)
        # Tensor parallel: the Pallas kernel runs on each device's heads (kv_cache._pallas_decode).
        self._kernel_mesh = (self._mesh if self.attention_impl == "pallas" and self._mesh.size > 1
                             and model_config.num_kv_heads % self._mesh.size == 0 else None)
        self.buckets = self._geometry.prefill_buckets
        self._windows = self._decode_windows()
        self.gemms = gemm_choice(config.gpu_gemms, backend, weight_form(config.quantize_weights, self._mesh)[1])
        jit = functools.partial(jax.jit, compiler_options=compiler_options(self.gemms))
        self._prefill_jit = jit(self._prefill_impl, static_argnames=("prompt_logprobs",))
        self._prefill_packed_jit = jit(self._prefill_packed_impl)
        self._insert_jit = jit(self._insert_impl, donate_argnums=(0,))
        self._release_jit = jit(self._release_impl, donate_argnums=(0,))
        self._generate_jit = jit(self._generate_impl, donate_argnums=(1,), static_argnums=(2, 3))
        self._decode_logits_jit = jit(self._decode_logits_impl, donate_argnums=(1,), static_argnums=(2,))
        self._sample_logits_jit = jit(self._sample_logits_impl, donate_argnums=(0,), static_argnums=(3,))
        self._programs = ProgramWatch(self._prefill_jit, self._prefill_packed_jit, self._insert_jit, self._release_jit,
                                      self._generate_jit, self._decode_logits_jit, self._sample_logits_jit)
        self._cache_sharding = shd.cache_shardings(self._mesh, model_config, config.quantize_kv_cache,
                                                   self._initial_cache_length if self.kv_chunked else 0)
        self._param_avals = None  # shapes of the loaded params, for sizing an "auto" page pool
        self.pool_plan = None  # kv_budget.PoolPlan once an "auto" pool is sized

    def _blocks(self, state: DecodeState, positions: int):
        """(state holding only the chunked cache's blocks below `positions`, allocating any
        missing, the rest for _rejoin); (state, None) for other layouts."""
        if not self.kv_chunked:
            return state, None
        length, c = self.config.max_cache_length, state.cache
        n = -(-min(positions, length) // CHUNK)
        fields = ((c.k, 0), (c.v, 0), (c.k_scale, 1), (c.v_scale, 1))  # scales of new blocks: 1
        parts = [split_layers(x, n, length, fill) for x, fill in fields]
        return dataclasses.replace(state, cache=KVCache(*(p[0] for p in parts))), KVCache(*(p[1] for p in parts))

    @staticmethod
    def _rejoin(state: DecodeState, tail) -> DecodeState:
        if tail is None:
            return state
        c = state.cache
        return dataclasses.replace(state, cache=KVCache(*(join_layers(a, b) for a, b in zip(
            (c.k, c.v, c.k_scale, c.v_scale), (tail.k, tail.v, tail.k_scale, tail.v_scale)))))

    # ---- properties of the API ----
    @property
    def geometry(self) -> EngineGeometry:
        return self._geometry

    @property
    def mesh(self):
        """The `jax.sharding.Mesh` the engine runs on."""
        return self._mesh

    @property
    def num_kv_pages(self) -> int:
        """Pages in a paged cache's pool (page `num_kv_pages` is the trash page); 0: not paged."""
        return self._geometry.num_kv_pages

    @property
    def pages_per_slot(self) -> int:
        return self._geometry.pages_per_slot

    def sync(self, value):
        return jax.block_until_ready(value)

    def describe(self) -> dict:
        dev = self._mesh.devices.flat[0]
        plan = self.pool_plan
        return {"device_kind": dev.device_kind, "platform": dev.platform, "device_count": int(self._mesh.devices.size),
                "dtype": str(np.dtype(self.dtype)), "weight_dtype": str(np.dtype(self.weight_dtype)),
                "prefill_attention": self.prefill_attention,
                "packed_attention": packed_attention_impl(self.prefill_attention, self.model_config)
                if self._geometry.packed_sizes else None,
                "decode_attention": self.attention_impl, "gpu_gemms": self.gemms,
                "kv_cache_tokens": self.config.kv_cache_tokens,
                "kv_pool_plan": dataclasses.asdict(plan) if plan is not None else None}

    # ---- weights ----
    def load_params(self):
        from engine.weights import add_embed_bits, fuse_projections, load_params
        params = load_params(self.model_config, self.checkpoint, self._mesh, self.dtype,
                             self.config.quantize_weights, seed=self.config.random_seed,
                             matrix_dtype=self.weight_dtype)
        if self.config.fuse_projections and self._mesh.size == 1:
            params = fuse_projections(params)
        if self._mesh.devices.flat[0].platform == "cpu":
            params = add_embed_bits(params)
        self._param_avals = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params)
        return params

    # ---- decode state ----
    def _build_state(self, pages: int) -> DecodeState:
        """A fresh decode state; paged, a pool of `pages` pages plus the trash page."""
        cfg, b = self.model_config, self.config.batch_size
        if self.paged:  # all free slots' rows point at the trash page
            cache = init_cache(cfg.num_layers, pages + 1, self.config.kv_page_size, cfg.num_kv_heads,
                               cfg.head_dim, self.dtype, self.config.kv_quant_dtype())
            table = jnp.full((b, self.pages_per_slot), pages, jnp.int32)
        else:
            cache = init_cache(cfg.num_layers, b, self._initial_cache_length, cfg.num_kv_heads,
                               cfg.head_dim, self.dtype, self.config.kv_quant_dtype(), self.kv_chunked)
            table = None
        g = SlotSampling.greedy(b)
        return DecodeState(cache, jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32),
                           SlotSampling(*(jnp.asarray(x) for x in (g.temperature, g.top_k, g.top_p, g.key))),
                           table)

    def init_decode_state(self) -> DecodeState:
        if self.config.kv_cache_tokens == "auto":
            self.size_kv_pool()
        else:
            from engine.kv_budget import check_fits
            check_fits(self, self._mesh.devices.flat[0].memory_stats() or {})
        rep = shd.replicated(self._mesh)
        out_shardings = DecodeState(self._cache_sharding, rep, rep, rep, SlotSampling(*([rep] * 4)),
                                    rep if self.paged else None)
        return jax.jit(lambda: self._build_state(self.num_kv_pages), out_shardings=out_shardings)()

    # ---- an "auto" page pool ----
    def size_kv_pool(self, memory_stats: Optional[dict] = None):
        """Resolve kv_cache_tokens="auto" from `memory_stats` (default: the first device's) with
        engine/kv_budget.size_pool. The engine then runs a new config, with the tokens chosen, and
        the matching geometry; returns the PoolPlan, or None where the device reports no memory."""
        from engine.kv_budget import size_pool
        if memory_stats is None:
            memory_stats = self._mesh.devices.flat[0].memory_stats() or {}
        tokens, self.pool_plan = size_pool(self, memory_stats)
        self.config = dataclasses.replace(self.config, kv_cache_tokens=tokens)
        self._geometry = geometry_of(self.config, self.model_config.vocab_size, self.model_config.eos_token_ids)
        return self.pool_plan

    # ---- prefill ----
    def _prefill_impl(self, params, tokens, true_length, sampling: SlotSampling, token_mask=None,
                      sample_rows=None, context=None, prompt_logprobs: bool = False):
        logits, ks, vs = model_prefill(params, self.model_config, tokens, self.dtype, all_logits=prompt_logprobs,
                                       last_index=true_length - 1, attn_impl=self.prefill_attention,
                                       context=context)
        prompt = None
        if prompt_logprobs:  # each prompt token's logprob given the tokens before it
            n, s, v = logits.shape
            lp, ids, top = token_logprobs(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1))
            prompt = (lp.reshape(n, s - 1), ids.reshape(n, s - 1, -1), top.reshape(n, s - 1, -1))
            logits = jnp.take_along_axis(logits, (true_length - 1)[:, None, None], axis=1)[:, 0]
        offset = None
        if context is not None:  # lengths and offsets count the cached positions too
            offset = context[2]
            true_length = true_length + offset
        if sample_rows is not None:  # several rows sample from one prompt's logits
            logits, true_length = logits[sample_rows], true_length[sample_rows]
            offset = None if offset is None else offset[sample_rows]
        masked = logits if token_mask is None else apply_token_mask(logits, token_mask)
        first = sample(masked, sampling, jnp.zeros_like(true_length), self.per_slot_draws)
        prefix_cache = pack_prefix(ks, vs, self.config.kv_quant_dtype())
        return (Prefix(prefix_cache, true_length, first, sampling, sample_rows, offset),
                token_logprobs(logits, first), prompt)

    def prefill(self, *, params, padded_tokens, true_length, existing_prefix=None,
                sampling: Optional[SlotSampling] = None, token_mask=None, sample_rows=None,
                prompt_logprobs: bool = False):
        """Prefill one prompt (padded_tokens [S]) or a batch ([N, S] with true_length [N]).
        `token_mask` [R, ceil(V / 32)] int32: the tokens each first token may be (its own program).
        `sample_rows` [R]: rows that sample their first tokens from prompt sample_rows[r] (n
        samples share one prefill; `sampling` then has R rows, and insert takes R slots).
        `prompt_logprobs` (its own program): the first tokens' ResultTokens also carry each
        prompt token's logprob and top alternatives, `prompt` = ([N, S-1], [N, S-1, k], [N, S-1, k])."""
        tokens = np.asarray(padded_tokens, np.int32)
        single = tokens.ndim == 1
        if single:
            tokens = tokens[None]
        lengths = np.atleast_1d(np.asarray(true_length, np.int32))
        n, s = tokens.shape
        if s not in self.buckets:
            raise ValueError(f"padded length {s} is not a prefill bucket {self.buckets}")
        if (lengths < 1).any() or (lengths > min(s, self.config.context_size)).any():
            raise ValueError(f"true_length {lengths} out of range for bucket {s}")
        context = None
        if existing_prefix is not None:
            if not self.paged:
                raise ValueError("existing_prefix (prefix caching) needs a paged KV cache")
            pages = np.asarray(existing_prefix.pages, np.int32).reshape(n, -1)
            ctx_len = np.asarray(existing_prefix.length, np.int32).reshape(n)
            if (ctx_len % self.config.kv_page_size).any() or (ctx_len > pages.shape[1] * self.config.kv_page_size).any():
                raise ValueError(f"cached lengths {ctx_len.tolist()} are not whole pages of the pages given")
            context = (existing_prefix.decode_state.cache, pages, ctx_len)
            lengths_total = lengths + ctx_len
        else:
            lengths_total = lengths
        r = n
        if sample_rows is not None:
            sample_rows = np.asarray(sample_rows, np.int32)
            r = len(sample_rows)
            if ((sample_rows < 0) | (sample_rows >= n)).any():
                raise ValueError(f"sample_rows {sample_rows.tolist()} name prompts outside [0, {n})")
        if sampling is None:
            sampling = SlotSampling.greedy(r)
        if token_mask is not None:
            token_mask = np.asarray(token_mask, np.int32).reshape(r, -1)
        prefix, (lp, top_ids, top_lp), prompt = self._prefill_jit(
            params, tokens, lengths, sampling, token_mask, sample_rows, context, prompt_logprobs=prompt_logprobs)
        self._programs.after_call()
        rows_len = lengths_total if sample_rows is None else lengths_total[sample_rows]
        first = ResultTokens(prefix.first_token[:, None], jnp.ones((r, 1), bool), rows_len[:, None],
                             lp[:, None], top_ids[:, None], top_lp[:, None], prompt)
        return prefix, first

    # ---- insert ----
    def _insert_impl(self, state: DecodeState, prefix: Prefix, slots, page_rows):
        def put(dst, src):
            return dst.at[slots].set(src.astype(dst.dtype), mode="drop")

        src = prefix.cache
        if prefix.rows is not None:  # one prompt's K/V for each of its samples
            src = jax.tree.map(lambda x: x[prefix.rows], src)
        if prefix.packed is not None:  # one packed row: token by token (engine/packed.py)
            cache = insert_packed(state.cache, src, *prefix.packed, slots=slots, page_rows=page_rows)
            table = None if page_rows is None else put(state.page_table, page_rows)
        elif page_rows is None:
            cache, table = insert_prefix(state.cache, src, slots), None
        else:
            write = page_rows
            if prefix.offset is not None:  # the K/V follow cached pages: write from the next page
                idx = prefix.offset[:, None] // state.cache.k[0].shape[1] + jnp.arange(page_rows.shape[1])[None]
                write = jnp.take_along_axis(page_rows, jnp.minimum(idx, page_rows.shape[1] - 1), axis=1)
                write = jnp.where(idx < page_rows.shape[1], write, self.num_kv_pages)
            cache = insert_prefix_paged(state.cache, src, write)
            table = put(state.page_table, page_rows)

        samp = SlotSampling(*(put(d, s) for d, s in zip(
            (state.sampling.temperature, state.sampling.top_k, state.sampling.top_p, state.sampling.key),
            (prefix.sampling.temperature, prefix.sampling.top_k, prefix.sampling.top_p, prefix.sampling.key))))
        return DecodeState(cache, put(state.tokens, prefix.first_token), put(state.pos, prefix.true_length),
                           put(state.step, jnp.ones_like(prefix.true_length)), samp, table)

    # ---- release ----
    def _release_impl(self, state: DecodeState, mask):
        """Parked slots (step 0) stay at position 0: their attention reads one cache row
        instead of a stale sequence that kept growing to the end of the cache. Paged, their
        rows point at the trash page, so their pages can go to other requests."""
        table = state.page_table
        if table is not None:
            table = jnp.where(mask[:, None], self.num_kv_pages, table)
        return DecodeState(state.cache, state.tokens, jnp.where(mask, 0, state.pos),
                           jnp.where(mask, 0, state.step), state.sampling, table)

    def release_slots(self, decode_state: DecodeState, slots) -> DecodeState:
        """Park the slots of the [batch_size] bool mask `slots` until their next insert."""
        state, tail = self._blocks(decode_state, 1)
        return self._rejoin(self._release_jit(state, np.asarray(slots, bool)), tail)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot, page_rows=None) -> DecodeState:
        """Insert a prefix into `slot` (an int, or [N] slots for a batched prefix; -1 skips a row).

        A paged cache also takes each row's page-table row, page_rows [N, pages_per_slot]
        (engine.kv_pages.PagePool.rows): the pages its prompt and generated tokens go to.
        Skipped rows, and rows given none, point at the trash page."""
        slots = np.atleast_1d(np.asarray(slot, np.int32))
        skip = slots < 0
        slots = np.where(skip, self.config.batch_size, slots)  # out of range -> dropped
        if self.paged:
            rows = np.full((len(slots), self.pages_per_slot), self.num_kv_pages, np.int32)
            if page_rows is not None:
                rows[~skip] = np.asarray(page_rows, np.int32).reshape(len(slots), -1)[~skip]
            page_rows = rows
        elif page_rows is not None:
            raise ValueError("page_rows given to an engine without a paged cache")
        state, tail = self._blocks(decode_state, prefix.cache.k[0].shape[1])  # the prefixes' positions
        state = self._rejoin(self._insert_jit(state, prefix, slots, page_rows), tail)
        self._programs.after_call()
        return state

    # ---- generate ----
    def decode_windows(self) -> list:
        return list(self._windows)

    def _decode_windows(self) -> list:
        """Cache lengths the decode attention may be limited to (static shapes, one compile each).

        Only the XLA path reads the whole cache; cuDNN and the Pallas kernel already skip each
        slot's unfilled part, so they get the full length only.
        """
        t = self.config.max_cache_length
        if self.attention_impl != "xla":
            return [t]
        out, w = [], 128
        while w < t:
            out.append(w)
            w *= 2
        return out + [t]

    def window_for(self, max_length: Optional[int]) -> int:
        """The decode window (a compiled cache length) that covers positions below `max_length`."""
        wins = self._windows
        if max_length is None:
            return wins[-1]
        return next((w for w in wins if w >= max_length), wins[-1])

    def _advance(self, state: DecodeState, cache, nxt) -> DecodeState:
        """The state once every live slot has taken token `nxt` [B] (parked slots, released or
        never filled, stay where they are)."""
        live = state.step > 0
        pos = jnp.where(live, jnp.minimum(state.pos + 1, self.config.max_cache_length - 1), state.pos)
        return DecodeState(cache, nxt, pos, state.step + live, state.sampling, state.page_table)

    def _generate_impl(self, params, state: DecodeState, window: int, logprobs: bool = False):
        cfg = self.model_config
        steps = self.config.decode_steps
        b = self.config.batch_size

        def body(i, carry):
            state, outs = carry
            logits, cache = decode_step(params, cfg, state.tokens, state.pos, state.cache, self.dtype,
                                        self.attention_impl, window, state.page_table, self._kernel,
                                        self._kernel_mesh)
            nxt = sample(logits, state.sampling, state.step, self.per_slot_draws)
            state = self._advance(state, cache, nxt)
            step_outs = (nxt, state.pos) + (token_logprobs(logits, nxt) if logprobs else ())
            return state, tuple(o.at[:, i].set(x) for o, x in zip(outs, step_outs))

        outs = (jnp.zeros((b, steps), jnp.int32), jnp.zeros((b, steps), jnp.int32))
        if logprobs:
            k = MAX_LOGPROBS
            outs += (jnp.zeros((b, steps), jnp.float32), jnp.zeros((b, steps, k), jnp.int32),
                     jnp.zeros((b, steps, k), jnp.float32))
        state, outs = jax.lax.fori_loop(0, steps, body, (state, outs))
        toks, pos = outs[:2]
        return (state, toks, pos > 0, pos) + outs[2:]

    def _decode_logits_impl(self, params, state: DecodeState, window: int):
        """The forward half of one decode step: the slots' tokens written to the cache, and the
        logits [B, V] of their next tokens (sampled by _sample_logits_impl)."""
        logits, cache = decode_step(params, self.model_config, state.tokens, state.pos, state.cache, self.dtype,
                                    self.attention_impl, window, state.page_table, self._kernel,
                                    self._kernel_mesh)
        return dataclasses.replace(state, cache=cache), logits

    def _sample_logits_impl(self, state: DecodeState, logits, token_mask, logprobs: bool):
        """The sampling half: each slot's next token under its token_mask row [B, ceil(V / 32)]."""
        nxt = sample(apply_token_mask(logits, token_mask), state.sampling, state.step, self.per_slot_draws)
        extra = tuple(x[:, None] for x in token_logprobs(logits, nxt)) if logprobs else ()
        state = self._advance(state, state.cache, nxt)
        return (state, nxt[:, None], (state.pos > 0)[:, None], state.pos[:, None]) + extra

    def decode_logits(self, params, decode_state: DecodeState, max_length: Optional[int] = None):
        """One decode step's forward pass, dispatched: (state, logits on device). The host builds
        the step's token masks while it runs, then calls sample_logits."""
        window = self.window_for(max_length)
        state, tail = self._blocks(decode_state, window)
        state, logits = self._decode_logits_jit(params, state, window)
        self._programs.after_call()
        return self._rejoin(state, tail), logits

    def sample_logits(self, decode_state: DecodeState, logits, token_mask=None, logprobs: bool = False):
        """Sample the step decode_logits computed: each slot's token obeys its token_mask row
        ([slots, ceil(V / 32)] int32; None: any token). Returns (state, ResultTokens of one step)."""
        if token_mask is None:
            from engine.constraints import open_mask
            token_mask = open_mask(self.config.batch_size, self.model_config.vocab_size)
        state, tail = self._blocks(decode_state, 1)
        state, *out = self._sample_logits_jit(state, logits, np.asarray(token_mask, np.int32), bool(logprobs))
        return self._rejoin(state, tail), ResultTokens(*out)

    def generate(self, params, decode_state: DecodeState, max_length: Optional[int] = None,
                 logprobs: bool = False, token_mask=None):
        """Run `decode_steps` steps. `max_length`, if given, bounds every live slot's position
        (before + during this call) so attention may read a shorter cache window. With
        `logprobs` (its own compiled program) each token's logprobs come along. With `token_mask`
        [slots, ceil(V / 32)] int32 (structured output) it runs one step whose tokens obey the mask."""
        if token_mask is not None:
            state, logits = self.decode_logits(params, decode_state, max_length)
            return self.sample_logits(state, logits, token_mask, logprobs)
        window = self.window_for(max_length)
        state, tail = self._blocks(decode_state, window)
        state, *out = self._generate_jit(params, state, window, bool(logprobs))
        self._programs.after_call()
        return self._rejoin(state, tail), ResultTokens(*out)

    # ---- compile everything up front ----
    def warmup(self, params, decode_state: DecodeState, prefill_shapes=None) -> DecodeState:
        """Compile every prefill bucket for each prefill call size (or only the (prompt count,
        bucket) pairs of `prefill_shapes`), their inserts and the decode step.

        One shape after another: compiling prefill shapes on several threads while the decode
        step compiles and runs breaks XLA's GEMM autotuning on GPUs. A rerun with the same
        shapes loads them from the persistent compilation cache instead.
        """
        if prefill_shapes is None:
            prefill_shapes = [(n, s) for s in self.buckets for n in self._geometry.prefill_sizes]
        for n, s in sorted(prefill_shapes, key=lambda ns: (ns[1], ns[0])):
            prefix, _ = self.prefill(params=params, padded_tokens=np.zeros((n, s), np.int32),
                                     true_length=np.ones(n, np.int32))
            decode_state = self.insert(prefix, decode_state, np.full(n, -1, np.int32))
        if self._geometry.packed_sizes:
            decode_state = self._warm_packed(params, decode_state)
        for w in self.decode_windows():
            decode_state, res = self.generate(params, decode_state, max_length=w)
            jax.block_until_ready(res.tokens)
        decode_state = self.release_slots(decode_state, np.zeros(self.config.batch_size, bool))
        return decode_state
