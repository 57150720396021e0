"""The batcher's schedule without a model: how many decode and prefill calls a run makes, how
full its slots and page pool get, on CPU in seconds.

`throughput.py --dry_run` runs the real ContinuousBatcher over the fake engine
(engine/fake_engine.py) with the geometry the JaxEngine of the same settings has: prefill
buckets and call sizes, slots, decode steps per call, the page pool. So refills, early refill,
min_refill, parking, page admission and the serving order are the ones a device run takes. With
EOS ignored, every request's length is its max_tokens whatever the tokens are, so the counts equal
a device run's (tests/benchmarks checks them against a real engine on CPU). Use it to choose
slots, kv_cache_tokens and min_refill for a length distribution before paying for a device; it
gives counts, not times.
"""

from __future__ import annotations

from engine.config import Settings
from engine.engine_api import geometry_of
from engine.fake_engine import FakeEngine


def _fake_batcher(settings: Settings, mc):
    from engine.batcher import ContinuousBatcher
    ec = settings.engine
    if ec.kv_cache_tokens == "auto":
        raise SystemExit("--dry_run has no device memory to size kv_cache_tokens=auto: give the number "
                         "of tokens (a device run reports the number 'auto' chose as kv_cache_tokens)")
    return ContinuousBatcher(FakeEngine(geometry_of(ec, mc.vocab_size, mc.eos_token_ids)), params=None,
                             scheduler=settings.scheduler)


def prefill_shapes(settings_list: list, mc, requests, warm_requests=()) -> set:
    """(prompt count, bucket) of every whole-prompt prefill call the batcher makes serving
    `warm_requests` then `requests` under each Settings of `settings_list` (a timed run and its
    scheduler variants): the shapes throughput.py compiles up front so its timed runs compile
    nothing. Prefills that continue a cached prefix are not included."""
    out = set()
    for settings in settings_list:
        batcher = _fake_batcher(settings, mc)
        for reqs in (warm_requests, requests):
            for _ in batcher.run(list(reqs)):
                pass
        out |= {(c[1], c[2]) for c in batcher.engine.calls if c[0] == "prefill" and len(c) == 3}
    return out


def dry_run(settings: Settings, mc, requests, warm_requests=()) -> dict:
    """Run `requests` (after `warm_requests`, as throughput.py's warm-up pass does) through the
    real batcher over a FakeEngine of `settings`' geometry and ModelConfig `mc`; return the
    batcher's counters for the second run."""
    from engine.sched_stats import prefill_padding, slot_occupancy

    ec = settings.engine
    batcher = _fake_batcher(settings, mc)
    for _ in batcher.run(list(warm_requests)):
        pass
    batcher.stats.clear()
    if batcher.pages is not None:  # as throughput.py's timed runs: no prompt pages cached yet
        batcher.pages.forget_prefixes()
    results = list(batcher.run(requests))
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} requests failed, e.g. {bad[0].error}")
    out = batcher.scheduler_stats()
    prompt = int(batcher.stats.get("prompt_tokens", 0))
    out.update(prompt_tokens=prompt,
               prefill_padding=prefill_padding(prompt, out["cached_prompt_tokens"], out["prefill_tokens"]))
    out.update(requests=len(results), slots=ec.batch_size,
               generated_tokens=sum(r.completion_tokens for r in results),
               released_slots=int(batcher.stats.get("released_slots", 0)))
    out.update(slot_occupancy(out["live_slots"], out["decode_calls"], ec.batch_size))
    return out


