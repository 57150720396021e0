"""Tensor parallel over simulated CPU devices gives the same greedy tokens as one device, and so
do data-parallel engines ("cpu=4/2"). One CPU device runs the chunked KV cache, several the
token-major one (EngineConfig.kv_layout): the comparisons cover both layouts.

XLA's host device count is fixed when jax starts, so the sharded runs happen in a child
process started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import REPO

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from engine.batcher import ContinuousBatcher
    from engine.config import make_settings
    from engine.llm import load_engine
    from engine.request import Request, SamplingParams
    out = {}
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 256, size=n)] for n in (3, 11, 16, 7, 15)]
    runs = [("tiny-llama", p, False, 0) for p in ("cpu", "cpu=4")]
    runs += [("tiny-llama", "cpu", True, 0)]
    runs += [("tiny-gemma", p, False, 0) for p in ("cpu", "cpu=8")]
    runs += [("tiny-llama", "cpu=4", True, 8)]  # a paged int8 cache, split by KV head
    runs += [("tiny-llama", p, "w8a8_int8", 0) for p in ("cpu", "cpu=4")]  # [out, in] 8-bit weights
    runs = [r + ("auto",) for r in runs]
    # the ragged Pallas kernel (interpreted here) on an int8 cache, contiguous and paged: run per
    # device through shard_map under tensor parallelism
    runs += [("tiny-llama", "cpu=4", True, 16, "pallas")]
    part, parts = map(int, sys.argv[1:3])
    for model, platform, q, page, attention in runs[part::parts]:
        loaded = load_engine(make_settings(
            model, platform=platform, batch_size=2, max_cache_length=48 if attention == "pallas" else 40,
            context_size=16, decode_steps=4, prefill_batch=2, quantize_weights=q, quantize_kv_cache=bool(q),
            kv_page_size=page, attention=attention))  # the kernel's pages: whole 16-token blocks
        eng = loaded.engine
        layer = loaded.params["layers"][0]
        wq = layer.get("wq", layer.get("wqkv"))  # one device: q|k|v fused (engine/weights.py)
        wq = getattr(wq, "q", wq)
        batcher = ContinuousBatcher(eng, loaded.params)
        res = sorted(batcher.run([Request(id=i, prompt_token_ids=p,
                                          sampling=SamplingParams(max_tokens=12, ignore_eos=True))
                                  for i, p in enumerate(prompts)]), key=lambda r: r.id)
        cache = batcher.state.cache.k[0]  # the live (not donated) cache
        cache = cache[0] if isinstance(cache, tuple) else cache  # one device: a chunked cache's first block
        out[f"{model}|{platform}" + ("|paged" if page else "") + f"|{q}" + ("|pallas" if attention == "pallas" else "")] = {
            "kernel_per_device": eng._kernel_mesh is not None,
            "tokens": [r.completion_token_ids for r in res],
            "devices": int(eng.mesh.devices.size),
            "wq_shards": len({str(s.index) for s in wq.addressable_shards}),
            "cache_shards": len({str(s.index) for s in cache.addressable_shards}),
        }
        if page and attention != "pallas":  # what kv_cache_tokens=auto counts per device, against the real sharded pool
            from engine import kv_budget
            c = batcher.state.cache
            shard = sum(x.addressable_shards[0].data.nbytes for part in (c.k, c.v, c.k_scale, c.v_scale)
                        for x in part)
            out["auto"] = {"pool_bytes_per_token": shard / ((eng.num_kv_pages + 1) * page),
                           "counted": kv_budget.cache_bytes_per_token(eng.model_config, eng.dtype, True,
                                                                      kv_shards=eng.mesh.size),
                           "workspace": eng.workspace_bytes()}
    if part == 1:  # data parallel: two engines of two devices each (engine/data_parallel.py)
        from engine.data_parallel import serving_llm
        dp = serving_llm(make_settings("tiny-llama", platform="cpu=4/2", batch_size=2, max_cache_length=40,
                                       context_size=16, decode_steps=4, prefill_batch=2, quantize_weights=True,
                                       quantize_kv_cache=True))
        reqs = [Request(id=i, prompt_token_ids=p, sampling=SamplingParams(max_tokens=12, ignore_eos=True))
                for i, p in enumerate(prompts * 2 + [[5] * 20])]  # the last: longer than context_size
        first = dp.generate_all(reqs)
        again = sorted(dp.generate(reqs), key=lambda r: r.id)  # compiled now: both replicas pull
        out["dp"] = {"type": type(dp).__name__,
                     "devices": [[d.id for d in r._engine.mesh.devices.flat] for r in dp.replicas],
                     "ids": [r.id for r in again], "errors": [r.id for r in again if r.error],
                     "first": [r.completion_token_ids for r in first[:len(prompts)]],
                     "again": [r.completion_token_ids for r in again[len(prompts):2 * len(prompts)]],
                     "per_engine": dp.stats()["completed_per_engine"], "device_info": dp.device_info()}
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def runs():
    """Every run's results, from two child processes that split the runs (compiling is mostly
    single-threaded: two at once use both cores of a CI machine)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(i), "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(2)]
    out = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out.update(json.loads(stdout))
    return out


@pytest.mark.parametrize("model,quantized,platforms", [
    ("tiny-llama", False, ("cpu=4",)),
    ("tiny-gemma", False, ("cpu=8",)),
    ("tiny-llama", True, ("cpu=4|paged",)),
    ("tiny-llama", "w8a8_int8", ("cpu=4",)),
])
def test_sharded_greedy_equals_single_device(runs, model, quantized, platforms):
    one = runs[f"{model}|cpu|{quantized}"]
    assert one["devices"] == 1
    for platform in platforms:
        n = int(platform.split("=")[1].split("|")[0])
        many = runs[f"{model}|{platform}|{quantized}"]
        assert many["devices"] == n
        assert many["tokens"] == one["tokens"]


def test_weights_and_cache_are_actually_split(runs):
    # tiny-llama: 8 query heads / 4 KV heads: on 4 devices both split 4 ways.
    assert runs["tiny-llama|cpu=4|False"]["wq_shards"] == 4
    assert runs["tiny-llama|cpu=4|False"]["cache_shards"] == 4
    assert runs["tiny-llama|cpu=4|paged|True"]["cache_shards"] == 4  # the page pool, by KV head
    assert runs["tiny-llama|cpu=4|w8a8_int8"]["wq_shards"] == 4  # [out, in]: split by output rows
    # tiny-gemma: 4 heads, 1 KV head (multi-query): cache replicated everywhere; on 8 devices
    # the heads do not divide, so the weights stay whole too.
    assert runs["tiny-gemma|cpu=8|False"]["wq_shards"] == 1  # 4 heads do not split 8 ways
    assert runs["tiny-gemma|cpu=8|False"]["cache_shards"] == 1


def test_auto_pool_counts_bytes_per_device(runs):
    """kv_cache_tokens=auto on a mesh: the bytes per token it counts on each device equal what
    one device's shard of the real int8 page pool (K, V and scales, split by KV head) holds,
    and the workspace analysis compiles the sharded prefill and decode programs."""
    auto = runs["auto"]
    assert auto["counted"] == auto["pool_bytes_per_token"] and auto["workspace"] > 0


def test_pallas_kernel_runs_per_device(runs):
    """Under tensor parallelism the ragged Pallas kernel runs on each device's own heads
    (shard_map) and gives the single-device tokens (XLA path), here through a paged int8 cache."""
    many = runs["tiny-llama|cpu=4|paged|True|pallas"]
    assert many["kernel_per_device"] and many["cache_shards"] == 4
    assert many["tokens"] == runs["tiny-llama|cpu|True"]["tokens"]


def test_data_parallel_replicas_split_devices_and_keep_tokens(runs):
    """platform cpu=4/2: two engines on disjoint pairs of devices; every request gets exactly
    one Result (a refused prompt its error), with the single-device tokens; both replicas serve."""
    dp, one = runs["dp"], runs["tiny-llama|cpu|True"]["tokens"]
    assert dp["type"] == "DataParallelLLM" and [len(d) for d in dp["devices"]] == [2, 2]
    assert len({i for d in dp["devices"] for i in d}) == 4
    assert dp["ids"] == list(range(11)) and dp["errors"] == [10]
    assert dp["first"] == one and dp["again"] == one
    assert sum(dp["per_engine"]) == 2 * 10 and all(n > 0 for n in dp["per_engine"])
    assert dp["device_info"]["engines"] == 2 and dp["device_info"]["device_count"] == 4
