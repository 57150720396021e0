"""Checkpoint loaders: one module per format, each returning an `engine.checkpoint.Checkpoint`;
`open_checkpoint` picks the format from the path."""

from __future__ import annotations

import os

from engine.checkpoint import Checkpoint, CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "detect_format", "open_checkpoint"]


def detect_format(path: str) -> str:
    """'hf' | 'meta' | 'gguf' | 'jetbeam' for a checkpoint path; raises CheckpointError otherwise."""
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise CheckpointError(f"{path}: not a recognised checkpoint file (expected a .gguf file or a directory)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    files = os.listdir(path)
    if "jetbeam_config.json" in files:
        return "jetbeam"
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return "hf"
    if "params.json" in files and any(f.startswith("consolidated.") and f.endswith(".pth") for f in files):
        return "meta"
    ggufs = [f for f in files if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"{path}: not a recognised checkpoint directory (need config.json + *.safetensors, "
        "params.json + consolidated.*.pth, a .gguf file, or a jetbeam-converted directory)")


def open_checkpoint(path: str) -> Checkpoint:
    fmt = detect_format(path)
    if fmt == "hf":
        from engine.loaders.hf import load_hf
        return load_hf(path)
    if fmt == "meta":
        from engine.loaders.meta import load_meta
        return load_meta(path)
    if fmt == "gguf":
        from engine.loaders.gguf import load_gguf
        if os.path.isdir(path):
            path = os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".gguf")))
        return load_gguf(path)
    from engine.loaders.converted import load_converted
    return load_converted(path)
