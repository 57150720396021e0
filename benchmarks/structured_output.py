"""The cost of structured output: the same rows generated with and without a constraint, in one process.

    python3 benchmarks/structured_output.py [--model M] [--rows 32] [--max_tokens 48] [--json out.json]

Every row asks for a JSON description of a city. Three runs over the same rows, after an
untimed pass of each over the same rows (compilation, llguidance's tokenizer): all rows free, all rows under a
JSON Schema, and half of them constrained (what the free rows pay for sharing the batch). Each
run reports output tok/s, decode steps and the wall time per step (prefill included), and how
many constrained completions parse as JSON. Free rows end at EOS and constrained ones when their
JSON closes, so the runs generate different token counts: compare tok/s and ms per step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Delhi", "Quito", "Perth", "Seoul", "Rome", "Lagos",
          "Hanoi", "Dublin", "Austin", "Kyoto", "Porto"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
          "required": ["name", "country", "population"], "additionalProperties": False}


def requests(llm, n: int, max_tokens: int, constrained):
    """n city rows, each one user message through the model's chat template (as rows with
    prompt_format auto reach an instruct model); constrained(i) says which carry the schema."""
    from engine.request import Request, SamplingParams
    out = []
    for i in range(n):
        sp = SamplingParams(max_tokens=max_tokens, json_schema=SCHEMA if constrained(i) else None)
        city = CITIES[i % len(CITIES)]
        text = f"Describe {city} as a JSON object with its name, country and population."
        prompt = llm.render_chat([{"role": "user", "content": text}]) if llm.tokenizer.chat_template else text
        out.append(Request(id=i, prompt=prompt, sampling=sp))
    return out


def parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def timed(llm, reqs) -> dict:
    llm.reset_stats()
    steps0 = llm._batcher.steps
    t0 = time.perf_counter()
    results = llm.generate_all(reqs)
    wall = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} rows failed, e.g. {bad[0].error}")
    toks = sum(r.completion_tokens for r in results)
    con = [r for q, r in zip(reqs, results) if q.sampling.constrained]
    return {"wall_s": round(wall, 3), "output_tokens": toks, "output_tok_per_s": round(toks / wall, 1),
            "decode_calls": llm.stats()["decode_calls"], "decode_steps": llm._batcher.steps - steps0,
            "ms_per_step": round(1000 * wall / max(llm._batcher.steps - steps0, 1), 1),
            "constrained_rows": len(con), "constrained_parse": sum(parses(r.completion) for r in con),
            "constrained_stop": sum(r.finish_reason == "stop" for r in con)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from engine.llm import LLM
    llm = LLM(args.model, batch_size=args.batch_size, max_cache_length=256, context_size=128)
    runs = {"free": lambda i: False, "json_schema": lambda i: True, "half": lambda i: i % 2 == 0}
    for name, which in runs.items():  # untimed, the same rows: every shape compiled, the grammars' tokenizer
        llm.generate_all(requests(llm, args.rows, args.max_tokens, which))
    report = {"date": datetime.date.today().isoformat(), "model": llm.model_name,
              "device": llm.device_info().get("device_kind"), "rows": args.rows, "max_tokens": args.max_tokens,
              "batch_size": args.batch_size, "runs": {}}
    for name, which in runs.items():
        report["runs"][name] = timed(llm, requests(llm, args.rows, args.max_tokens, which))
        print(name, json.dumps(report["runs"][name]), flush=True)
    free = report["runs"]["free"]["output_tok_per_s"]
    report["constrained_over_free"] = round(report["runs"]["json_schema"]["output_tok_per_s"] / free, 3)
    report["half_over_free"] = round(report["runs"]["half"]["output_tok_per_s"] / free, 3)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
