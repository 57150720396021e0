"""Checkpoint loaders: one module per format, each returning an `engine.checkpoint.Checkpoint`;
`open_checkpoint` picks the format from the path.

Checkpoints are untrusted files: every loader checks each declared count, length, offset and
shape against the file and the architecture against ModelConfig's LIMITS before allocating
anything for it, and refuses with a one-line `CheckpointError("<path>: <what is wrong>")`.
`check_checkpoint` runs exactly those checks (headers and metadata, no weight, no tokenizer)
for a preflight."""

from __future__ import annotations

import os

from engine.checkpoint import Checkpoint, CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "check_checkpoint", "detect_format", "open_checkpoint"]


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


def open_checkpoint(path: str, tokenizer: bool = True) -> Checkpoint:
    """The checkpoint at `path`, every header checked and no weight read (`tensors()` reads them).

    `tokenizer=False` leaves `Checkpoint.tokenizer` None without reading the tokenizer files."""
    fmt = detect_format(path)
    if fmt == "hf":
        from engine.loaders.hf import load_hf
        return load_hf(path, tokenizer=tokenizer)
    if fmt == "meta":
        from engine.loaders.meta import load_meta
        return load_meta(path, tokenizer=tokenizer)
    if fmt == "gguf":
        from engine.loaders.gguf import load_gguf
        if os.path.isdir(path):
            path = os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".gguf")))
        return load_gguf(path, tokenizer=tokenizer)
    from engine.loaders.converted import load_converted
    return load_converted(path, tokenizer=tokenizer)


def check_checkpoint(path: str) -> Checkpoint:
    """Preflight: open `path` as the engine would, reading headers and metadata only (no weight,
    no tokenizer), and return the Checkpoint (`.config`, `.format`, `.source`); a refused file
    raises CheckpointError("<path>: <what is wrong>"). Fast (milliseconds for a header) and
    bounded in memory for any file. A Meta checkpoint's bos/eos here follow the vocabulary size,
    since they come from its tokenizer."""
    return open_checkpoint(path, tokenizer=False)
