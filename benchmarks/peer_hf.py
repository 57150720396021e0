"""Peer baseline: Hugging Face transformers `generate()` on the same model shape as ours.

Why: a throughput number for jetbeam means little without a well-known reference on the
same card, same shape, same prompt/completion lengths. This script is that reference.
It runs as its own process (torch and JAX must not share the GPU's memory pool) and
needs no checkpoint: the architecture comes from configs/models/NAME.json and the
weights are random, created directly on the target device in the target dtype (speed
does not depend on the values; greedy decoding with `min_new_tokens` makes every
sequence produce exactly `output_len` tokens, so EOS can never end a batch early).

    python benchmarks/peer_hf.py --model llama2-7b --batch_size 64 --input_len 256 \
        --output_len 256 --num_batches 2 --json out.json
    # tiny CPU check
    python benchmarks/peer_hf.py --model tiny-llama --device cpu --dtype float32 \
        --batch_size 2 --input_len 8 --output_len 4 --num_batches 1 --json /tmp/p.json

Setup: SDPA attention, the default (dynamic) KV cache, one untimed warm-up batch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Growable segments: a cache that grows token by token fragments the default allocator's
# fixed blocks (a batch-64 retry after a batch-128 out-of-memory found 32 GiB reserved but unusable).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import transformers  # noqa: E402

from configs import load_model_config_dict  # noqa: E402  (plain JSON; does not import JAX)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hf_config(name: str):
    """Translate configs/models/NAME.json into a transformers Llama or Gemma config."""
    c = load_model_config_dict(name)
    family = c.get("family", "llama")
    common = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        head_dim=c["head_dim"], rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=c.get("rope_theta", 10000.0),
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        tie_word_embeddings=c.get("tie_embeddings", False),
        bos_token_id=c.get("bos_token_id"), eos_token_id=(c.get("eos_token_ids") or [None])[0],
        pad_token_id=0, attn_implementation="sdpa")
    if c.get("rope_scaling"):
        common["rope_scaling"] = dict(c["rope_scaling"], rope_type="llama3")
    if family == "gemma":
        return transformers.GemmaConfig(hidden_activation="gelu_pytorch_tanh", **common), \
            transformers.GemmaForCausalLM
    if family == "llama":
        return transformers.LlamaConfig(hidden_act="silu", **common), transformers.LlamaForCausalLM
    raise ValueError(f"unsupported family {family!r}")


def _no_init():
    """transformers' context that skips its (slow, CPU-style) weight init; absent -> no-op."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            pass
    return contextlib.nullcontext()


def build_model(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """Random-weight model, allocated on `device` in `dtype` (no host copy, no fp32 detour)."""
    config, cls = hf_config(name)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad(), _no_init():
            model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    model.tie_weights()  # normally done inside the init we skipped (Gemma ties lm_head to embed)
    with torch.no_grad():  # our own init: fast on GPU, no NaN garbage from empty storage
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:  # RMSNorm weights: identity (Gemma stores w and applies 1 + w)
                p.fill_(0.0 if config.model_type == "gemma" else 1.0)
    return model.eval()


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    model = build_model(args.model, device, dtype, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    vocab = model.config.vocab_size

    batch = args.batch_size

    def batch_ids():  # avoid ids 0..2 (pad/bos/eos) so nothing special happens
        ids = torch.randint(3, vocab, (batch, args.input_len), generator=gen)
        return ids.to(device), torch.ones_like(ids, device=device)

    def generate(new_tokens: int):
        ids, mask = batch_ids()
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync(device)
        assert out.shape == (batch, args.input_len + new_tokens), out.shape
        return time.perf_counter() - t0

    # A full-length warm-up: after a short one the first timed batch runs slow (kernel
    # selection and cache growth happen at every new length).
    # The warm-up also finds the batch that fits: on out-of-memory it halves the batch and
    # retries (a bf16 cache at 128 x 1152 tokens does not fit next to 7B weights on 80 GB),
    # so the peer runs at the largest power-of-two fraction of the asked batch that fits.
    oom = []
    while True:
        try:
            warm = generate(args.warmup_tokens or args.output_len)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            oom.append(batch)
        # Outside the except block, so the traceback's frames (and the tensors they hold) are gone.
        batch //= 2
        gc.collect()
        torch.cuda.empty_cache()
        print(f"peer_hf: batch {oom[-1]} ran out of device memory; retrying with {batch}", flush=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [generate(args.output_len) for _ in range(args.num_batches)]
    wall = sum(times)
    n_req = batch * args.num_batches
    result = {
        "peer": "hf_transformers_generate", "model": args.model, "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": args.dtype, "batch_size": batch, "batch_size_asked": args.batch_size,
        "out_of_memory_at": oom, "input_len": args.input_len,
        "output_len": args.output_len, "num_batches": args.num_batches,
        "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "warmup_s": warm, "batch_wall_s": times, "wall_s": wall,
        "output_tok_s": n_req * args.output_len / wall,
        "total_tok_s": n_req * (args.input_len + args.output_len) / wall,
        "requests_s": n_req / wall,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama2-7b", help="configs/models/NAME.json")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--input_len", type=int, default=256)
    p.add_argument("--output_len", type=int, default=256)
    p.add_argument("--num_batches", type=int, default=2)
    p.add_argument("--warmup_tokens", type=int, default=None,
                   help="new tokens of the untimed warm-up batch (default: output_len)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    r = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    mem = f"{r['peak_mem_bytes'] / 2**30:.1f} GiB" if r["peak_mem_bytes"] else "n/a"
    print(f"peer_hf {r['model']} {r['dtype']} on {r['device_name']}: batch {r['batch_size']} "
          f"{r['input_len']}/{r['output_len']} x{r['num_batches']}: {r['output_tok_s']:.1f} output tok/s, "
          f"{r['total_tok_s']:.1f} total tok/s, {r['requests_s']:.2f} req/s, {r['wall_s']:.2f} s, peak {mem}")
    return r


if __name__ == "__main__":
    main()
