"""The ragged Pallas decode-attention kernel (engine/kernels/ragged_decode.py), in interpret mode
on CPU, against the XLA masked-einsum path of engine.kv_cache.decode_attention."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from engine.kernels import int8_convert as ic
from engine.kernels.ragged_decode import ragged_decode_attention
from engine.kv_cache import KVCache, decode_attention


def _case(b, t, hkv, g, d, quantized, seed=0, q_dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, hkv * g, d)), q_dtype)
    if quantized == "fp8":  # e4m3 values over most of its range (max 448)
        # clipped: e4m3fn has no infinity, so a cast past 448 would give NaN
        k, v = (jnp.asarray(np.clip(r.normal(size=(b, t, hkv, d)) * 100, -448, 448), jnp.float32)
                .astype(jnp.float8_e4m3fn) for _ in range(2))
    elif quantized:
        k, v = (jnp.asarray(r.integers(-127, 128, size=(b, t, hkv, d)), jnp.int8) for _ in range(2))
    if quantized:
        ks, vs = (jnp.asarray(r.uniform(0.002, 0.03, size=(b, hkv, t)), jnp.float32) for _ in range(2))
        return q, KVCache([k], [v], [ks], [vs])
    k, v = (jnp.asarray(r.normal(size=(b, t, hkv, d)), jnp.float32) for _ in range(2))
    return q, KVCache([k], [v])


def _check(q, cache, lengths, atol=2e-5, **kw):
    d = q.shape[-1]
    pos = jnp.asarray(lengths, jnp.int32) - 1
    ref = decode_attention(q, cache, 0, pos, d ** -0.5, impl="xla")
    out = ragged_decode_attention(q, cache.k[0], cache.v[0],
                                  cache.k_scale[0] if cache.quantized else None,
                                  cache.v_scale[0] if cache.quantized else None,
                                  pos + 1, d ** -0.5, interpret=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()  # NaN == NaN would pass allclose
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=0)


# lengths: 1, one block exactly (16), a block and a bit, all of T (64), and in between
LENGTHS = [1, 16, 17, 64, 40]


@pytest.mark.parametrize("g,method", [(1, "fma"), (4, "fma"), (2, "dot")])
def test_int8_cache_matches_xla(g, method):
    q, cache = _case(5, 64, 2, g, 32, quantized=True, seed=g)
    _check(q, cache, LENGTHS, block_t=16, method=method)


@pytest.mark.parametrize("g,method", [(1, "fma"), (2, "dot")])
def test_fp8_cache_matches_xla(g, method):
    """An fp8 e4m3 cache (kv_cache_dtype fp8): the kernel converts plainly, whatever `convert` says."""
    q, cache = _case(5, 64, 2, g, 32, quantized="fp8", seed=g)
    assert cache.k[0].dtype == jnp.float8_e4m3fn
    _check(q, cache, LENGTHS, block_t=16, method=method, convert="prmt")


@pytest.mark.parametrize("method,quantized,g,terms,bound", [
    ("mma8", True, 1, 2, 3e-4), ("mma8", True, 4, 2, 3e-4), ("mma8", "fp8", 2, 2, 0.01),
    ("mma8", True, 1, 1, 0.04), ("mma8", "fp8", 2, 1, 0.15),
    ("mma8k", True, 1, 2, 3e-4), ("mma8k", True, 4, 1, 0.04), ("mma8k", "fp8", 2, 2, 0.01),
    ("dp4a", True, 1, 2, 3e-4), ("dp4a", True, 4, 2, 3e-4)])
def test_mma8_within_its_bound(method, quantized, g, terms, bound):
    """method="mma8" quantizes q and each block's p * v_scale to the cache's 8 bits (a scale per
    row, `terms` 8-bit terms each) for the tensor-core dots; "mma8k" quantizes q only, for the
    score dot, and "dp4a" q only, as two int8 terms, for integer dot products. Each output row
    stays within `bound` of its largest element (the XLA path's output is the reference),
    lengths on and off the 32-token block edges."""
    q, cache = _case(5, 64, 2, g, 32, quantized=quantized, seed=1)
    lengths = jnp.asarray([1, 32, 33, 64, 40], jnp.int32)
    ref = np.asarray(decode_attention(q, cache, 0, lengths - 1, 32 ** -0.5, impl="xla"))
    kw = dict(method=method, block_t=32, terms=terms, interpret=True)
    args = (q, cache.k[0], cache.v[0], cache.k_scale[0], cache.v_scale[0], lengths, 32 ** -0.5)
    out = np.asarray(ragged_decode_attention(*args, **kw))
    assert np.isfinite(out).all()
    rel = np.abs(out - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
    assert rel.max() < bound, rel.max()
    assert rel.max() > bound / 1000  # the quantized dots are not the float path
    splits = np.asarray(ragged_decode_attention(*args, num_splits=2, **kw))
    np.testing.assert_allclose(splits, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantized,splits", [(True, 1), ("fp8", 2), (False, 1)])
def test_several_kv_heads_per_program(quantized, splits):
    """heads=2 and 4 (one program reads a slot's rows of that many kv heads) give the one-head
    kernel's output up to float rounding, contiguous and paged."""
    q, cache = _case(5, 64, 4, 1, 32, quantized=quantized, seed=2)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    args = lambda c: (c.k[0], c.v[0], c.k_scale[0] if quantized else None,
                      c.v_scale[0] if quantized else None)
    kw = dict(block_t=16, method="fma", num_splits=splits, interpret=True)
    want = np.asarray(ragged_decode_attention(q, *args(cache), lengths, 0.2, **kw))
    assert np.isfinite(want).all()
    paged, table, _ = _paginate(cache, 16, seed=1)
    for heads in (2, 4):
        got = ragged_decode_attention(q, *args(cache), lengths, 0.2, heads=heads, **kw)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)
        got = ragged_decode_attention(q, *args(paged), lengths, 0.2, heads=heads, page_table=table, **kw)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="heads=3"):
        ragged_decode_attention(q, *args(cache), lengths, 0.2, heads=3, **kw)


def test_settings_checked_against_the_model_before_any_compile():
    """settings_error names what does not fit (one line); the engine refuses such decode_kernel
    settings with a ConfigError when asked for Pallas attention."""
    from engine.kernels.checks import settings_error
    from engine.llm import LLM
    from engine.settings import ConfigError

    assert settings_error(32, 1, 128, heads=2) == ""
    assert settings_error(8, 4, 128, page=64, method="mma8") == ""
    assert "heads=2" in settings_error(4, 2, 8, heads=2)
    assert "mma8" in settings_error(4, 1, 8, quantized=False, method="mma8")
    assert "page size 16" in settings_error(4, 1, 8, page=16, method="mma8")
    assert "num_splits=3" in settings_error(4, 1, 8, num_splits=3)
    with pytest.raises(ConfigError, match="decode_kernel: heads=2"):  # tiny-llama: G=2
        LLM("tiny-llama", attention="pallas", quantize_kv_cache=True, decode_kernel="heads=2",
            batch_size=2, max_cache_length=32, context_size=16)


def test_mma8_needs_an_8bit_cache():
    q, cache = _case(2, 32, 1, 1, 16, quantized=False)
    for method in ("mma8", "mma8k"):
        with pytest.raises(ValueError, match=f"method '{method}' reads an 8-bit cache"):
            ragged_decode_attention(q, cache.k[0], cache.v[0], None, None, jnp.asarray([1, 2]), 0.2,
                                    method=method, interpret=True)
    q, cache = _case(2, 32, 1, 1, 16, quantized="fp8")
    with pytest.raises(ValueError, match="method 'dp4a' reads an int8 cache"):
        ragged_decode_attention(q, cache.k[0], cache.v[0], cache.k_scale[0], cache.v_scale[0],
                                jnp.asarray([1, 2]), 0.2, method="dp4a", interpret=True)
    from engine.kernels.checks import settings_error
    assert "int8 cache" in settings_error(4, 1, 128, kv_dtype=jnp.float8_e4m3fn, method="dp4a")
    assert "at most 256" in settings_error(4, 1, 512, method="dp4a")
    assert settings_error(4, 1, 256, method="dp4a") == ""


def test_dp4a_query_terms_and_integer_scores():
    """The "dp4a" method's query, two int8 terms with a fixed ratio, carries about 15 bits; its
    integer scores are exact, and the largest one for 256-wide heads fits in int32."""
    from engine.kernels.dp4a import LO_RATIO, int_dots, two_terms
    r = np.random.default_rng(4)
    q = jnp.asarray(r.normal(size=(256,)) * 3, jnp.float32)
    hi, lo, scale = two_terms(q)
    assert hi.dtype == lo.dtype == jnp.int8
    back = (np.asarray(hi, np.float64) * LO_RATIO + np.asarray(lo, np.float64)) * float(scale)
    err = np.abs(back - np.asarray(q)).max() / np.abs(np.asarray(q)).max()
    assert 1e-7 < err < 2 ** -15, err
    k = jnp.asarray(r.integers(-127, 128, size=(8, 256)), jnp.int8)
    want = np.asarray(k, np.int64) @ (np.asarray(hi, np.int64) * LO_RATIO + np.asarray(lo, np.int64))
    np.testing.assert_array_equal(np.asarray(int_dots(k, hi, lo, interpret=True)), want)
    ext = jnp.full((1, 256), 127, jnp.int8)
    top = int(np.asarray(int_dots(ext, ext[0], ext[0], interpret=True))[0])
    assert top == 256 * 127 * 127 * (LO_RATIO + 1) < 2 ** 31


@pytest.mark.parametrize("method", ["fma", "dot"])
def test_flash_decoding_splits(method):
    """T split over 4 programs: chunks past a slot's length contribute nothing."""
    q, cache = _case(5, 64, 2, 2, 32, quantized=True, seed=3)
    _check(q, cache, LENGTHS, block_t=16, method=method, num_splits=4)


def test_block_not_dividing_cache_length_and_gqa3():
    """T=40 with 16-token blocks: the last block's loads are masked; G=3 (SmolLM2-style)."""
    q, cache = _case(4, 40, 1, 3, 16, quantized=True, seed=4)
    _check(q, cache, [1, 16, 40, 33], block_t=16, method="fma")


def test_masked_loads():
    q, cache = _case(5, 64, 2, 2, 32, quantized=True, seed=8)
    _check(q, cache, LENGTHS, block_t=16, mask_loads=True)


def test_unquantized_cache():
    q, cache = _case(4, 64, 2, 2, 32, quantized=False, seed=5)
    _check(q, cache, [1, 32, 64, 50], block_t=32)


def test_bf16_query():
    """bf16 q against an int8 cache, both paths ending in bf16."""
    q, cache = _case(4, 64, 2, 1, 32, quantized=True, seed=6, q_dtype=jnp.bfloat16)
    _check(q, cache, [1, 32, 64, 50], atol=2e-2, block_t=32)


def test_unfilled_cache_is_never_read():
    """Positions at and past each slot's length may hold anything (here NaN scales, huge values)."""
    q, cache = _case(3, 64, 2, 2, 32, quantized=True, seed=7)
    lengths = [5, 32, 64]
    ref = ragged_decode_attention(q, cache.k[0], cache.v[0], cache.k_scale[0], cache.v_scale[0],
                                  jnp.asarray(lengths), 0.2, block_t=16, interpret=True)
    mask = (jnp.arange(64)[None, :] < jnp.asarray(lengths)[:, None])[:, None, :]  # scales [B, Hkv, T]
    poisoned = [jnp.where(mask, s, jnp.nan) for s in (cache.k_scale[0], cache.v_scale[0])]
    out = ragged_decode_attention(q, cache.k[0], cache.v[0], *poisoned,
                                  jnp.asarray(lengths), 0.2, block_t=16, interpret=True)
    # Slot 0 ends mid-block: its tail rows are loaded but masked; other slots end on block edges.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_int8_conversions_are_exact():
    x = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8)
    np.testing.assert_array_equal(np.asarray(ic.int8_to_f32(x, "magic")), np.arange(-128, 128, dtype=np.float32))


def test_prmt_conversion_asm_is_exact():
    """Run the PTX of convert="prmt" (ic._PRMT_ASM) through a small emulator of xor.b32 and
    prmt.b32 on all 256 int8 values: the words it builds, as float32 minus 2**23 + 128, must be
    the values themselves, each in its own lane. (The GPU runs the real instructions; CPU
    tests interpret the kernel with "magic", which builds the same words.)"""
    import re
    x = np.arange(-128, 128, dtype=np.int8)
    regs = {"$4": x.view(np.uint32)}  # four values per 32-bit register, element 0 in byte 0
    for op, dst, a, b, *sel in re.findall(r"(xor|prmt)\.b32 (\S+), (\S+), (\w+)(?:, (\w+))?;", ic._PRMT_ASM):
        if op == "xor":
            regs[dst] = regs[a] ^ np.uint32(int(b, 16))
            continue
        pool = [(regs[a] >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)] + \
               [np.full_like(regs[a], (int(b, 16) >> (8 * i)) & 0xFF) for i in range(4)]
        c = int(sel[0], 16)
        regs[dst] = sum(pool[(c >> (4 * j)) & 7] << np.uint32(8 * j) for j in range(4)).astype(np.uint32)
    lanes = np.stack([regs[f"${i}"] for i in range(4)], axis=-1).reshape(-1)
    got = lanes.view(np.float32) - np.float32(ic._MAGIC_F)
    np.testing.assert_array_equal(got, x.astype(np.float32))


def test_conversion_methods_agree():
    q, cache = _case(5, 64, 2, 2, 32, quantized=True, seed=9)
    args = (q, cache.k[0], cache.v[0], cache.k_scale[0], cache.v_scale[0], jnp.asarray(LENGTHS), 0.2)
    outs = [np.asarray(ragged_decode_attention(*args, block_t=16, method="fma", convert=c, interpret=True))
            for c in ("cvt", "magic", "prmt")]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    with pytest.raises(ValueError):
        ragged_decode_attention(*args, convert="fast", interpret=True)


def test_kernel_settings_come_from_the_engine_config():
    """EngineConfig.decode_kernel is parsed and checked against the kernel's settings at once;
    explicit keyword arguments of the kernel take them over the defaults."""
    from engine.config import EngineConfig, kernel_settings
    from engine.kernels.settings import resolve
    from engine.settings import ConfigError
    assert kernel_settings("block_t=32, method=dot,num_splits=2") == (
        ("block_t", 32), ("method", "dot"), ("num_splits", 2))
    s = resolve(**dict(kernel_settings("block_t=32,method=dot")), num_warps=8)
    assert (s["block_t"], s["method"], s["num_splits"], s["num_warps"]) == (32, "dot", 1, 8)
    for bad, match in (("blok_t=32", "unknown ragged decode setting 'blok_t'"), ("method=fast", "method must be"),
                       ("block_t", "not KEY=VALUE"), ("num_warps=x", "must be an integer")):
        with pytest.raises(ConfigError, match=match):
            EngineConfig(decode_kernel=bad)


def test_engine_pallas_decode_matches_xla():
    """LLM(attention="pallas") with an int8 cache decodes the same greedy tokens as "xla"."""
    from engine.llm import LLM
    from engine.request import Request, SamplingParams
    from tests.tiny import byte_tokenizer

    # One prefill bucket and small shapes: most of the time here is compiling two engines.
    kw = dict(max_cache_length=32, context_size=16, min_prefill_bucket=16, decode_steps=4,
              prefill_batch=2, batch_size=2, quantize_kv_cache=True, tokenizer=byte_tokenizer())
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 256, size=n)] for n in (3, 15)]

    def run(attn):
        llm = LLM("tiny-llama", attention=attn, **kw)
        assert llm.engine_info()["decode_attention"] == attn
        reqs = [Request(id=i, prompt_token_ids=p, sampling=SamplingParams(max_tokens=14, ignore_eos=True))
                for i, p in enumerate(prompts)]
        return [r.completion_token_ids for r in llm.generate_all(reqs)]

    assert run("pallas") == run("xla")


def _paginate(cache, page, seed=0):
    """The contiguous cache [B, T, ...] as shuffled pages plus one trash page, and its table."""
    k = np.asarray(cache.k[0])
    b, t = k.shape[:2]
    w = t // page
    order = np.random.default_rng(seed).permutation(b * w)  # slot b's page j -> order[b*w + j]
    table = order.reshape(b, w).astype(np.int32)
    trash = b * w

    def pages(x):  # [B, T, ...] -> [B*W + 1, page, ...], trash page full of garbage
        out = np.full((b * w + 1, page) + x.shape[2:], 77, x.dtype)
        out[order] = x.reshape(b * w, page, *x.shape[2:])
        return jnp.asarray(out)

    def scale_pages(x):  # [B, Hkv, T] -> [B*W + 1, Hkv, page]
        hkv = x.shape[1]
        y = np.asarray(x).reshape(b, hkv, w, page).transpose(0, 2, 1, 3).reshape(b * w, hkv, page)
        out = np.full((b * w + 1, hkv, page), np.nan, np.float32)
        out[order] = y
        return jnp.asarray(out)

    paged = KVCache([pages(k)], [pages(np.asarray(cache.v[0]))])
    if cache.quantized:
        paged = KVCache(paged.k, paged.v, [scale_pages(cache.k_scale[0])], [scale_pages(cache.v_scale[0])])
    return paged, jnp.asarray(table), trash


@pytest.mark.parametrize("g,splits", [(1, 1), (2, 2)])
def test_dp4a_with_token_minor_v(g, splits):
    """v_layout "dt" (V stored [.., Hkv, D, T]): p @ V on dp4a too, within the quantized-query
    bound of the XLA path, and paged pages give the contiguous output bit for bit."""
    q, cache = _case(5, 64, 2, g, 32, quantized=True, seed=20 + g)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    ref = np.asarray(decode_attention(q, cache, 0, lengths - 1, 0.2, impl="xla"))
    kw = dict(block_t=16, method="dp4a", num_splits=splits, v_layout="dt", interpret=True)
    vt = jnp.transpose(cache.v[0], (0, 2, 3, 1))  # [B, Hkv, D, T]
    out = np.asarray(ragged_decode_attention(q, cache.k[0], vt, cache.k_scale[0], cache.v_scale[0],
                                             lengths, 0.2, **kw))
    rel = np.abs(out - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
    assert 1e-7 < rel.max() < 3e-4, rel.max()
    paged, table, _ = _paginate(cache, 16, seed=g)
    got = ragged_decode_attention(q, paged.k[0], jnp.transpose(paged.v[0], (0, 2, 3, 1)),
                                  paged.k_scale[0], paged.v_scale[0], lengths, 0.2, page_table=table, **kw)
    np.testing.assert_array_equal(np.asarray(got), out)
    with pytest.raises(ValueError, match="v_layout 'dt'"):
        ragged_decode_attention(q, cache.k[0], vt, cache.k_scale[0], cache.v_scale[0], lengths, 0.2,
                                method="fma", v_layout="dt", interpret=True)


@pytest.mark.parametrize("g,method,splits,quantized", [(1, "fma", 1, True), (2, "dot", 2, True),
                                                       (2, "fma", 1, False), (1, "mma8", 1, True),
                                                       (1, "mma8k", 2, True), (2, "dp4a", 2, True)])
def test_paged_cache_matches_contiguous(g, method, splits, quantized):
    """Shuffled pages through a page table give the contiguous kernel's output bit for bit,
    and the XLA path (which gathers the pages) agrees with the contiguous XLA path."""
    q, cache = _case(5, 64, 2, g, 32, quantized=quantized, seed=10 + g)
    block = 32 if method.startswith("mma8") else 16  # the 8-bit tensor cores' smallest K is 32
    paged, table, _ = _paginate(cache, block, seed=g)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    args = lambda c: (c.k[0], c.v[0], c.k_scale[0] if quantized else None,
                      c.v_scale[0] if quantized else None)
    kw = dict(block_t=block, method=method, num_splits=splits, interpret=True)
    want = ragged_decode_attention(q, *args(cache), lengths, 0.2, **kw)
    got = ragged_decode_attention(q, *args(paged), lengths, 0.2, page_table=table, **kw)
    assert np.isfinite(np.asarray(want)).all()  # the trash page's NaN scales are never read
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    pos = lengths - 1
    ref = decode_attention(q, cache, 0, pos, 0.2, impl="xla")
    out = decode_attention(q, paged, 0, pos, 0.2, impl="xla", page_table=table)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6, rtol=0)


def test_paged_blocks_smaller_than_a_page():
    """block_t 16 inside 32-token pages: two blocks per page, the second at offset 16."""
    q, cache = _case(4, 64, 2, 1, 32, quantized=True, seed=21)
    paged, table, _ = _paginate(cache, 32, seed=5)
    lengths = jnp.asarray([1, 17, 33, 64], jnp.int32)
    want = ragged_decode_attention(q, cache.k[0], cache.v[0], cache.k_scale[0], cache.v_scale[0],
                                   lengths, 0.2, block_t=16, interpret=True)
    got = ragged_decode_attention(q, paged.k[0], paged.v[0], paged.k_scale[0], paged.v_scale[0],
                                  lengths, 0.2, page_table=table, block_t=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
