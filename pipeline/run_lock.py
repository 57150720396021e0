"""One run at a time per output directory: `_jetbeam/lock.json`, created exclusively, kept fresh.

The lock is created with O_EXCL on local disk and with ifGenerationMatch=0 on GCS (gcsfs's
create mode), so of two runs started at once exactly one gets it; the other stops before any
work with a message naming the holder. The holder rewrites the lock's heartbeat every
`HEARTBEAT_S` seconds while it runs. A lock whose owner is gone is taken over: at once on the
owner's host when its process no longer exists, elsewhere once the heartbeat is older than
`STALE_AFTER_S` (a launcher killed with its Dataflow job still running looks dead after that
long: see docs/dataflow.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from transforms import fs
from transforms.output_dir import OutputError, state_path, tmp_dir

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0
STALE_AFTER_S = 180.0


class OutputBusy(OutputError):
    """Another live run holds the output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> Optional[dict]:
    try:
        d = json.loads(fs.read_bytes(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: a lock nobody can own
    return d if isinstance(d, dict) else {}


def stale_reason(lock: dict, now: Optional[float] = None) -> Optional[str]:
    """Why `lock`'s owner is gone, or None if it may still be running."""
    now = time.time() if now is None else now
    if not lock.get("token"):
        return "the lock file is unreadable"
    if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int):
        return None if _pid_alive(lock["pid"]) else f"process {lock['pid']} on this host has ended"
    age = now - float(lock.get("heartbeat") or 0)
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old"
    return None


class RunLock:
    """The lock of one output directory, held by one run; `release()` gives it back."""

    def __init__(self, output_dir: str, run_id: str):
        self.output_dir = output_dir
        self.run_id = run_id
        self.path = state_path(output_dir, "lock.json")
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _payload(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "heartbeat": time.time(), "token": self.token}).encode()

    @classmethod
    def acquire(cls, output_dir: str, run_id: str) -> "RunLock":
        """The lock, or OutputBusy naming the live run that holds it."""
        lock = cls(output_dir, run_id)
        fs.makedirs(state_path(output_dir))
        for _ in range(5):
            if fs.create_exclusive(lock.path, lock._payload()):
                held = _read(lock.path)  # an emulator may ignore the create precondition
                if held and held.get("token") == lock.token:
                    lock._start_heartbeat()
                    return lock
                raise lock._busy(held or {})
            held = _read(lock.path)
            if held is None:
                continue  # released in between: try again
            why = stale_reason(held)
            if why is None:
                raise lock._busy(held)
            log.warning("jetbeam: %s: taking over the lock of run %s (%s)", output_dir, held.get("run_id"), why)
            lock._break(held)
        raise OutputBusy(f"{output_dir}: could not take the run lock {lock.path} (other runs keep taking it)")

    def _busy(self, held: dict) -> OutputBusy:
        age = time.time() - float(held.get("heartbeat") or time.time())
        return OutputBusy(
            f"{self.output_dir} is in use by run {held.get('run_id')} (host {held.get('host')}, pid "
            f"{held.get('pid')}, alive {age:.0f} s ago): wait for it to end or use another --output; "
            f"a lock whose run is gone is taken over by itself ({self.path})")

    def _break(self, held: dict) -> None:
        if fs.is_remote(self.path):
            fs.remove(self.path)
            return
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking over, one moves it
        except FileNotFoundError:
            return
        os.remove(aside)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="jetbeam-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            held = _read(self.path)
            if not held or held.get("token") != self.token:
                log.error("jetbeam: %s: run %s lost its lock to run %s", self.output_dir, self.run_id,
                          (held or {}).get("run_id"))
                return
            try:
                fs.publish(self.path, self._payload(), tmp_dir(self.output_dir))
            except OSError as e:
                log.warning("jetbeam: lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.path)
        if held and held.get("token") == self.token:
            fs.remove(self.path)
