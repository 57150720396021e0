"""Convert any supported checkpoint (HF, Meta, GGUF, jetbeam) into the fast-loading jetbeam format.

    python -m engine.convert --input_checkpoint_dir IN --output_checkpoint_dir OUT [--quantize] [--output_safetensors]

Booleans may also be spelled `--quantize True`, `--quantize=False`, `--output_safetensors True` (as
JetStream's guide writes them; `--quantize_weights` is an alias). IN may be a .gguf file.
The output is written into a temporary directory next to OUT and renamed into place at the
end, so an error never leaves a half-written checkpoint at OUT. Errors print one line
`error: ...` and exit with status 2.

Dtypes: with --quantize every matrix (wq wk wv wo w_gate w_up w_down lm_head) is stored as
int8 + float32 per-output-column scales (engine.quantize.quantize_weight, computed on the
host in numpy); embeddings and norms keep the source dtype. Without it, every tensor keeps
the source dtype when that is float32, bfloat16 or float16 (lossless), and anything else
(float64, dequantized GGUF blocks, int8 pairs from an already-quantized source) is stored
as float32; `--dtype` forces one float dtype instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from engine.checkpoint import Checkpoint, CheckpointError, expected_shapes
from engine.config import EngineConfig
from engine.loaders import open_checkpoint
from engine.loaders.converted import CONFIG_FILE, FORMAT_VERSION, ShardedWriter, is_matrix
from engine.settings import add_arguments, parse_bool, parse_value

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
KEEP = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
FORCED = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def _store_dtype(arr_dtype, policy: str):
    if policy != "keep":
        return FORCED[policy]
    return np.dtype(arr_dtype) if np.dtype(arr_dtype) in KEEP else np.dtype(np.float32)


def save_tokenizer(ckpt: Checkpoint, out_dir: str) -> list[str]:
    """Copy the source's tokenizer files, or serialize a tokenizer built in memory (GGUF)."""
    from engine.tokenizer import HFTokenizer, SentencePieceTokenizer
    src = None
    if ckpt.format in ("hf", "jetbeam"):
        src, names = ckpt.source, TOKENIZER_FILES
    elif ckpt.format == "meta" and ckpt.extra.get("tokenizer_dir"):
        src = ckpt.extra["tokenizer_dir"]
        # the parent of a Meta model dir holds tokenizer.model for all sizes, and nothing else of ours
        names = TOKENIZER_FILES if src == ckpt.source else ("tokenizer.model",)
    written = []
    if src and os.path.isdir(src):
        for name in names:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
                written.append(name)
    tok = ckpt.tokenizer
    if written or tok is None:
        return written
    tok_cfg = {"add_bos_token": bool(tok.add_bos)}
    if isinstance(tok, HFTokenizer):
        tok.tok.save(os.path.join(out_dir, "tokenizer.json"))
        written.append("tokenizer.json")
        if tok.bos_id is not None:
            tok_cfg["bos_token"] = tok.token_text(tok.bos_id)
        if tok.eos_ids:
            tok_cfg["eos_token"] = tok.token_text(tok.eos_ids[0])
    elif isinstance(tok, SentencePieceTokenizer):
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(tok.sp.serialized_model_proto())
        written.append("tokenizer.model")
    else:
        raise CheckpointError(f"{ckpt.source}: cannot save a tokenizer of type {type(tok).__name__}")
    if tok.chat_template:
        tok_cfg["chat_template"] = tok.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    written.append("tokenizer_config.json")
    return written


def _write(ckpt: Checkpoint, out_dir: str, quantize: bool, dtype: str, shard_bytes: int) -> dict:
    from engine.quantize import QuantizedWeight, quantize_weight

    cfg = ckpt.config
    shapes = expected_shapes(cfg)
    plan = []
    for name, shape in shapes.items():
        if quantize and is_matrix(name):
            plan += [(name + ".q", shape), (name + ".scale", shape[-1:])]
        else:
            plan.append((name, shape))
    src = ckpt.source or "checkpoint"
    writer = ShardedWriter(out_dir, plan, shard_bytes)
    seen = set()
    try:
        for name, value in ckpt.tensors():
            if name == "lm_head" and cfg.tie_embeddings:
                continue
            if name not in shapes:
                raise CheckpointError(f"{src}: unexpected tensor {name!r}")
            if name in seen:
                raise CheckpointError(f"{src}: tensor {name!r} appears twice")
            seen.add(name)
            if tuple(value.shape) != shapes[name]:
                raise CheckpointError(f"{src}: tensor {name!r} has shape {tuple(value.shape)}, "
                                      f"expected {shapes[name]} for this config")
            if isinstance(value, QuantizedWeight) and quantize:
                writer.add(name + ".q", np.asarray(value.q, np.int8))
                writer.add(name + ".scale", np.asarray(value.scale, np.float32))
                continue
            if isinstance(value, QuantizedWeight):
                value = np.asarray(value.q, np.float32) * np.asarray(value.scale, np.float32)[None, :]
            value = np.asarray(value)
            if quantize and is_matrix(name):
                qw = quantize_weight(value)
                writer.add(name + ".q", qw.q)
                writer.add(name + ".scale", qw.scale)
            else:
                want = _store_dtype(value.dtype, dtype)
                writer.add(name, value if value.dtype == want else value.astype(want))
            del value
        missing = [n for n in shapes if n not in seen]
        if missing:
            raise CheckpointError(f"{src}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return writer.finish()
    finally:
        writer.abort()


def convert(input_path: str, output_path: str, quantize: bool = False, dtype: str = "keep",
            shard_bytes: int = 2 << 30, overwrite: bool = False) -> dict:
    """Convert `input_path` into a jetbeam checkpoint at `output_path`; returns a small summary."""
    t0 = time.perf_counter()
    if dtype != "keep" and dtype not in FORCED:
        raise ValueError(f"dtype must be 'keep' or one of {sorted(FORCED)}, got {dtype!r}")
    out = os.path.abspath(output_path)
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise CheckpointError(f"{out}: exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise CheckpointError(f"{out}: output directory exists and is not empty (pass --overwrite to replace it)")
    if os.path.abspath(input_path) == out:
        raise CheckpointError(f"{out}: input and output are the same path")
    ckpt = open_checkpoint(input_path)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        weight_map = _write(ckpt, tmp, quantize, dtype, shard_bytes)
        info = {**ckpt.config.to_dict(), "format_version": FORMAT_VERSION, "quantized": bool(quantize),
                "source": {"format": ckpt.format, "path": ckpt.source or os.path.abspath(input_path)}}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(info, f, indent=1)
        tok_files = save_tokenizer(ckpt, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": out, "files": sorted(set(weight_map.values())), "tensors": len(weight_map),
            "tokenizer_files": tok_files, "source_format": ckpt.format, "quantized": bool(quantize),
            "seconds": time.perf_counter() - t0}


def _bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--input_checkpoint_dir", required=True,
                   help="HF / Meta / jetbeam checkpoint directory, or a .gguf file")
    p.add_argument("--output_checkpoint_dir", required=True)
    add_arguments(p, EngineConfig, only=("quantize_weights",))  # the engine's own flag and help
    p.add_argument("--quantize", dest="quantize_weights", nargs="?", const="true",
                   help="the same as --quantize_weights (JetStream's spelling)")
    p.add_argument("--output_safetensors", type=_bool, nargs="?", const=True, default=True,
                   help="accepted for JetStream compatibility; the output is always safetensors")
    p.add_argument("--dtype", default="keep", choices=["keep", *FORCED],
                   help="dtype of unquantized tensors (default: keep the source's float dtype)")
    p.add_argument("--shard_size_gb", type=float, default=2.0, help="approximate size of each weight file")
    p.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False,
                   help="replace a non-empty OUT")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        # Every 8-bit mode stores int8 + per-column scales: the W8A8 forms are derived from them at load.
        quantize = parse_value(EngineConfig, "quantize_weights", args.quantize_weights or False) != "none"
    except ValueError as e:
        p.error(str(e))
    if not args.output_safetensors:
        print("note: only safetensors output exists; writing safetensors", file=sys.stderr)
    try:
        summary = convert(args.input_checkpoint_dir, args.output_checkpoint_dir, quantize=quantize,
                          dtype=args.dtype, shard_bytes=max(1, int(args.shard_size_gb * (1 << 30))),
                          overwrite=args.overwrite)
    except (CheckpointError, OSError, ValueError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"error: {msg}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written at the output path", file=sys.stderr)
        return 2
    print(f"wrote {summary['output']} ({summary['source_format']} -> jetbeam"
          f"{', int8' if summary['quantized'] else ''}; {summary['tensors']} tensors in "
          f"{len(summary['files'])} file(s); tokenizer: {', '.join(summary['tokenizer_files']) or 'none'}) "
          f"in {summary['seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
