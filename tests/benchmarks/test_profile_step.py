"""benchmarks/trace.py's reading of a profiler trace, on a trace shaped like the ones an
H100 writes: device process "/device:GPU:0" with a stream line holding one event
per kernel, plus host lines that must not count. On CPU the profiler records no device kernels,
so the parser is checked on this file instead."""

from __future__ import annotations

import gzip
import json
import os

from benchmarks.trace import category, device_events, device_kernels, idle_gaps, summarize


def _write_trace(folder, events):
    d = os.path.join(folder, "plugins", "profile", "run1")
    os.makedirs(d)
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 14, "name": "thread_name",
         "args": {"name": "Stream #14(MemcpyD2D,MemcpyD2H,Compute,Memset)"}},
        {"ph": "M", "pid": 1, "tid": 99, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    with gzip.open(os.path.join(d, "vm.trace.json.gz"), "wt") as f:
        json.dump({"displayTimeUnit": "ns", "metadata": {}, "traceEvents": meta + events}, f)


def test_sums_stream_kernels_per_step(tmp_path):
    ev = []
    for _ in range(2):  # two decode steps
        ev += [{"ph": "X", "pid": 1, "tid": 14, "name": "ragged_decode_attention", "ts": 0, "dur": 350.0},
               {"ph": "X", "pid": 1, "tid": 14, "name": "nvjet_sm90_tst_192x128_64x5_4x2_h_bz_coopB_NNT",
                "ts": 0, "dur": 74.0},
               {"ph": "X", "pid": 1, "tid": 14, "name": "gemm_fusion_dot_general_518", "ts": 0, "dur": 10.0},
               {"ph": "X", "pid": 1, "tid": 14, "name": "input_scatter_fusion_127", "ts": 0, "dur": 8.0},
               {"ph": "X", "pid": 1, "tid": 14, "name": "loop_add_fusion_3", "ts": 0, "dur": 4.0}]
    ev += [{"ph": "X", "pid": 1, "tid": 99, "name": "fusion.1", "ts": 0, "dur": 1000.0},  # op summary line
           {"ph": "X", "pid": 701, "tid": 5, "name": "PjitFunction", "ts": 0, "dur": 5000.0}]  # host
    _write_trace(str(tmp_path), ev)
    kernels = device_kernels(str(tmp_path))
    assert len(kernels) == 10
    s = summarize(kernels, per=2)
    assert abs(s["device_ms"] - 0.446) < 1e-9 and s["kernels"] == 5
    assert s["categories"] == {"attention": 0.35, "matmul": 0.084, "cache write": 0.008, "reduce/fusion": 0.004}
    assert s["top"][0]["name"] == "ragged_decode_attention" and s["top"][0]["calls"] == 1


def test_categories():
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert category("nvjet_sm90_tss_128x128_64x6_2x1_v_bz_NNT") == "matmul"
    assert category("MemcpyD2D") == "copy"
    assert category("wrapped_concatenate") == "reduce/fusion"


def test_no_trace_gives_empty_summary(tmp_path):
    assert device_kernels(str(tmp_path)) == []
    assert summarize([], per=1)["device_ms"] == 0


def test_idle_gaps_finds_host_bubbles(tmp_path):
    """Busy time is the union of kernel intervals (overlaps count once); the 2 ms hole between
    a decode kernel and a prefill GEMM is reported with its neighbours; short gaps are not."""
    ev = [{"ph": "X", "pid": 1, "tid": 14, "name": n, "ts": ts, "dur": d} for n, ts, d in [
        ("ragged_decode_attention", 0.0, 300.0),
        ("loop_add_fusion", 200.0, 200.0),  # overlaps the first: busy 0..400
        ("argmax_fusion", 450.0, 50.0),  # 50 us gap
        ("nvjet_prefill_gemm", 2500.0, 1000.0),  # 2000 us gap
    ]]
    _write_trace(str(tmp_path), ev)
    events = device_events(str(tmp_path))
    assert [e[0] for e in events][0] == "ragged_decode_attention"
    g = idle_gaps(events, min_gap_us=1000)
    assert g["span_ms"] == 3.5 and g["busy_ms"] == 1.45 and abs(g["idle_ms"] - 2.05) < 1e-12
    assert g["gaps_over_min"] == 1 and g["gaps_over_min_ms"] == 2.0
    assert g["top"][0] == {"ms": 2.0, "after": "argmax_fusion", "before": "nvjet_prefill_gemm"}
    assert g["top"][1]["ms"] == 0.05 and g["top"][1]["after"] == "loop_add_fusion"
    assert g["gap_ms_by_size"] == {"10-100us": 0.05, "1-10ms": 2.0}
    assert g["gap_pairs"][0] == {"after": "argmax_fusion", "before": "nvjet_prefill_gemm", "count": 1, "ms": 2.0}
    assert idle_gaps([])["busy_ms"] == 0.0


def test_compile_time_reports_each_program(tmp_path):
    """benchmarks/compile_time.py on a tiny model: a first-call and a steady time per program."""
    import pytest

    from benchmarks import compile_time
    out = compile_time.main(["--model", "tiny-llama", "--batch_size", "2", "--max_cache_length", "32",
                             "--context", "8", "--quantize_weights", "w8a8", "--shapes", "1x16,2x16",
                             "--iters", "1", "--json", str(tmp_path / "c.json")])
    assert json.load(open(tmp_path / "c.json")) == out
    assert out["gpu_gemms"] == "autotune"  # XLA's defaults off GPUs
    for key in ("decode_first_s", "decode_step_ms", "prefill_1x16_first_s", "prefill_2x16_ms", "prefill_2x16_tok_s"):
        assert out[key] > 0, key
    with pytest.raises(SystemExit, match="--shapes takes"):
        compile_time.parse_shapes("8x")
