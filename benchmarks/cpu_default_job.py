"""The README's default job against transformers on this machine's CPU, in one call.

    python benchmarks/cpu_default_job.py [--peer_batch 16] [--ours "" --ours "--batch_size 48 ..."]

Ours: `python run_pipeline.py` on the 41 sample prompts with the embedded SmolLM2-135M (its
metrics: generated tokens over the job's wall time). Peer: transformers `generate` on the same
GGUF weights (float32, greedy, the same 64-token limit, stopping at EOS like ours), the exact
prompt token ids the job sends (its own validation step: chat template under prompt_format
auto), `--peer_batch` prompts per call, left-padded. Both report output tokens per second of
wall time, model loading excluded; EOS is not counted as a generated token on either side.
`--ours` (repeatable) runs the job again with those extra flags; each run reports its peak
resident memory. Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# Runs run_pipeline.py as __main__ and writes the process's peak resident memory (MiB) on exit.
_PEAK_RSS = """
import atexit, resource, runpy, sys
peak_file, sys.argv = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(peak_file, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ours(work: str, flags: str = "") -> dict:
    out, peak = os.path.join(work, "out"), os.path.join(work, "peak_rss_mib")
    subprocess.run([sys.executable, "-c", _PEAK_RSS, peak, os.path.join(ROOT, "run_pipeline.py"),
                    f"--output={out}", "--overwrite", *flags.split()],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        run = json.load(f)["latest_run"]
    with open(os.path.join(out, f"metrics-{run}.json")) as f:
        m = json.load(f)
    wall = m["job_wall_time_s"] - (m.get("engine_load_time_s") or 0)
    with open(peak) as f:
        peak_mib = int(f.read())
    return {"flags": flags, "rows": m["completed"], "generated_tokens": m["generated_tokens"],
            "wall_s": round(wall, 2), "output_tok_per_s": round(m["generated_tokens"] / wall, 1),
            "peak_rss_mib": peak_mib}


def job_prompt_ids() -> list:
    """The token ids the default job sends for each sample row (its own validation step)."""
    from engine.config import SamplingParams
    from engine.default_model import default_model_path
    from engine.loaders.gguf import load_gguf
    from engine.rows import RowValidator
    tok = load_gguf(default_model_path()).tokenizer
    check = RowValidator(tok, 2048, SamplingParams())
    with open(os.path.join(ROOT, "data", "prompts.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [list(check({"id": r.get("id", i), "row": r}).prompt_token_ids) for i, r in enumerate(rows)]


def peer(batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.default_model import default_model_path
    path = default_model_path()
    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    prompts = job_prompt_ids()
    eos, pad = 2, 2  # SmolLM2: <|im_end|>; left padding is masked out
    t0, generated = time.perf_counter(), 0
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
            for row in out[:, width:].tolist():  # tokens before the first EOS, as our counts
                generated += next((j for j, t in enumerate(row) if t == eos), len(row))
    wall = time.perf_counter() - t0
    return {"rows": len(prompts), "generated_tokens": generated, "wall_s": round(wall, 2),
            "output_tok_per_s": round(generated / wall, 1), "batch": batch, "torch_threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer_batch", type=int, default=16)
    p.add_argument("--ours", action="append", default=None,
                   help="extra run_pipeline.py flags of one run of ours (repeatable; default: one run, none)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        report = {"ours": [ours(work, flags) for flags in (args.ours or [""])],
                  "transformers": peer(args.peer_batch)}
    peer_rate = report["transformers"]["output_tok_per_s"]
    report["ours_over_transformers"] = [round(r["output_tok_per_s"] / peer_rate, 2) for r in report["ours"]]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
