"""Read a `torch.save` zip archive (.pth/.bin) as numpy arrays, without torch and without running pickle code.

A zip-format .pth holds `PREFIX/data.pkl` (the object tree), `PREFIX/data/KEY` (raw storage
bytes, stored uncompressed) and `PREFIX/byteorder`. The unpickler below resolves only the
handful of globals a plain state dict needs; anything else is refused with a CheckpointError
naming the file and the global. Tensors come back as `LazyTensor`s: `.numpy()` is a read-only
view of one memory map per archive (offset, size and stride honoured), so nothing is read
until it is used.
"""

from __future__ import annotations

import _compat_pickle
import collections
import mmap
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from engine.checkpoint import CheckpointError

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
        flat = st.archive.storage_array(st)
        n = int(np.prod(self.shape, dtype=np.int64))
        if n == 0:
            return np.empty(self.shape, st.dtype)
        last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        if self.offset < 0 or last >= st.numel:
            raise CheckpointError(f"{st.archive.path}: tensor view (offset {self.offset}, size {self.shape}, "
                                  f"stride {self.stride}) reaches past its storage of {st.numel} elements")
        base = flat[self.offset:]
        item = st.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            base, shape=self.shape, strides=tuple(s * item for s in self.stride), writeable=False)


def _int_tuple(x, what, path):
    if not isinstance(x, tuple) or not all(type(v) is int and v >= 0 for v in x):
        raise CheckpointError(f"{path}: bad tensor {what} {x!r} in data.pkl")
    return x


class TorchZip:
    """One zip-format torch archive. `load()` returns its object tree with LazyTensors."""

    def __init__(self, path: str):
        self.path = path
        self._mm = None
        try:
            self.zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path}: not a zip-format torch checkpoint (the legacy pre-1.6 "
                                  "torch.save format is not supported; re-save it with a recent torch)") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
        pkls = [n for n in self.zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one PREFIX/data.pkl in the archive, found {len(pkls)}")
        self.prefix = pkls[0][:-len("data.pkl")]
        bo = self.prefix + "byteorder"
        if bo in self.zf.namelist() and self.zf.read(bo).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

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
                    raise CheckpointError(f"{path}: unsupported persistent id {pid!r} in data.pkl")
                return archive._storage(pid[2], pid[1].dtype, pid[4])

        with self.zf.open(self.prefix + "data.pkl") as f:
            try:
                return Unpickler(f).load()
            except CheckpointError:
                raise
            except Exception as e:  # a corrupt pickle: stack underflow, bad opcode, EOF...
                raise CheckpointError(f"{path}: cannot read data.pkl ({type(e).__name__}: {e})") from None

    # --- storages ---------------------------------------------------------------------------
    def _storage(self, key, dtype, numel):
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {name!r} referenced by data.pkl is missing") from None
        if info.file_size < numel * dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage {name!r} holds {info.file_size} bytes, "
                                  f"needs {numel * dtype.itemsize} ({numel} x {dtype})")
        return _Storage(self, info, dtype, numel)

    def storage_array(self, st: _Storage) -> np.ndarray:
        info, nbytes = st.info, st.numel * st.dtype.itemsize
        if nbytes == 0:
            return np.empty(0, st.dtype)
        if info.compress_type != zipfile.ZIP_STORED:
            return np.frombuffer(self.zf.read(info), np.uint8)[:nbytes].view(st.dtype)
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
