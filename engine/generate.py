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

from engine.config import Settings, add_settings_arguments, make_settings, settings_flags
from engine.request import RequestError, Result


def build_parser() -> argparse.ArgumentParser:
    """The CLI: --input/--output, a settings file, and every setting of engine/config.py."""
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL requests ('-' for stdin)")
    p.add_argument("--output", required=True, help="JSONL results ('-' for stdout)")
    p.add_argument("--config", default=None,
                   help="A JSON settings file (JetStream model.json, configs/jobs/*.json); flags override it")
    add_settings_arguments(p)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the defaults, then --config, then the flags given; ConfigError if bad."""
    base = Settings.from_file(args.config) if args.config else Settings()
    flags = settings_flags(args)
    return make_settings(flags.pop("model", None), base, **flags)


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        from engine.llm import LLM
        llm = LLM(settings=settings)
    except (ValueError, FileNotFoundError) as e:
        from engine.checkpoint import CheckpointError
        kind = "CheckpointError: " if isinstance(e, CheckpointError) else ""
        print(f"error: {kind}{e}", file=sys.stderr)
        return 2
    from engine.rows import RowValidator
    validate = RowValidator(llm.tokenizer, settings.engine.context_size, settings.sampling)
    errors: list[Result] = []

    def requests():
        for n, row in read_rows(args.input):
            rid = row.get("id", n) if isinstance(row, dict) else n
            try:
                if isinstance(row, Exception):
                    raise row
                yield validate({"id": rid, "row": row}).to_request(request_id=rid)
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
            for sample in res.all_samples():  # one line per sample (n)
                out.write(json.dumps(sample.to_json()) + "\n")
                gen_tokens += sample.completion_tokens
            out.flush()
            done += res.ok
            failed += not res.ok
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
