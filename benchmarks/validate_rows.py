"""Host time of the validate step per row on the embedded SmolLM2 (chat template rendered,
tokenized, checked): with the chat template compiled once (what the step does) against compiling
it for every row (the baseline), over the shipped sample prompts.

    python3 benchmarks/validate_rows.py --repeat 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import at_least  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=at_least(1), default=20, help="passes over the sample rows (default: 20)")
    args = p.parse_args(argv)
    from engine.config import Settings
    from pipeline.options import DEFAULT_INPUT
    from transforms.requests import row_validator, validate
    validator = row_validator(Settings(), "prompt", None)
    rows = [json.loads(line) for line in open(DEFAULT_INPUT) if line.strip()]
    elements = [{"id": str(i), "row": r} for i, r in enumerate(rows)] * args.repeat
    tok = validator.tokenizer

    def per_row_ms(compile_each: bool) -> float:
        start = time.perf_counter()
        for e in elements:
            if compile_each:
                tok._template_cache = None
            validate(validator, e)
        return (time.perf_counter() - start) * 1e3 / len(elements)

    per_row_ms(False)  # tokenizer and template warm
    base, ours = per_row_ms(True), per_row_ms(False)
    print("| rows | template compiled per row, ms/row (baseline) | compiled once, ms/row | speed-up |")
    print("|---|---|---|---|")
    print(f"| {len(elements):,} | {base:.3f} | {ours:.3f} | {base / ours:.1f}x |")


if __name__ == "__main__":
    main()
