"""The safetensors header, read with every declared size checked against the file before use.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`) and the data region.
Checkpoints come from hubs and other people's buckets, so the header is untrusted: N is
bounded by the file and by `MAX_HEADER_BYTES` before it is read, and every entry's dtype,
shape and byte range is checked (elements x itemsize == end - begin, 0 <= begin <= end <=
data size, no two ranges overlapping) before a byte of tensor data is mapped. A refusal is a
one-line CheckpointError naming the file. Shared by the Hugging Face and converted loaders.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from engine.checkpoint import CheckpointError, shown

# The safetensors library allows 100 MB, but parsing a header costs ~16x its size in Python
# objects; 16 MB (~250k tensors; a 1024-layer single-file model's header is ~1 MB) keeps that
# near 256 MB.
MAX_HEADER_BYTES = 16 << 20
MAX_NDIM = 8

ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
             "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
             "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
             "BOOL": np.dtype(np.bool_)}


def _is_int(x) -> bool:
    return type(x) is int


def _entry(path: str, name: str, info, dtypes: dict, data_size: int) -> dict:
    """One header entry as {"dtype", "shape", "data_offsets"} of plain ints, or CheckpointError."""
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{where}: header entry {shown(info)} is not "
                              "{\"dtype\", \"shape\", \"data_offsets\"}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise CheckpointError(f"{where} has unsupported dtype {shown(dtype)} "
                              f"(supported: {', '.join(dtypes)})")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape {shown(shape)} is not a list of at most {MAX_NDIM} "
                              "non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
        raise CheckpointError(f"{where}: data_offsets {shown(offsets)} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    nbytes = math.prod(shape) * dtypes[dtype].itemsize  # Python ints: no overflow
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: byte range {begin}..{end} ({end - begin} bytes) does not match "
                              f"shape {tuple(shape)} x {dtype} ({nbytes} bytes)")
    if end > data_size:
        raise CheckpointError(f"{path}: truncated: tensor {shown(name)} ends at data byte {end} but the "
                              f"file holds only {data_size} data bytes")
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def read_header(path: str, dtypes: dict = ST_DTYPES) -> tuple[dict, int, dict]:
    """(name -> {"dtype", "shape", "data_offsets"}, byte offset of the data region, __metadata__).

    Every entry is checked against `dtypes` and the file size; CheckpointError names the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = struct.unpack("<Q", head)[0]
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, "
                                      f"file of {size})")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds the "
                                      f"{MAX_HEADER_BYTES}-byte ceiling")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({shown(str(e), 200)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              "not an object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ is a JSON {type(meta).__name__}, not an object")
    data_size = size - 8 - n
    entries = {name: _entry(path, name, info, dtypes, data_size) for name, info in header.items()}
    ranges = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in entries.items()
                    if e["data_offsets"][1] > e["data_offsets"][0])
    for (_, end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {shown(prev)} and {shown(name)} overlap "
                                  f"(data bytes {begin}..{end})")
    return entries, 8 + n, meta
