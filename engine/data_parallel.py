"""Data parallel within one process: N/M engines of one model over N devices ("gpu=8/2"), one
stream of requests.

Each replica is an `LLM` on its own group of devices (tensor parallel within the group). The
requests are put in serving order once, here (longest first within each schedule window, as one
engine would), and the replicas, whose batchers take requests in arrival order, pull the next one
from that shared source only when they have a free slot: a replica that finishes short requests
takes more of them, no static split, every device busy until the source runs dry. Replicas run in threads; JAX
releases the GIL while the devices compute. Results come back in completion order, as from
`LLM.generate`.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, Optional, Union

from engine.admission import serving_order
from engine.config import Settings, device_groups, make_settings
from engine.llm import LLM, _as_request, in_input_order
from engine.request import Request, Result, SamplingParams
from engine.sched_stats import slot_occupancy

# Counters that describe a pool's size or peak rather than work done: the replicas' largest.
_SIZES = ("kv_pages", "kv_pages_peak")


class DataParallelLLM:
    """`LLM`'s serving interface over every engine group of the platform."""

    def __init__(self, model: Optional[str] = None, tokenizer=None, *, settings: Optional[Settings] = None,
                 **flat):
        self.settings = make_settings(model, settings, **flat)
        groups = device_groups(self.settings.engine.platform)[1]
        self.replicas = [LLM(tokenizer=tokenizer, settings=self.settings, device_group=g) for g in range(groups)]
        for r in self.replicas:  # ordered once, in generate; each replica takes what comes
            r.set_scheduler(schedule="arrival")
        first = self.replicas[0]
        self.tokenizer, self.model_name = first.tokenizer, first.model_name
        self.load_time_s = sum(r.load_time_s for r in self.replicas)

    @property
    def engine_config(self):
        return self.replicas[0].engine_config

    @property
    def model_config(self):
        return self.replicas[0].model_config

    def engine_info(self) -> dict:
        return dict(self.replicas[0].engine_info(), engines=len(self.replicas))

    def device_info(self) -> dict:
        info = dict(self.replicas[0].device_info())
        info["device_count"] = sum(r.device_info().get("device_count", 0) for r in self.replicas)
        info["engines"] = len(self.replicas)
        return info

    def validate(self, request: Request) -> None:
        self.replicas[0].validate(request)

    def render_chat(self, messages: list[dict]) -> str:
        return self.replicas[0].render_chat(messages)

    def generate(self, requests: Iterable[Union[Request, str]],
                 sampling: Optional[SamplingParams] = None) -> Iterator[Result]:
        """Yield a Result per request as each finishes, from whichever replica served it."""
        sampling = sampling or self.settings.sampling
        batcher = self.replicas[0]._batcher
        source = serving_order((_as_request(i, r, sampling) for i, r in enumerate(requests)),
                               self.settings.scheduler, batcher.geo, batcher.prepare)
        lock = threading.Lock()
        out: queue.Queue = queue.Queue()

        def pull():
            while True:
                with lock:
                    item = next(source, None)
                if item is None:
                    return
                if isinstance(item, Result):  # refused by validation: its error Result as is
                    out.put((item, None))
                    continue
                yield item[0]

        def serve(replica):
            try:
                for res in replica.generate(pull()):
                    out.put((res, None))
            except BaseException as e:  # re-raised in the caller's thread
                out.put((None, e))
            out.put((None, None))

        threads = [threading.Thread(target=serve, args=(r,), daemon=True, name=f"jetbeam-engine-{i}")
                   for i, r in enumerate(self.replicas)]
        for t in threads:
            t.start()
        running, error = len(threads), None
        while running:
            res, exc = out.get()
            if res is not None:
                yield res
            elif exc is not None:
                error = error or exc
            else:
                running -= 1
        if error is not None:
            raise error

    def generate_all(self, requests, sampling: Optional[SamplingParams] = None) -> list[Result]:
        """Like generate, but returns the Results in input order."""
        return in_input_order(self.generate, requests, sampling or self.settings.sampling)

    def stats(self) -> dict:
        """The replicas' counters summed (pool sizes: the largest), and how many requests each served."""
        each = [r.stats() for r in self.replicas]
        out: dict = {}
        for st in each:
            for k, v in st.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = max(out.get(k, v), v) if k in _SIZES else out.get(k, 0) + v
        if "decode_calls" in out:  # per-call means over every replica's calls
            out.update(slot_occupancy(out.get("live_slots", 0), out["decode_calls"],
                                      self.replicas[0].engine_config.batch_size))
        out["completed_per_engine"] = [st.get("completed", 0) for st in each]
        return out

    def reset_stats(self, prefix_cache: bool = False) -> None:
        for r in self.replicas:
            r.reset_stats(prefix_cache)


def serving_llm(settings: Settings) -> Union[LLM, DataParallelLLM]:
    """The process's model server for `settings`: one LLM, or one per engine group of "gpu=N/M"."""
    if device_groups(settings.engine.platform)[1] > 1:
        return DataParallelLLM(settings=settings)
    return LLM(settings=settings)
