"""The "jetbeam" checkpoint format written by `python -m engine.convert`, and its loader.

A directory holding:

* `jetbeam_config.json`: `ModelConfig.to_dict()` plus `format_version` (1), `quantized`
  (bool) and `source` ({"format", "path"} of what was converted).
* `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
  `model.safetensors.index.json` (Hugging Face's index layout), with canonical tensor
  names and layouts (see engine.loaders). A matrix quantized at conversion time is stored
  as `NAME.q` (int8 [in, out]) + `NAME.scale` (float32 [out], per output column, from
  engine.quantize.quantize_weight); everything else as float32 / bfloat16 / float16.
* the tokenizer (`tokenizer.model` and/or `tokenizer.json` + `tokenizer_config.json`).

Loading memory-maps each file once and yields views into it: nothing is read from disk
before the engine places the tensor, and no host copy is made beyond what device_put needs.
Every header is checked against the file sizes (engine/loaders/st_header.py) and the config
at open time, so a missing, truncated or mis-shaped tensor fails before any tensor is placed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

from engine.model_config import ModelConfig
from engine.checkpoint import Checkpoint, CheckpointError, expected_shapes, shown
from engine.loaders.st_header import ST_DTYPES, read_header
from engine.settings import read_json_object

FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 << 20  # jetbeam_config.json and the index: a real one is a few kB
CONFIG_FILE = "jetbeam_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def is_matrix(name: str) -> bool:
    return name.split(".")[-1] in MATRICES


# --- safetensors, write -------------------------------------------------------------------

class ShardedWriter:
    """Streams tensors into safetensors files of at most ~`max_shard_bytes` each.

    A tensor is written as it arrives: each file starts with a header region reserved for
    every tensor the checkpoint could hold (`plan`), space-padded as the format allows, and
    filled in when the file is closed. So the writer never holds more than the tensor it
    is given, and never rewrites data.
    """

    def __init__(self, directory: str, plan: list, max_shard_bytes: int = 2 << 30):
        self.dir = directory
        self.max = max_shard_bytes
        entry = lambda n, s: len(json.dumps({n: {"dtype": "BF16", "shape": list(s),
                                                 "data_offsets": [10 ** 15, 10 ** 15]}}))
        self.reserve = 64 + sum(entry(n, s) for n, s in plan)
        self.reserve += -self.reserve % 8
        self.files = []  # (temp path, {name: entry})
        self._f = None

    def _open(self):
        path = os.path.join(self.dir, f".shard-{len(self.files):05d}.tmp")
        self._f = open(path, "wb")
        self._f.write(b"\0" * (8 + self.reserve))
        self._pos = 0
        self.files.append((path, {}))

    def _close(self):
        if self._f is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.files[-1][1]},
                            separators=(",", ":")).encode()
        assert len(header) <= self.reserve, "header reservation too small"
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))
        self._f.close()
        self._f = None

    def add(self, name: str, arr: np.ndarray):
        dtype = np.dtype(arr.dtype)
        if dtype not in ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored")
        nbytes = arr.size * dtype.itemsize
        if self._f is None or (self._pos and self._pos + nbytes > self.max):
            self._close()
            self._open()
        if arr.ndim == 0 or arr.flags.c_contiguous:
            self._f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
        else:  # a view (a transpose): write row blocks of ~64 MB rather than copy it whole
            rows = max(1, (64 << 20) // max(1, nbytes // max(1, arr.shape[0])))
            for i in range(0, arr.shape[0], rows):
                self._f.write(np.ascontiguousarray(arr[i:i + rows]).reshape(-1).view(np.uint8).data)
        self.files[-1][1][name] = {"dtype": ST_NAMES[dtype], "shape": list(arr.shape),
                                   "data_offsets": [self._pos, self._pos + nbytes]}
        self._pos += nbytes

    def finish(self) -> dict:
        """Close the last file, give the files their final names; returns name -> file name."""
        self._close()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, entries) in enumerate(self.files):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.dir, final))
            weight_map.update({name: final for name in entries})
        if n > 1:
            total = sum(e["data_offsets"][1] - e["data_offsets"][0]
                        for _, entries in self.files for e in entries.values())
            with open(os.path.join(self.dir, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        return weight_map

    def abort(self):
        if self._f is not None:
            self._f.close()
            self._f = None


# --- the loader ---------------------------------------------------------------------------

def read_config(path: str) -> tuple[ModelConfig, dict]:
    cfg_path = os.path.join(path, CONFIG_FILE)
    d = read_json_object(cfg_path, CheckpointError, MAX_CONFIG_BYTES)
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r} is not supported "
                              f"(this engine reads version {FORMAT_VERSION}; re-run engine.convert)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    meta = {k: v for k, v in d.items() if k not in fields}
    try:
        cfg = ModelConfig.from_dict({k: v for k, v in d.items() if k in fields})
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{cfg_path}: bad model config ({e})") from None
    return cfg, meta


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json_object(index, CheckpointError, MAX_CONFIG_BYTES).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: unreadable index (no weight_map of tensor -> file name)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: weight file name {shown(name)} is not a plain file name")
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{os.path.join(path, name)}: weight file listed in {index} is missing")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(single):
        raise CheckpointError(f"{single}: missing (and no {INDEX_FILE})")
    return [single]


def load_converted(path: str, tokenizer: bool = True) -> Checkpoint:
    """The converted checkpoint in `path`: every header and shape checked, no tensor read.

    `tokenizer=False` skips loading the tokenizer (a preflight check reads headers only)."""
    path = os.path.abspath(path)
    cfg, meta = read_config(path)
    where = {}  # stored name -> (file, entry, data offset)
    for file in _weight_files(path):
        header, base, _ = read_header(file)
        for name, info in header.items():
            if name in where:
                raise CheckpointError(f"{file}: tensor {shown(name)} is also in {where[name][0]}")
            where[name] = (file, info, base)

    def check(file, stored, dtype_ok, shape):
        info = where[stored][1]
        if tuple(info["shape"]) != tuple(shape) or info["dtype"] not in dtype_ok:
            raise CheckpointError(f"{file}: tensor {stored!r} is {info['dtype']} {tuple(info['shape'])}, "
                                  f"expected {'/'.join(dtype_ok)} {tuple(shape)} for this config")

    plan = []  # (canonical name, stored names)
    for name, shape in expected_shapes(cfg).items():
        if name + ".q" in where or name + ".scale" in where:
            for part in (".q", ".scale"):
                if name + part not in where:
                    raise CheckpointError(f"{path}: tensor {name + part!r} is missing "
                                          f"(its pair {name + ('.scale' if part == '.q' else '.q')!r} is present)")
            check(where[name + ".q"][0], name + ".q", ("I8",), shape)
            check(where[name + ".scale"][0], name + ".scale", ("F32",), shape[-1:])
            plan.append((name, (name + ".q", name + ".scale")))
        elif name in where:
            check(where[name][0], name, ("F32", "BF16", "F16"), shape)
            plan.append((name, (name,)))
        else:
            raise CheckpointError(f"{path}: tensor {name!r} is in none of the weight files")
    used = {s for _, stored in plan for s in stored}
    extra = sorted(set(where) - used)
    if extra:
        raise CheckpointError(f"{where[extra[0]][0]}: unexpected tensor {shown(extra[0])} for this config")

    def tensors():
        from engine.quantize import QuantizedWeight
        maps = {}

        def view(stored):
            file, info, base = where[stored]
            if file not in maps:
                maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            begin, end = info["data_offsets"]
            dtype = ST_DTYPES[info["dtype"]]
            return maps[file][base + begin:base + end].view(dtype).reshape(info["shape"])

        for name, stored in plan:
            if len(stored) == 2:
                yield name, QuantizedWeight(q=view(stored[0]), scale=view(stored[1]))
            else:
                yield name, view(stored[0])

    tok = None
    if tokenizer:
        from engine.tokenizer import load_tokenizer
        try:
            tok = load_tokenizer(path)
        except Exception as e:
            raise CheckpointError(f"{path}: tokenizer files present but unreadable ({type(e).__name__}: {e})") from None
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tok, source=path, format="jetbeam",
                      extra={"quantized": bool(meta.get("quantized")), "source": meta.get("source")})
