"""The README's default job against transformers on this machine's CPU, in one call.

    python benchmarks/cpu_default_job.py [--peer_batch 16]

Ours: `python run_pipeline.py` on the 41 sample prompts with the embedded SmolLM2-135M (its
metrics: generated tokens over the job's wall time). Peer: transformers `generate` on the same
GGUF weights (float32, greedy, the same 64-token limit, stopping at EOS like ours), the same
prompt texts (chat rows rendered with the model's template), `--peer_batch` prompts per call,
left-padded. Both report output tokens per second of wall time, model loading excluded.
Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ours(work: str) -> dict:
    out = os.path.join(work, "out")
    subprocess.run([sys.executable, os.path.join(ROOT, "run_pipeline.py"), f"--output={out}", "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        run = json.load(f)["latest_run"]
    with open(os.path.join(out, f"metrics-{run}.json")) as f:
        m = json.load(f)
    wall = m["job_wall_time_s"] - (m.get("engine_load_time_s") or 0)
    return {"rows": m["completed"], "generated_tokens": m["generated_tokens"], "wall_s": round(wall, 2),
            "output_tok_per_s": round(m["generated_tokens"] / wall, 1)}


def peer(batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.quant_accuracy import sample_prompts
    from engine.default_model import default_model_path
    from engine.loaders.gguf import load_gguf
    path = default_model_path()
    directory, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    texts = sample_prompts(load_gguf(path).tokenizer)
    t0, generated = time.perf_counter(), 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():  # tokens up to and including the first EOS
                generated += next((j + 1 for j, t in enumerate(row) if t == tok.eos_token_id), len(row))
    wall = time.perf_counter() - t0
    return {"rows": len(texts), "generated_tokens": generated, "wall_s": round(wall, 2),
            "output_tok_per_s": round(generated / wall, 1), "batch": batch, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer_batch", type=int, default=16)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        report = {"ours": ours(work), "transformers": peer(args.peer_batch)}
    report["ours_over_transformers"] = round(report["ours"]["output_tok_per_s"]
                                             / report["transformers"]["output_tok_per_s"], 2)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
