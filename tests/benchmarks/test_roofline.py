"""benchmarks/roofline.py pure functions against hand-computed numbers on a tiny config.

Tiny shape: vocab 10, hidden 4, mlp 8, 2 layers, 2 heads (head_dim 2), 1 KV head.
param_count = embed 40 + 2 x (attn 48 + mlp 96 + norms 8) + final norm 4 + lm_head 40 = 388.
A decode step reads 348 of them (the untied input embedding is only gathered), 40 in the head.
"""

import dataclasses
import math

import pytest

from benchmarks.roofline import decode_roofline, prefill_roofline, run_roofline
from engine.model_config import ModelConfig

CFG = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=2)


def test_param_count_of_the_tiny_config():
    assert CFG.param_count() == 388


def test_decode_bf16_memory_bound():
    r = decode_roofline(CFG, slots=3, avg_context=5, weight_bytes_per_param=2, kv_bytes_per_value=2,
                        kv_scale_bytes=0, bandwidth=1000, flops=1e4)
    assert r["weight_bytes"] == 348 * 2
    # per token: 2 (K,V) x 2 layers x 1 kv head x 2 dims x 2 bytes = 16; 3 slots x 5 tokens
    assert r["kv_bytes"] == 3 * 5 * 16
    assert r["flops"] == 2 * 348 * 3 + 4 * 2 * 2 * 2 * 5 * 3  # 2088 + 480
    assert r["step_time_s"] == pytest.approx(0.936)
    assert r["bound"] == "memory"
    assert r["tok_s"] == pytest.approx(3 / 0.936)


def test_decode_compute_bound_when_flops_are_scarce():
    r = decode_roofline(CFG, 3, 5, 2, 2, 0, bandwidth=1e9, flops=100)
    assert r["bound"] == "compute" and r["step_time_s"] == pytest.approx(2568 / 100)


def test_decode_int8_counts_scales():
    r = decode_roofline(CFG, 3, 5, 1, 1, 4, bandwidth=1000, flops=1e4, weight_scale_bytes=4)
    # 74 output columns: 2 layers x (q 4 + k 2 + v 2 + o 4 + gate 8 + up 8 + down 4) + head 10
    assert r["weight_bytes"] == 348 + 74 * 4
    # per token: 2 x 2 layers x 1 head x (2 values x 1 byte + 4 scale bytes) = 24
    assert r["kv_bytes"] == 3 * 5 * 24


def test_8bit_matmuls_at_their_own_rate():
    # compute bound: 2088 weight FLOPs at 200/s, 480 attention FLOPs at 100/s
    r = decode_roofline(CFG, 3, 5, 1, 1, 4, bandwidth=1e9, flops=100, weight_flops=200)
    assert r["bound"] == "compute" and r["step_time_s"] == pytest.approx(2088 / 200 + 480 / 100)
    p = prefill_roofline(CFG, 12, 1e4, prompt_len=4, weight_flops=2e4)
    assert p["time_s"] == pytest.approx((7392 + 240) / 2e4 + 960 / 1e4)


def test_tied_head_read_in_bf16():
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    assert tied.param_count() == 348
    r = decode_roofline(tied, 3, 5, 1, 1, 4, 1000, 1e4, weight_scale_bytes=4, head_bytes_per_param=2)
    assert r["weight_bytes"] == 308 + 40 * 2 + 74 * 4


def test_prefill():
    assert prefill_roofline(CFG, 12, 1e4)["flops"] == 2 * 308 * 12
    # + causal attention 4*2*2*2 * (4+1)/2 per token + head for the 3 last tokens
    r = prefill_roofline(CFG, 12, 1e4, prompt_len=4)
    assert r["flops"] == 7392 + 960 + 240
    assert r["time_s"] == pytest.approx(0.8592)


def test_run_two_waves():
    r = run_roofline(CFG, num_requests=5, input_len=4, output_len=3, slots=3, quantized=False,
                     bandwidth=1000, flops=1e4)
    # context 4 + 3/2 = 5.5; wave 1: 3 slots, 696 + 264 bytes; wave 2: 2 slots, 696 + 176 bytes;
    # 2 decode steps each (the first token comes from prefill)
    assert r["waves"] == 2
    assert r["decode_s"] == pytest.approx(2 * (0.960 + 0.872))
    assert r["prefill_s"] == pytest.approx((12320 + 1600 + 400) / 1e4)
    assert r["gen_tok_s"] == pytest.approx(15 / (1.432 + 3.664))
    assert r["decode_tok_s"] == pytest.approx(15 / 3.664)
    assert r["full_wave_step"]["tok_s"] == pytest.approx(3 / 0.96)


def test_quantized_run_is_faster_and_llama7b_matches_notes():
    from configs import load_model_config_dict
    cfg = ModelConfig.from_dict(load_model_config_dict("llama2-7b"))
    bf16 = run_roofline(cfg, 256, 256, 256, 256, False, 2.94e12, 895e12)
    int8 = run_roofline(cfg, 256, 256, 256, 256, True, 2.94e12, 895e12)
    # shared/notes/h100-measured.md: bandwidth roofline with int8 weights + int8 KV ~ 23k tok/s
    assert math.isclose(int8["full_wave_step"]["tok_s"], 23e3, rel_tol=0.05)
    assert int8["decode_tok_s"] > 1.9 * bf16["decode_tok_s"]


def test_packed_attention_probe_runs_on_cpu(capsys):
    """benchmarks/packed_attention.py --small: the probe packs a row, times it and the bucketed layout."""
    from benchmarks import packed_attention
    assert packed_attention.main(["--small"]) == 0
    out = capsys.readouterr().out
    assert "packed xla:" in out and "bucketed [" in out and "FAILED" not in out
