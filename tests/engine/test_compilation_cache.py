"""A second process with the same shapes loads its executables from the persistent cache."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
from engine.llm import LLM
from engine.request import Request, SamplingParams
llm = LLM("tiny-gemma", batch_size=2, max_cache_length=32, context_size=16)
r = llm.generate_all([Request(id=0, prompt_token_ids=[2, 7, 9], sampling=SamplingParams(max_tokens=6, ignore_eos=True))])
print(r[0].completion_token_ids)
"""


def test_persistent_compilation_cache(tmp_path):
    cache = tmp_path / "xla"
    env = dict(os.environ, JETBEAM_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    # Cache even the quick CPU compiles of this tiny model.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

    def run():
        proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip().splitlines()[-1]

    first = run()
    entries = set(os.listdir(cache))
    assert entries, "nothing was written to the compilation cache"
    second = run()
    assert second == first
    assert set(os.listdir(cache)) == entries  # every executable came from the cache
