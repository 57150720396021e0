"""A bounded reader of GGUF headers (llama.cpp's single-file format, versions 2 and 3).

The loader reads GGUF with this rather than `gguf.GGUFReader`: GGUFReader walks every count a
file declares (key/values, array lengths, tensors), building a numpy view per element, before
anything compares the count with the file, so a 2**62-entry token array grows memory until the
machine dies, and a count past the end surfaces as a bare IndexError. Here every count, length,
shape and offset is checked against the bytes left in the file and against the ceilings below
before anything is allocated for it, and a refusal is a one-line CheckpointError naming the
file and the key or tensor. Metadata comes back as plain Python values (numeric arrays as
numpy arrays); tensor data as read-only views of one memory map, made only when asked for.

Layout (little-endian): b"GGUF", uint32 version, uint64 tensor count, uint64 key/value count;
per key/value a string key, uint32 value type and the value (scalar | string: uint64 length +
UTF-8 bytes | array: uint32 element type + uint64 count + elements); per tensor a string name,
uint32 n_dims, n_dims x uint64 ne (fastest dimension first), uint32 ggml type, uint64 offset
into the data region, which starts at the next multiple of general.alignment (default 32).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.checkpoint import CheckpointError, shown

MAX_KV = 1 << 16  # key/value pairs (a Llama GGUF has ~40)
MAX_TENSORS = 1 << 16  # a 1024-layer Llama has ~10k
MAX_ARRAY = 1 << 22  # elements of one array (vocabularies: <= 2**21 tokens; merges)
MAX_ARRAY_TOTAL = 1 << 22  # elements of all arrays together (Llama 3: ~0.7M; ~60 bytes each as str)
MAX_STRING = 16 << 20  # bytes of one string (chat templates, the longest, are ~100 kB)
MAX_NAME = 1 << 10  # bytes of a key or tensor name (llama.cpp: 64 for tensor names)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 40  # values along one dimension
MAX_ALIGNMENT = 1 << 20

_STRING, _ARRAY = 8, 9
# value type -> (struct format of a scalar, numpy dtype of an array)
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
_BOOL = 7
# ggml types whose GGUFReader data view is typed (everything else is raw uint8 blocks)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFTensor:
    """One tensor's header: `name`, `tensor_type`, `shape` (ggml ne, fastest first), `n_elements`,
    `n_bytes`, `data_offset` (absolute); `data` is the stored bytes as gguf.GGUFReader gives them."""

    __slots__ = ("file", "name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset")

    def __init__(self, file, name, tensor_type, shape, n_elements, n_bytes, data_offset):
        self.file, self.name, self.tensor_type, self.shape = file, name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset = n_elements, n_bytes, data_offset

    @property
    def data(self) -> np.ndarray:
        from gguf.quants import quant_shape_to_byte_shape
        dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        raw = np.frombuffer(self.file.mm, np.uint8, count=self.n_bytes, offset=self.data_offset)
        plain = _PLAIN.get(int(self.tensor_type))
        if plain is not None:
            return raw.view(plain).reshape(dims)
        return raw.reshape(quant_shape_to_byte_shape(dims, self.tensor_type))


class GGUFFile:
    """The header of one GGUF file: `fields` {key: value}, `tensors` [GGUFTensor], `version`."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.size = os.path.getsize(path)
            if self.size < 24:
                raise CheckpointError(f"{path}: not a GGUF file ({self.size} bytes, shorter than a GGUF header)")
            with open(path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        self.pos = 0
        self.items = 0  # array elements read so far, against MAX_ARRAY_TOTAL
        self._read_header()

    # --- primitives: each checks the bytes it needs are in the file -----------------------
    def _fail(self, what: str):
        raise CheckpointError(f"{self.path}: {what}")

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self._fail(f"{what} needs {n} bytes at byte {self.pos}, but the file ends at byte {self.size}")

    def _unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        out = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def _string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self._unpack("<Q", what)
        if n > limit:
            self._fail(f"{what}: string of {n} bytes exceeds the {limit}-byte ceiling")
        self._need(n, what)
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._fail(f"{what}: not UTF-8 ({e.reason} at byte {e.start})")

    def _count(self, n: int, per_item: int, limit: int, what: str) -> int:
        """`n` items of at least `per_item` bytes each: within `limit` and the bytes left."""
        if n > limit:
            self._fail(f"{what}: {n} entries exceed the ceiling of {limit}")
        if n * per_item > self.size - self.pos:
            self._fail(f"{what}: {n} entries need at least {n * per_item} bytes, but only "
                       f"{self.size - self.pos} remain in the file")
        return n

    # --- values ------------------------------------------------------------------------------
    def _value(self, vtype: int, key: str) -> Any:
        what = f"metadata {shown(key)}"
        if vtype == _STRING:
            return self._string(what)
        if vtype in _SCALARS:
            value = self._unpack(_SCALARS[vtype][0], what)
            return bool(value) if vtype == _BOOL else value
        if vtype != _ARRAY:
            self._fail(f"{what}: unknown value type {vtype}")
        etype, n = self._unpack("<IQ", what)
        if etype == _STRING:
            self._count(n, 8, MAX_ARRAY, what)
        elif etype in _SCALARS:
            self._count(n, struct.calcsize(_SCALARS[etype][0]), MAX_ARRAY, what)
        else:
            self._fail(f"{what}: array of value type {etype} is not supported")
        self.items += n
        if self.items > MAX_ARRAY_TOTAL:
            self._fail(f"{what}: the arrays hold more than {MAX_ARRAY_TOTAL} entries in all")
        if etype == _STRING:
            return [self._string(f"{what}[{i}]") for i in range(n)]
        dtype = np.dtype(_SCALARS[etype][1])
        arr = np.frombuffer(self.mm, dtype, count=n, offset=self.pos).copy()
        self.pos += n * dtype.itemsize
        return arr != 0 if etype == _BOOL else arr

    # --- the header --------------------------------------------------------------------------
    def _read_header(self) -> None:
        magic = self.mm[:4]
        if magic != b"GGUF":
            self._fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.pos = 4
        self.version = self._unpack("<I", "version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            self._fail(f"GGUF version {self.version} is not supported (2 and 3 are){hint}")
        n_tensors, n_kv = self._unpack("<QQ", "tensor and key/value counts")
        self._count(n_kv, 13, MAX_KV, "key/value count")  # key length, type, 1-byte value
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string("metadata key", MAX_NAME)
            if key in self.fields:
                self._fail(f"metadata key {shown(key)} appears twice")
            self.fields[key] = self._value(self._unpack("<I", f"metadata {shown(key)}"), key)
        self._count(n_tensors, 24, MAX_TENSORS, "tensor count")  # name length, n_dims, type, offset
        infos = [self._tensor_info() for _ in range(n_tensors)]
        names = set()
        for name, *_ in infos:
            if name in names:
                self._fail(f"tensor {shown(name)} appears twice")
            names.add(name)
        align = self.fields.get("general.alignment", 32)
        if type(align) is not int or align <= 0 or align & (align - 1) or align > MAX_ALIGNMENT:
            self._fail(f"general.alignment {shown(align)} is not a power of two up to {MAX_ALIGNMENT}")
        self.data_start = -(-self.pos // align) * align
        self.tensors = [self._tensor(*info, align) for info in infos]
        spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in self.tensors if t.n_bytes)
        for (_, end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < end:
                self._fail(f"tensors {shown(prev)} and {shown(name)} overlap (bytes {begin}..{end})")

    def _tensor_info(self) -> tuple:
        name = self._string("tensor name", MAX_NAME)
        what = f"tensor {shown(name)}"
        n_dims = self._unpack("<I", what)
        if n_dims > MAX_DIMS:
            self._fail(f"{what}: {n_dims} dimensions (at most {MAX_DIMS})")
        ne = self._unpack(f"<{n_dims}Q", what) if n_dims else ()
        ne = (ne,) if isinstance(ne, int) else tuple(ne)
        ggml_type, offset = self._unpack("<IQ", what)
        return name, ne, ggml_type, offset

    def _tensor(self, name: str, ne: tuple, ggml_type: int, offset: int, align: int) -> GGUFTensor:
        what = f"tensor {shown(name)}"
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            self._fail(f"{what}: unknown ggml type {ggml_type}")
        if any(d > MAX_DIM for d in ne):
            self._fail(f"{what}: shape {list(ne)} has a dimension over {MAX_DIM}")
        n = math.prod(ne)
        if ne and ne[0] % block:
            self._fail(f"{what}: row of {ne[0]} values is not a multiple of the {qtype.name} block ({block})")
        n_bytes = n // block * type_size
        data_size = self.size - self.data_start
        if offset % align or offset + n_bytes > data_size:
            self._fail(f"{what}: {n_bytes} bytes at data offset {offset} (shape {list(ne)}, {qtype.name}) "
                       f"are {'misaligned' if offset % align else 'past the end of the file'} "
                       f"(data region of {data_size} bytes, alignment {align})")
        return GGUFTensor(self, name, qtype, np.array(ne, np.uint64), n, n_bytes, self.data_start + offset)
