"""The continuous batcher's scheduling counters and the occupancy derived from them.

Kept apart from engine/batcher.py (which imports JAX) so that the pipeline's metrics step
and the benchmarks can summarise them without loading the engine.
"""

from __future__ import annotations

# Running counters of how the slots were used (`ContinuousBatcher.scheduler_stats`):
# live_slots summed over decode calls / decode_calls is the mean number of slots decoding a
# request per call; page_waits counts refills held back by a full page pool; cached_prompt_tokens
# counts prompt tokens read from cached pages instead of prefilled (prefix caching);
# prompt_tokens counts the prompt tokens admitted (once per request, whatever its samples);
# prefill_tokens counts the token positions prefill calls computed, padding to the call's bucket
# or packed row included (against prompt_tokens less cached_prompt_tokens, the share spent on
# padding: prefill_padding).
SCHEDULER_STATS = ("decode_calls", "live_slots", "prefill_calls", "refills", "page_waits", "prompt_tokens",
                   "cached_prompt_tokens", "prefill_tokens")


def slot_occupancy(live_slots: int, decode_calls: int, batch_size) -> dict:
    """Mean slots decoding a request per decode call, and that as a share of batch_size."""
    if not decode_calls:
        return {"mean_live_slots": None, "slot_occupancy": None}
    mean = live_slots / decode_calls
    return {"mean_live_slots": round(mean, 2),
            "slot_occupancy": round(mean / batch_size, 3) if batch_size else None}


def prefill_padding(prompt_tokens: int, cached_prompt_tokens: int, prefill_tokens: int):
    """The share of the prefill calls' token positions that were padding (None before any call)."""
    if not prefill_tokens:
        return None
    return round(1 - (prompt_tokens - cached_prompt_tokens) / prefill_tokens, 3)
