"""File-system helpers: local paths and gs:// through fsspec/gcsfs (not Beam's GCS client).

Beam's own GCS client looks for credentials for ~28 s per process when none are
configured; gcsfs is quick, honours STORAGE_EMULATOR_HOST (tests), and is what pyarrow
and pandas users already have.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Optional

# gcsfs >= 2025 probes for hierarchical-namespace buckets over gRPC on first use (up to
# 60 s per call without a real GCS); it must be switched off before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_options(path: str) -> dict:
    """Extra fsspec options: anonymous access when a GCS emulator is configured."""
    if path.startswith(("gs://", "gcs://")):
        token = os.environ.get("JETBEAM_GCS_TOKEN")
        if token:
            return {"token": token}
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return {"token": "anon"}
    return {}


def get_fs(path: str):
    """(filesystem, path without protocol) for a local path or URL."""
    fs, stripped = fsspec.core.url_to_fs(path, **storage_options(path))
    return fs, stripped


def _protocol(path: str) -> str:
    return path.split("://", 1)[0] if is_remote(path) else ""


def full_path(fs, stripped: str, like: str) -> str:
    """Put the protocol of `like` back on a path an fsspec call returned."""
    proto = _protocol(like)
    if not proto or "://" in stripped:
        return stripped
    return f"{proto}://{stripped}"


def join(directory: str, *names: str) -> str:
    if is_remote(directory):
        return posixpath.join(directory.rstrip("/"), *names)
    return os.path.join(directory, *names)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def glob(pattern: str) -> list[str]:
    """Files matching a glob (a plain path matches itself), as full paths/URLs, sorted."""
    fs, stripped = get_fs(pattern)
    if any(c in stripped for c in "*?["):
        found = fs.glob(stripped)
    else:
        found = [stripped] if fs.exists(stripped) else []
    out = []
    for p in found:
        if fs.isdir(p):
            continue
        out.append(full_path(fs, p, pattern))
    return sorted(out)


PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


def compression(path: str) -> Optional[str]:
    """The compression a JSONL file's name says (fsspec's codec name), or None."""
    return COMPRESSION_SUFFIXES.get(posixpath.splitext(path.lower())[1])


def uncompressed_name(path: str) -> str:
    """The file name without its compression suffix, lower case: "a.jsonl.gz" -> "a.jsonl"."""
    name = path.lower()
    return posixpath.splitext(name)[0] if compression(name) else name


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def is_data_file(path: str) -> bool:
    """A Parquet or (possibly compressed) JSONL file by its name: what a directory input reads."""
    return is_parquet(path) or uncompressed_name(path).endswith(JSON_SUFFIXES)


def _glob_base(pattern: str) -> str:
    """The directory a pattern's matches are named relative to: the part before its first wildcard,
    up to the last "/" ("data/*/part.parquet" -> "data"; a plain file -> its directory)."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    return pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else ""


def _relative(path: str, base: str) -> str:
    if base and not is_remote(base):
        base = os.path.abspath(base.removeprefix("file://"))  # local matches come back absolute
    base = base.rstrip("/")
    return path[len(base) + 1:] if base and path.startswith(base + "/") else basename(path)


def _directory_files(directory: str) -> list[str]:
    """Data files under a directory, at any depth, skipping names that start with "_" or "."
    (_SUCCESS markers, .crc checksums, hidden folders) and jetbeam output directories (those
    holding a `_jetbeam` folder), as full paths, sorted."""
    fsys, stripped = get_fs(directory)
    root = stripped.rstrip("/")
    found = [(p, p[len(root):].strip("/").split("/")) for p in fsys.find(root)]
    outputs = {tuple(parts[:parts.index("_jetbeam")]) for _, parts in found if "_jetbeam" in parts}
    out = []
    for p, parts in found:
        if any(part.startswith(("_", ".")) for part in parts) or not is_data_file(p):
            continue
        if any(tuple(parts[:i]) in outputs for i in range(len(parts))):
            continue
        out.append(full_path(fsys, p, directory))
    return sorted(out)


def expand_inputs(spec: str) -> list[tuple[str, str]]:
    """(path, name) of every input file of a comma-separated list of files, globs and directories;
    ValueError naming an entry that matches nothing. `name` is the file's path relative to the
    entry's fixed part (a file named directly or matched in one directory: its base name), which
    rows without an id column are numbered under, so files of the same name in different
    partition folders ("date=1/part-0.parquet") give different ids."""
    files: dict[str, str] = {}
    for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            fsys, stripped = get_fs(pattern)
            is_dir = not any(c in stripped for c in "*?[") and fsys.isdir(stripped)
            matched = _directory_files(pattern) if is_dir else glob(pattern)
        except Exception as e:  # no such protocol, its package missing, credentials, network
            raise ValueError(f"--input {pattern!r}: cannot list it ({type(e).__name__}: {e})") from None
        if is_dir:
            base = pattern
            if not matched and fsys.isdir(stripped.rstrip("/") + "/_jetbeam"):
                raise ValueError(f"--input {pattern!r} is a jetbeam output directory, not prompts")
            if not matched:
                raise ValueError(f"--input {pattern!r} is a directory with no Parquet or JSONL files "
                                 f"(.parquet, .pq, .parq, .jsonl, .json, .ndjson; JSON also as .gz, .bz2, "
                                 f".xz, .zst)")
        else:
            base = _glob_base(pattern)
            if not matched:
                raise ValueError(f"--input {pattern!r} matches no files")
        for m in matched:
            files.setdefault(m, _relative(m, base))
    if not files:
        raise ValueError("--input is empty")
    return list(files.items())


def makedirs(directory: str) -> None:
    """Create a local directory; a no-op on object stores, which have none (and where gcsfs
    would create a missing bucket instead of reporting it)."""
    if is_remote(directory):
        return
    os.makedirs(directory, exist_ok=True)


def open_file(path: str, mode: str = "rb", compression: Optional[str] = None):
    fs, stripped = get_fs(path)
    return fs.open(stripped, mode, compression=compression)


def list_files(directory: str, prefix: str, suffix: str = "") -> list[str]:
    """Files directly in `directory` whose names start with prefix and end with suffix."""
    fs, stripped = get_fs(directory)
    fs.invalidate_cache(stripped)  # other processes (workers, earlier runs) may have written here
    try:
        entries = fs.ls(stripped, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        name = posixpath.basename(e.rstrip("/"))
        if name.startswith(prefix) and name.endswith(suffix):
            out.append(join(directory, name))
    return sorted(out)


def remove(path: str, recursive: bool = False) -> None:
    fs, stripped = get_fs(path)
    try:
        fs.rm(stripped, recursive=recursive)
    except FileNotFoundError:
        pass


def move(src: str, dst: str) -> None:
    fs, s = get_fs(src)
    _, d = get_fs(dst)
    fs.mv(s, d)


def write_bytes(path: str, data: bytes) -> None:
    with open_file(path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def exists(path: str) -> bool:
    fs, stripped = get_fs(path)
    fs.invalidate_cache(stripped)
    return fs.exists(stripped)


def create_exclusive(path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist yet; False if it does.

    Local files use O_EXCL; gs:// uses gcsfs's create mode (ifGenerationMatch=0), so of two
    writers racing for one name exactly one wins on either."""
    if not is_remote(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if exists(path):
        return False
    try:
        with open_file(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def publish(path: str, data: bytes, tmp_dir: str) -> None:
    """Make `path` appear whole or not at all: a local file is written and fsynced under
    `tmp_dir` then renamed into place; an object store publishes an object only once its
    upload completes."""
    if is_remote(path):
        write_bytes(path, data)
        return
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, os.path.basename(path) + ".inprogress")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def publishing(path: str, tmp_dir: str):
    """A binary file to write piece by piece that, like `publish`, appears at `path` whole or not
    at all: a local file is renamed into place when the block ends without an error; an object
    is uploaded when it closes, and removed again if the block failed."""
    if is_remote(path):
        try:
            with open_file(path, "wb") as f:
                yield f
        except BaseException:
            remove(path)
            raise
        return
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, os.path.basename(path) + ".inprogress")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
