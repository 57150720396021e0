"""The batcher's schedule without a model: how many decode and prefill calls a run makes, how
full its slots and page pool get, on CPU in seconds.

`throughput.py --dry_run` swaps the engine for `ScheduleOnlyEngine`: the real JaxEngine's
shapes and rules (prefill buckets and call sizes, slots, decode steps per call, the page pool)
with every model call replaced by host arrays of a filler token. The real ContinuousBatcher
runs over it, so refills, early refill, min_refill, parking, page admission and the schedule
order are the ones a device run takes. With EOS ignored, every request's length is its
max_tokens whatever the tokens are, so the counts equal a device run's: on the H100 the
ShareGPT-like mix made 197 decode and 266 prefill calls in arrival order and 128 and 243
longest first (BENCHMARKS.md, session 5), and this dry run makes the same
(tests/test_throughput_harness.py). Use it to choose slots, kv_cache_tokens and min_refill
for a length distribution before paying for a device; it gives counts, not times.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine.engine import JaxEngine
from engine.engine_api import ResultTokens

FILLER = 3  # a token id that no model config uses as EOS


class ScheduleOnlyEngine(JaxEngine):
    """JaxEngine's configuration, buckets and page geometry; no weights, cache or device work."""

    def load_params(self):
        return None

    def init_decode_state(self):  # the batcher passes it along and reads .tokens to time inserts
        return SimpleNamespace(tokens=np.zeros(self.config.batch_size, np.int32))

    def prefill(self, *, params, padded_tokens, true_length, existing_prefix=None, sampling=None):
        tokens = np.asarray(padded_tokens)
        if tokens.shape[-1] not in self.buckets:
            raise ValueError(f"padded length {tokens.shape[-1]} is not a prefill bucket {self.buckets}")
        lengths = np.atleast_1d(np.asarray(true_length, np.int32))
        n = len(lengths)
        return None, ResultTokens(np.full((n, 1), FILLER, np.int32), np.ones((n, 1), bool), lengths[:, None])

    def insert(self, prefix, decode_state, slot, page_rows=None):
        return decode_state

    def release_slots(self, decode_state, slots):
        return decode_state

    def generate(self, params, decode_state, max_length=None):
        b, steps = self.config.batch_size, self.config.decode_steps
        toks = np.full((b, steps), FILLER, np.int32)
        return decode_state, ResultTokens(toks, np.ones((b, steps), bool), np.zeros((b, steps), np.int32))


def dry_run(ec, mc, requests, warm_requests=()) -> dict:
    """Run `requests` (after `warm_requests`, as throughput.py's warm-up pass does) through the
    real batcher over a ScheduleOnlyEngine of EngineConfig `ec` and ModelConfig `mc`; return
    the batcher's counters for the second run."""
    from engine.batcher import ContinuousBatcher
    from engine.sched_stats import slot_occupancy

    batcher = ContinuousBatcher(ScheduleOnlyEngine(ec, mc), params=None)
    for _ in batcher.run(list(warm_requests)):
        pass
    batcher.stats.clear()
    results = list(batcher.run(requests))
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} requests failed, e.g. {bad[0].error}")
    out = batcher.scheduler_stats()
    out.update(requests=len(results), slots=ec.batch_size,
               generated_tokens=sum(r.completion_tokens for r in results),
               released_slots=int(batcher.stats.get("released_slots", 0)))
    out.update(slot_occupancy(out["live_slots"], out["decode_calls"], ec.batch_size))
    return out
