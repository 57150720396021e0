"""Read a `torch.save` zip archive (.pth/.bin) as numpy arrays, without torch and without running pickle code.

A zip-format .pth holds `PREFIX/data.pkl` (the object tree), `PREFIX/data/KEY` (raw storage
bytes, stored uncompressed) and `PREFIX/byteorder`. The unpickler below resolves only the
handful of globals a plain state dict needs; anything else is refused with a CheckpointError
naming the file and the global. Tensors come back as `LazyTensor`s: `.numpy()` is a read-only
view of one memory map per archive (offset, size and stride honoured), so nothing is read
until it is used.

The archive is untrusted, so every size it declares is bounded before anything is allocated
from it: the zip's entry count and central directory (read from its end record before
`zipfile` builds an object per entry), data.pkl's length, each storage's record (stored
uncompressed, inside the file, large enough for its elements) and each tensor's view
(offset + extent within its storage), all at open time.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import mmap
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from engine.checkpoint import CheckpointError, shown

MAX_ZIP_ENTRIES = 1 << 17  # a 1024-layer shard holds ~10k storages
MAX_CENTRAL_DIR_BYTES = 64 << 20
MAX_PICKLE_BYTES = 8 << 20  # data.pkl of a 1024-layer shard is ~1.5 MB
MAX_NDIM = 8

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands in for torch.<X>Storage: only names a dtype, can't be called."""

    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    __slots__ = ("archive", "info", "dtype", "numel")

    def __init__(self, archive, info, dtype, numel):
        self.archive, self.info, self.dtype, self.numel = archive, info, dtype, numel


class LazyTensor:
    """A tensor not read yet: `.shape`, `.dtype`, `.numpy()` (read-only view)."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def dtype(self):
        return self.storage.dtype

    def numpy(self) -> np.ndarray:
        st = self.storage
        if _check_view(st, self.offset, self.shape, self.stride) == 0:
            return np.empty(self.shape, st.dtype)
        flat = st.archive.storage_array(st)
        base = flat[self.offset:]
        item = st.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            base, shape=self.shape, strides=tuple(s * item for s in self.stride), writeable=False)


def _int_tuple(x, what, path):
    if not isinstance(x, tuple) or len(x) > MAX_NDIM or not all(type(v) is int and v >= 0 for v in x):
        raise CheckpointError(f"{path}: bad tensor {what} {shown(x)} in data.pkl")
    return x


def _check_view(st: "_Storage", offset: int, shape: tuple, stride: tuple) -> int:
    """The view's element count, after checking it lies inside its storage (CheckpointError if not)."""
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return 0
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if offset < 0 or last >= st.numel:
        raise CheckpointError(f"{st.archive.path}: tensor view (offset {offset}, size {shape}, "
                              f"stride {stride}) reaches past its storage of {st.numel} elements")
    return n


def _zip_directory(path: str) -> tuple[int, int]:
    """(entries, central directory bytes) the zip's end record declares; (0, 0) if it has none
    (zipfile then refuses the file). Read before zipfile builds one object per entry."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_start = max(0, size - (22 + 0xFFFF))
        f.seek(tail_start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return 0, 0
        entries, cd_size = struct.unpack("<HL", tail[at + 10:at + 16])
        loc = at - 20
        if loc >= 0 and tail[loc:loc + 4] == b"PK\x06\x07":  # zip64: the real counts are elsewhere
            (z64,) = struct.unpack("<Q", tail[loc + 8:loc + 16])
            if z64 + 56 > size:
                return 1 << 62, 1 << 62
            f.seek(z64)
            rec = f.read(56)
            if rec[:4] != b"PK\x06\x06":
                return 1 << 62, 1 << 62
            entries, cd_size = struct.unpack("<QQ", rec[32:48])
        return entries, cd_size


class TorchZip:
    """One zip-format torch archive. `load()` returns its object tree with LazyTensors."""

    def __init__(self, path: str):
        self.path = path
        self._mm = None
        try:
            self.size = os.path.getsize(path)
            entries, cd_size = _zip_directory(path)
            if entries > MAX_ZIP_ENTRIES or cd_size > min(MAX_CENTRAL_DIR_BYTES, self.size):
                raise CheckpointError(f"{path}: zip directory declares {entries} entries in {cd_size} bytes "
                                      f"(at most {MAX_ZIP_ENTRIES} entries, {MAX_CENTRAL_DIR_BYTES} bytes and "
                                      "the file's size)")
            self.zf = zipfile.ZipFile(path)
        except CheckpointError:
            raise
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path}: not a zip-format torch checkpoint (the legacy pre-1.6 "
                                  "torch.save format is not supported; re-save it with a recent torch)") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
        except (ValueError, EOFError, NotImplementedError) as e:  # zipfile's own refusals
            raise CheckpointError(f"{path}: corrupt zip archive ({e})") from None
        pkls = [n for n in self.zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one PREFIX/data.pkl in the archive, found {len(pkls)}")
        self.prefix = pkls[0][:-len("data.pkl")]
        bo = self.prefix + "byteorder"
        if bo in self.zf.namelist() and self._read_small(bo, 16).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

    def _read_small(self, name: str, limit: int) -> bytes:
        """The bytes of archive member `name`, refused unless it declares at most `limit` of them
        (a deflated member could otherwise expand to any size)."""
        info = self.zf.getinfo(name)
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: {name} declares {info.file_size} bytes, more than the "
                                  f"{limit} it may hold")
        try:
            return self.zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot read {name} ({e})") from None

    # --- unpickling -------------------------------------------------------------------------
    def load(self):
        archive = self
        path = self.path

        def rebuild_tensor(storage, storage_offset, size, stride, *rest):
            if not isinstance(storage, _Storage) or type(storage_offset) is not int:
                raise CheckpointError(f"{path}: malformed tensor record in data.pkl")
            size = _int_tuple(size, "size", path)
            stride = _int_tuple(stride, "stride", path)
            if len(size) != len(stride):
                raise CheckpointError(f"{path}: tensor size {size} and stride {stride} disagree")
            _check_view(storage, storage_offset, size, stride)
            return LazyTensor(storage, storage_offset, size, stride)

        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        allowed.update({("torch", n): _StorageType(n) for n in STORAGE_DTYPES})

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                # Protocol-2 pickles spell Python 3 names the Python 2 way (__builtin__.eval):
                # name them as Python would resolve them.
                if (module, name) in _compat_pickle.NAME_MAPPING:
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                elif module in _compat_pickle.IMPORT_MAPPING:
                    module = _compat_pickle.IMPORT_MAPPING[module]
                try:
                    return allowed[(module, name)]
                except (KeyError, TypeError):
                    raise CheckpointError(
                        f"{path}: refusing to load: data.pkl asks for the global {module}.{name}, "
                        "which a plain tensor state dict never needs") from None

            def persistent_load(self, pid):
                if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                        or type(pid[4]) is not int or pid[4] < 0):
                    raise CheckpointError(f"{path}: unsupported persistent id {shown(pid)} in data.pkl")
                return archive._storage(pid[2], pid[1].dtype, pid[4])

        data = self._read_small(self.prefix + "data.pkl", MAX_PICKLE_BYTES)
        try:
            return Unpickler(io.BytesIO(data)).load()
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt pickle: stack underflow, bad opcode, EOF, MemoryError...
            raise CheckpointError(f"{path}: cannot read data.pkl ({type(e).__name__}: {shown(str(e), 200)})") from None

    # --- storages ---------------------------------------------------------------------------
    def _storage(self, key, dtype, numel):
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {shown(name)} referenced by data.pkl is missing") from None
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{self.path}: storage {name!r} is compressed (torch.save stores "
                                  "storages uncompressed)")
        if info.header_offset + 30 + len(info.orig_filename.encode()) + info.file_size > self.size:
            raise CheckpointError(f"{self.path}: storage {name!r} of {info.file_size} bytes at byte "
                                  f"{info.header_offset} reaches past the end of the file ({self.size} bytes)")
        if info.file_size < numel * dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage {name!r} holds {info.file_size} bytes, "
                                  f"needs {numel * dtype.itemsize} ({numel} x {dtype})")
        return _Storage(self, info, dtype, numel)

    def storage_array(self, st: _Storage) -> np.ndarray:
        info, nbytes = st.info, st.numel * st.dtype.itemsize
        if nbytes == 0:
            return np.empty(0, st.dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # The local header's extra field may differ from the central directory's.
        hdr = self._mm[info.header_offset:info.header_offset + 30]
        if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: bad zip local header for {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", hdr[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + nbytes > len(self._mm):
            raise CheckpointError(f"{self.path}: storage {info.filename!r} is truncated")
        return np.frombuffer(self._mm, np.uint8, count=nbytes, offset=start).view(st.dtype)


def load_torch_zip(path: str):
    """The object tree of a zip-format torch checkpoint, tensors as LazyTensor."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    return TorchZip(path).load()
