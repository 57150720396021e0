"""The output directory's format: committed pieces, their names, and healing.

    completions-<run>-<piece>.parquet   completion rows, one piece per commit
    errors-<run>-<piece>.jsonl          error rows, one piece per commit
    metrics-<run>.json, .csv            one run's numbers
    metrics.json, metrics.csv           every run that wrote here, one entry each
    _jetbeam/lock.json                  held while a run writes here (pipeline/run_lock.py)
    _jetbeam/runs/<run>.json            each run's manifest: settings, start, end, status
    _jetbeam/tmp/                       local pieces being written, renamed into place when whole

A piece appears whole or not at all (`fs.publish`), so a row is committed exactly when its
piece is listed here. Exactly once means one record per key: the row id (with its sample_index
past sample 0, for rows asking for n samples), or for an error row that reports a repeated input
id, that id and the repeated row's source. `heal` restores it
after a killed run or a retried bundle left two records of a key.
"""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from transforms import fs

COMPLETIONS = "completions"
ERRORS = "errors"
EXT = {COMPLETIONS: "parquet", ERRORS: "jsonl"}
STATE_DIR = "_jetbeam"
DUPLICATE = "duplicate"  # the stage of an error row reporting a repeated input id

_RUN = r"\d{8}-\d{6}(?:\d{3})?-[0-9a-f]{6}"  # date-time(ms)-random: sorts by start time
_PIECE_RE = re.compile(rf"^(completions|errors)-({_RUN})-([0-9a-z]+)\.(parquet|jsonl)$")


class OutputError(ValueError):
    """Something in the output directory stops the run; one line naming the file and what to do."""


@dataclass(frozen=True)
class Piece:
    path: str
    kind: str  # COMPLETIONS | ERRORS
    run_id: str

    @property
    def name(self) -> str:
        return fs.basename(self.path)


def new_run_id() -> str:
    """`<yyyymmdd>-<hhmmss><ms>-<random>`: run ids sort in the order the runs started."""
    import time
    import uuid
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}-{uuid.uuid4().hex[:6]}"


def piece_name(kind: str, run_id: str) -> str:
    import uuid
    return f"{kind}-{run_id}-{uuid.uuid4().hex[:12]}.{EXT[kind]}"


def state_path(output_dir: str, *names: str) -> str:
    return fs.join(output_dir, STATE_DIR, *names)


def tmp_dir(output_dir: str) -> str:
    return state_path(output_dir, "tmp")


def list_pieces(output_dir: str) -> list[Piece]:
    """Every committed piece, oldest run first."""
    out = []
    for kind in (COMPLETIONS, ERRORS):
        for path in fs.list_files(output_dir, f"{kind}-", f".{EXT[kind]}"):
            m = _PIECE_RE.match(fs.basename(path))
            if m:
                out.append(Piece(path, kind, m.group(2)))
    return sorted(out, key=lambda p: (p.run_id, p.name))


def record_key(record: dict) -> str:
    """What exactly-once counts: the id, id#k for sample k > 0 of a completion, or id@source for
    a repeated input id's error row."""
    if record.get("stage") == DUPLICATE:
        return f"{record.get('id')}@{record.get('source')}"
    if record.get("sample_index"):
        return f"{record.get('id')}#{record.get('sample_index')}"
    return str(record.get("id"))


# ---- reading and writing pieces ----

def encode_errors(records: list) -> bytes:
    lines = [to_json({k: r.get(k) for k in ("id", "stage", "reason", "source", "row")}) for r in records]
    return ("\n".join(lines) + "\n").encode("utf-8")


def to_json(o) -> str:
    return json.dumps(o, ensure_ascii=False, default=lambda v: v.decode("utf-8", "replace")
                      if isinstance(v, bytes) else str(v))


def _unreadable(piece: Piece, e: Exception) -> OutputError:
    return OutputError(f"{piece.path}: unreadable {piece.kind} piece ({type(e).__name__}: {e}); it was not "
                       f"written by jetbeam's commit: move it out of the output directory and re-run (its "
                       f"rows are then served again)")


def read_records(piece: Piece, columns: Optional[list] = None) -> list[dict]:
    """A piece's rows as dicts (completions: only `columns` if given); OutputError if unreadable."""
    try:
        if piece.kind == COMPLETIONS:  # only the columns asked for (that it has) are fetched
            import pyarrow.parquet as pq
            with fs.open_file(piece.path, "rb") as f:
                pf = pq.ParquetFile(f)
                if columns is not None:
                    columns = [c for c in columns if c in pf.schema_arrow.names]
                return pf.read(columns=columns).to_pylist()
        out = []
        for line in fs.read_bytes(piece.path).decode("utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("a line is not a JSON object")
                out.append(rec)
        return out
    except OutputError:
        raise
    except Exception as e:
        raise _unreadable(piece, e) from None


def piece_keys(piece: Piece) -> list[tuple[str, dict]]:
    """(key, facts) of each record: facts hold the id, stage and source (errors) for resuming."""
    if piece.kind == COMPLETIONS:
        return [(record_key(r), {"id": str(r["id"]), "kind": COMPLETIONS})
                for r in read_records(piece, ["id", "sample_index"])]
    return [(record_key(r), {"id": str(r.get("id")), "kind": ERRORS, "stage": r.get("stage"),
                             "source": r.get("source")}) for r in read_records(piece)]


def read_all_keys(pieces: list[Piece], threads: int = 16) -> list[list[tuple[str, dict]]]:
    """piece_keys of every piece, read concurrently (object stores answer one request at a time)."""
    if len(pieces) <= 1:
        return [piece_keys(p) for p in pieces]
    with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
        return list(pool.map(piece_keys, pieces))


# ---- healing ----

@dataclass
class Scan:
    """What a directory holds once healed: records per kind and per run, and what was removed."""

    completions: int = 0
    errors: int = 0
    rows_by_run: dict = field(default_factory=dict)
    removed_records: int = 0
    removed_pieces: list = field(default_factory=list)
    removed_tmp: int = 0


def _keep_order(pieces: list[Piece]) -> list[Piece]:
    """Which record of a key survives: a completion over an error, the oldest completion, the
    newest error (a retried row's latest reason)."""
    comps = [p for p in pieces if p.kind == COMPLETIONS]
    errs = [p for p in pieces if p.kind == ERRORS][::-1]
    return comps + errs


def heal(output_dir: str) -> Scan:
    """Leave one record per key, remove temporary leftovers; returns what the directory holds.

    Run only while holding the directory's lock: it rewrites pieces that hold a duplicate (a new
    piece is published before the old one is removed, so a kill in between leaves a duplicate
    for the next heal, never a lost row).
    """
    scan = Scan()
    scan.removed_tmp = clean_tmp(output_dir)
    ordered = _keep_order(list_pieces(output_dir))
    keys = dict(zip(ordered, read_all_keys(ordered)))
    seen: set = set()
    for piece in ordered:
        records = keys[piece]
        keep = []
        for i, (key, _) in enumerate(records):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        if len(keep) < len(records):
            scan.removed_records += len(records) - len(keep)
            _rewrite(output_dir, piece, keep)
            scan.removed_pieces.append(piece.name)
        if keep:
            n = len(keep)
            setattr(scan, piece.kind, getattr(scan, piece.kind) + n)
            by = scan.rows_by_run.setdefault(piece.run_id, {COMPLETIONS: 0, ERRORS: 0})
            by[piece.kind] += n
    return scan


def _rewrite(output_dir: str, piece: Piece, keep: list[int]) -> None:
    """Replace `piece` by one holding only its rows at `keep` (none: just remove it)."""
    if keep:
        if piece.kind == COMPLETIONS:
            import pyarrow.parquet as pq
            table = pq.read_table(io.BytesIO(fs.read_bytes(piece.path))).take(keep)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            data = buf.getvalue()
        else:
            records = read_records(piece)
            data = encode_errors([records[i] for i in keep])
        fs.publish(fs.join(output_dir, piece_name(piece.kind, piece.run_id)), data, tmp_dir(output_dir))
    fs.remove(piece.path)


def clean_tmp(output_dir: str) -> int:
    """Remove pieces a killed writer left half-written; returns how many."""
    leftovers = fs.list_files(tmp_dir(output_dir), "", ".inprogress")
    for path in leftovers:
        fs.remove(path)
    return len(leftovers)


# ---- run manifests ----

def write_manifest(output_dir: str, run_id: str, manifest: dict) -> None:
    """Record (or update) a run's manifest: its settings, start, end and status."""
    fs.makedirs(state_path(output_dir, "runs"))
    fs.publish(state_path(output_dir, "runs", f"{run_id}.json"),
               (json.dumps(manifest, indent=1, default=str) + "\n").encode("utf-8"), tmp_dir(output_dir))


def read_manifests(output_dir: str) -> list[dict]:
    """Every run's manifest, oldest first (an unreadable one is skipped: it only informs)."""
    out = []
    for path in fs.list_files(state_path(output_dir, "runs"), "", ".json"):
        try:
            m = json.loads(fs.read_bytes(path))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and m.get("run_id"):
            out.append(m)
    return sorted(out, key=lambda m: m["run_id"])
