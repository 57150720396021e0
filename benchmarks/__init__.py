"""Benchmarks: each module runs as a script (`python3 benchmarks/NAME.py`); results go to BENCHMARKS.md."""

import argparse


def at_least(lo: int):
    """An argparse type: an integer >= lo, else the flag's one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value
    return parse
