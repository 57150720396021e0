"""How far each weight mode moves the embedded SmolLM2 from transformers' float32 model (CPU).

    python benchmarks/quant_accuracy.py [--modes none,int8,w8a8_int8,w8a8_fp8] [--limit N]
    python benchmarks/quant_accuracy.py --completions "--weight_dtype float32" --completions "" --completions=--quantize_kv_cache

The second form compares whole greedy completions (64 tokens, EOS stops) of the engine under
each flag set (`LLM` settings as flags) with transformers' greedy `generate`, one prompt at a
time, on the token ids the default job sends (a single flag goes as --completions=--flag).

For every sample prompt of data/prompts.jsonl (chat rows rendered with the model's template)
it compares our first greedy token and last-position logits, per `--quantize_weights` mode,
with transformers (float32, the same dequantized GGUF weights): first-token agreement, and the
largest logit error relative to the logits' spread. Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sample_prompts(tok, limit=None) -> list[str]:
    texts = []
    with open(os.path.join(ROOT, "data", "prompts.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["prompt"] if "prompt" in row else tok.render_chat(row["messages"]))
    return texts[:limit]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="none,bf16,int8,w8a8_int8,w8a8_fp8",
                   help="quantize_weights modes; bf16: unquantized matrices kept in bf16 (weight_dtype)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts only")
    p.add_argument("--completions", action="append", default=None,
                   help="engine flags of one whole-completion comparison (repeatable)")
    args = p.parse_args(argv)
    if args.completions is not None:
        return completions(args.completions, args.limit)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from engine.default_model import default_model_path
    from engine.loaders.gguf import load_gguf
    from engine.model import prefill
    from engine.sharding import make_mesh
    from engine.weights import load_params

    path = default_model_path()
    directory, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ckpt = load_gguf(path)
    cfg, tok = ckpt.config, ckpt.tokenizer
    prompts = [tok.encode(t) for t in sample_prompts(tok, args.limit)]
    with torch.no_grad():
        ref = [hf(torch.tensor([ids])).logits[0, -1].float().numpy() for ids in prompts]
    width = 32 * -(-max(map(len, prompts)) // 32)
    fwd = jax.jit(lambda prm, t, last: prefill(prm, cfg, t, jnp.float32, last_index=last)[0])
    print(f"{len(prompts)} prompts of data/prompts.jsonl, SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), CPU")
    print("| weights | first-token agreement | worst max logit error / std | median |")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        if mode == "bf16":
            params = load_params(cfg, ckpt, make_mesh("cpu"), jnp.float32, "none", matrix_dtype=jnp.bfloat16)
        else:
            params = load_params(cfg, ckpt, make_mesh("cpu"), jnp.float32, mode)
        agree, errs = 0, []
        for ids, r in zip(prompts, ref):
            buf = np.zeros((1, width), np.int32)
            buf[0, :len(ids)] = ids
            got = np.asarray(fwd(params, jnp.asarray(buf), jnp.asarray([len(ids) - 1])))[0]
            agree += int(np.argmax(got) == np.argmax(r))
            errs.append(float(np.abs(got - r).max() / r.std()))
        print(f"| {mode} | {agree}/{len(prompts)} | {max(errs):.3f} | {float(np.median(errs)):.3f} |")
    return 0


def _settings(flags: str):
    """The Settings a flag string names, parsed by the front ends' own flags (engine/config.py)."""
    from engine.config import Settings, add_settings_arguments, settings_flags
    p = argparse.ArgumentParser()
    add_settings_arguments(p)
    return Settings.from_flat(settings_flags(p.parse_args(flags.split())), where="--completions")


def completions(flag_sets: list, limit=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.cpu_default_job import job_prompt_ids
    from engine.default_model import default_model_path
    from engine.llm import LLM
    from engine.request import Request, SamplingParams

    directory, name = os.path.split(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    prompts = job_prompt_ids()[:limit]
    theirs = []
    with torch.no_grad():
        for ids in prompts:
            row = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                              pad_token_id=2, eos_token_id=2)[0, len(ids):].tolist()
            theirs.append(row[:row.index(2)] if 2 in row else row)
    total = sum(map(len, theirs))
    print(f"{len(prompts)} prompts, greedy, 64 tokens; transformers float32 generate as the reference")
    print("| engine flags | identical completions | tokens before the first difference |")
    print("|---|---|---|")
    for flags in flag_sets:
        llm = LLM(settings=_settings(flags))
        ours = [r.completion_token_ids for r in llm.generate_all(
            [Request(id=i, prompt_token_ids=p, sampling=SamplingParams(max_tokens=64)) for i, p in enumerate(prompts)])]
        same = sum(a == b for a, b in zip(ours, theirs))
        before = sum(next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in zip(ours, theirs))
        print(f"| `{flags or '(defaults)'}` | {same}/{len(prompts)} | {before / total:.3f} |")
        del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
