"""Token-throughput metrics: one run's numbers (metrics-<run>.json, .csv) and the directory's
summary over every run that wrote there (metrics.json, metrics.csv).

A run's numbers come from the files it committed and the engines' per-flush statistics; the
summary lists each run from its manifest with the rows its pieces still hold, so a resume adds
a run to the summary and never erases the numbers of the runs before it.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Optional

from engine.sched_stats import SCHEDULER_STATS, prefill_padding, slot_occupancy
from transforms.output_dir import COMPLETIONS, ERRORS, Scan, to_json

def _percentile(quantiles: list, p: int) -> Optional[float]:
    """p-th percentile from ApproximateQuantiles' 101 values (0th..100th)."""
    if not quantiles:
        return None
    i = round(p / 100 * (len(quantiles) - 1))
    return float(quantiles[int(i)])


def compute_metrics(*, files: list, stats: list, ttft_q: list, latency_q: list, rows_in: int,
                    skipped: int, launch_time: float, end_time: float, run_id: str,
                    output_dir: str, options: dict) -> dict:
    comp = [f for f in files if f["kind"] == "completions"]
    errs = [f for f in files if f["kind"] == "errors"]
    completed = sum(f["rows"] for f in comp)  # input rows; with n samples each has n completion rows
    errored = sum(f["rows"] for f in errs)
    prompt_tokens = sum(f.get("prompt_tokens", 0) for f in comp)
    generated = sum(f.get("completion_tokens", 0) for f in comp)
    errors_by_stage: dict = {}
    for f in errs:
        for k, v in (f.get("by_stage") or {}).items():
            errors_by_stage[k] = errors_by_stage.get(k, 0) + v
    if stats:
        gen_wall = max(s["t_end"] for s in stats) - min(s["t_start"] for s in stats)
    else:
        gen_wall = 0.0
    job_wall = max(end_time - launch_time, 0.0)
    engines: dict = {}
    for s in stats:
        engines.setdefault(s["engine"], s)
    first = next(iter(engines.values()), None)
    dev = (first or {}).get("device_info") or {}

    def rate(x, t):
        return round(x / t, 3) if t > 0 else None

    def r6(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 6)

    return {
        "run_id": run_id,
        "output": output_dir,
        "model": (first or {}).get("model") or (options.get("settings") or {}).get("model"),
        "rows_in": rows_in,
        "rows_skipped_existing": skipped,
        "rows_served": rows_in - skipped,
        "completed": completed,
        "completion_rows": sum(f.get("completion_rows", f["rows"]) for f in comp),
        "errored": errored,
        "errors_by_stage": errors_by_stage,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_time_s": round(gen_wall, 3),
        "job_wall_time_s": round(job_wall, 3),
        "output_tok_per_s": rate(generated, gen_wall),
        "total_tok_per_s": rate(prompt_tokens + generated, gen_wall),
        "requests_per_s": rate(completed, gen_wall),
        "job_output_tok_per_s": rate(generated, job_wall),
        "ttft_p50_s": r6(_percentile(ttft_q, 50)),
        "ttft_p90_s": r6(_percentile(ttft_q, 90)),
        "ttft_p99_s": r6(_percentile(ttft_q, 99)),
        "latency_p50_s": r6(_percentile(latency_q, 50)),
        "latency_p90_s": r6(_percentile(latency_q, 90)),
        "latency_p99_s": r6(_percentile(latency_q, 99)),
        "engines": len(engines),
        "engine_flushes": len(stats),
        "engine_load_time_s": round(max((s.get("load_time_s") or 0) for s in engines.values()), 3) if engines else None,
        "engine_config": (first or {}).get("engine_config"),
        "scheduler": scheduler_metrics(stats, ((first or {}).get("engine_config") or {}).get("batch_size")),
        "device_kind": dev.get("device_kind"),
        "device_count": sum(int((s.get("device_info") or {}).get("device_count") or 0) for s in engines.values()),
        "devices_per_engine": dev.get("device_count"),
        "completions_files": len(comp),
        "errors_files": len(errs),
        "options": options,
    }


def scheduler_metrics(stats: list, batch_size) -> dict:
    """How the decode slots were used, over every flush of every engine: the batcher's counts
    summed, the mean number of slots decoding per call (and as a share of batch_size), the
    share of prefill positions spent on padding, and for
    a paged KV cache the most pages any flush held at once against the pool's size. A low
    occupancy with page_waits > 0 says the pool, not the slot count, limits the job."""
    per = [s.get("scheduler") or {} for s in stats]
    out = {k: sum(int(p.get(k, 0)) for p in per) for k in SCHEDULER_STATS}
    out.update(slot_occupancy(out["live_slots"], out["decode_calls"], batch_size))
    out["prefill_padding"] = prefill_padding(out["prompt_tokens"], out["cached_prompt_tokens"], out["prefill_tokens"])
    peaks = [p["kv_pages_peak"] for p in per if "kv_pages_peak" in p]
    if peaks:
        out["kv_pages_peak"] = max(peaks)
        out["kv_pages"] = max(p["kv_pages"] for p in per if "kv_pages" in p)
    return out


def metrics_csv(metrics: dict) -> str:
    flat = {k: (to_json(v) if isinstance(v, (dict, list)) else v) for k, v in metrics.items()}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flat))
    w.writeheader()
    w.writerow(flat)
    return buf.getvalue()




RUN_FIELDS = ("rows_in", "rows_skipped_existing", "rows_served", "completed", "errored", "generated_tokens",
              "wall_time_s", "job_wall_time_s", "output_tok_per_s", "model")


def directory_summary(output_dir: str, manifests: list, scan: Scan, now: float) -> dict:
    """Every run that wrote to `output_dir`: its status and numbers, and the rows each still holds."""
    runs = []
    for m in manifests:
        held = scan.rows_by_run.get(m["run_id"], {})
        status = m.get("status", "running")
        if status == "running" and m.get("ended") is None and m is not manifests[-1]:
            status = "stopped early"
        entry = {"run_id": m["run_id"], "status": status, "started": m.get("started"),
                 "ended": m.get("ended"), "mode": m.get("mode"),
                 "committed_completions": held.get(COMPLETIONS, 0), "committed_errors": held.get(ERRORS, 0),
                 "metrics": f"metrics-{m['run_id']}.json" if m.get("metrics") else None}
        entry.update({k: (m.get("metrics") or {}).get(k) for k in RUN_FIELDS})
        runs.append(entry)
    return {"output": output_dir, "updated": now, "completions": scan.completions, "errors": scan.errors,
            "rows": scan.completions + scan.errors, "runs": runs,
            "latest_run": manifests[-1]["run_id"] if manifests else None}


def summary_csv(summary: dict) -> str:
    """One line per run."""
    buf = io.StringIO()
    fields = ["run_id", "status", "started", "ended", "mode", "committed_completions", "committed_errors",
              *RUN_FIELDS]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in summary["runs"]:
        w.writerow(r)
    return buf.getvalue()
