"""Engine-only batch runs: JSONL requests in, JSONL results out, no Beam.

    python -m engine.generate --input requests.jsonl --output results.jsonl
    python -m engine.generate --model tiny-llama --input reqs.jsonl --output out.jsonl --batch_size 16

Each input line is {"id": ..., "prompt": "..."} or {"id": ..., "prompt_token_ids": [...]}
(or {"id": ..., "messages": [...]}) with optional per-request max_tokens, temperature, top_k,
top_p, seed, stop, stop_token_ids, ignore_eos. Results are written as they finish, one line
per input line: {"id", "completion", "completion_token_ids", "finish_reason", "prompt_tokens",
"completion_tokens", "ttft_s", "latency_s"} or {"id", "error"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from engine.request import RequestError, Result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="config name (configs/models), model.json, checkpoint dir or .gguf file; "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--input", required=True, help="JSONL requests ('-' for stdin)")
    p.add_argument("--output", required=True, help="JSONL results ('-' for stdout)")
    g = p.add_argument_group("generation defaults (a request's own fields win)")
    g.add_argument("--max_tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    e = p.add_argument_group("engine")
    e.add_argument("--batch_size", type=int, default=None, help="decode slots")
    e.add_argument("--max_cache_length", type=int, default=None)
    e.add_argument("--context_size", type=int, default=None, help="longest prompt accepted")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    e.add_argument("--platform", default=None, help="'cpu', 'gpu=1', 'tpu=8' (default: all local devices)")
    e.add_argument("--quantize_weights", action="store_true", default=None)
    e.add_argument("--quantize_kv_cache", action="store_true", default=None)
    e.add_argument("--decode_steps", type=int, default=None, help="decode steps per host round-trip")
    e.add_argument("--kv_page_size", type=int, default=None,
                   help="paged KV cache: tokens per page (default: one region per slot)")
    e.add_argument("--kv_cache_tokens", default=None,
                   help="tokens in the paged cache's pool, or 'auto' (what device memory leaves free)")
    e.add_argument("--schedule", choices=["longest_first", "arrival"], default=None,
                   help="order in which requests take slots (default longest_first)")
    return p.parse_args(argv)


def read_rows(path: str):
    """(line number, dict or RequestError) per non-blank line."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                yield n, row
            except ValueError as e:
                yield n, RequestError(f"line {n}: invalid JSON ({e})")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from engine.llm import LLM
    from engine.rows import spec_to_request, to_request_spec

    engine_args = {k: getattr(args, k) for k in (
        "batch_size", "max_cache_length", "context_size", "dtype", "platform", "quantize_weights",
        "quantize_kv_cache", "decode_steps", "kv_page_size", "kv_cache_tokens", "schedule")}
    try:
        llm = LLM(args.model, **engine_args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    errors: list[Result] = []

    def requests():
        for n, row in read_rows(args.input):
            rid = row.get("id", n) if isinstance(row, dict) else n
            try:
                if isinstance(row, Exception):
                    raise row
                spec = to_request_spec({"id": rid, "row": row}, "prompt", defaults)
                req = spec_to_request(spec, render_chat=llm.render_chat)
                req.metadata = None
                yield req
            except RequestError as e:
                errors.append(Result(id=rid, error=str(e)))

    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    t0 = time.perf_counter()
    done = failed = gen_tokens = 0
    try:
        for res in llm.generate(requests()):
            for bad in errors:  # rows refused while reading, in the order they came
                out.write(json.dumps(bad.to_json()) + "\n")
                failed += 1
            errors.clear()
            out.write(json.dumps(res.to_json()) + "\n")
            out.flush()
            done += res.ok
            failed += not res.ok
            gen_tokens += res.completion_tokens
        for bad in errors:
            out.write(json.dumps(bad.to_json()) + "\n")
            failed += 1
    finally:
        if out is not sys.stdout:
            out.close()
    wall = time.perf_counter() - t0
    print(f"{done} completed, {failed} errors, {gen_tokens} tokens generated in {wall:.1f}s "
          f"({gen_tokens / max(wall, 1e-9):.1f} tok/s; model load {llm.load_time_s:.1f}s) -> {args.output}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
