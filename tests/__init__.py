"""The test suite: tests/engine, tests/pipeline and tests/benchmarks follow the code's layout;
the helpers here (tiny.py, hf_fixtures.py, gguf_fixtures.py) are shared by them."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
