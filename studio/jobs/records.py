"""Job records: the states a job's record (``<runs>/<job_id>/job.json``) goes through, the names of the
files in a job folder, and what every process that touches records shares: timestamps and tokens, the
attempt history, atomic writes of a record, when a worker counts as dead (``MAX_ATTEMPTS``, ``STALE_S``)
and the bounded :class:`RecordCache` of the records one process read. :class:`studio.jobs.jobs.Jobs`
reads and updates records with these; the worker and the supervisor use them directly.

Record life cycle::

    queued --claim--> running --> done | failed | cancelled
       ^                 |
       +-- re-queued ----+  (worker died: resumes from its checkpoint; or worker shut down)

Every enqueueing has a fresh ``token``; a worker runs a job only after claiming the record's
current token, so stale or duplicated messages are skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINAL = frozenset({DONE, FAILED, CANCELLED})
KINDS = ("train", "generate")  # a refinement (studio.styles.refine) is a train job; room for "evaluate"
JOB_FILE, PROGRESS_FILE, CANCEL_FILE = "job.json", "progress.json", "cancel"
WORKERS_DIR = ".workers"  # <runs>/.workers/<worker_id>.json: each worker's heartbeat
MAX_ATTEMPTS = int(os.environ.get("STUDIO_MAX_ATTEMPTS", "3"))
# A worker whose heartbeat is older than this is taken for dead (it beats every couple of seconds
# from its own thread, also while a long step or a model load runs).
STALE_S = float(os.environ.get("STUDIO_STALE_S", "60"))
RECORD_CACHE_SIZE = int(os.environ.get("STUDIO_RECORD_CACHE", "2000"))  # job records kept in memory per process


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_token() -> str:
    return secrets.token_hex(8)


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether process ``pid`` on this host runs and is the same process (not a reused pid)."""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 2.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def worker_dead(worker: dict | None, stale_s: float = STALE_S) -> bool:
    """Whether the worker recorded on a running job is gone (dead pid here, or silent too long)."""
    if not worker:
        return True
    if worker.get("host") == socket.gethostname() and not pid_alive(worker.get("pid"), worker.get("pid_started")):
        return True
    return time.time() - float(worker.get("heartbeat") or 0) > stale_s


class RecordCache:
    """The job records a process read, by job id, with the file identity (inode, mtime, size) they were read at.

    Bounded: the least recently used records go beyond ``max_entries``, and :meth:`Jobs._records`
    drops those of deleted job folders, so a web app that runs for months and lists thousands of
    jobs keeps a fixed amount of them in memory. Thread-safe (the web app serves polls in threads).
    """

    def __init__(self, max_entries: int = RECORD_CACHE_SIZE):
        self.max_entries = max(1, int(max_entries))
        self._entries: OrderedDict[str, tuple[tuple[int, int, int], dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> tuple[tuple[int, int, int], dict] | None:
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is not None:
                self._entries.move_to_end(job_id)
            return entry

    def put(self, job_id: str, key: tuple[int, int, int], record: dict) -> None:
        with self._lock:
            self._entries[job_id] = (key, record)
            self._entries.move_to_end(job_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._entries.pop(job_id, None)

    def retain(self, job_ids: set[str]) -> None:
        """Forget every record whose job is not in ``job_ids`` (its folder was deleted)."""
        with self._lock:
            for job_id in [j for j in self._entries if j not in job_ids]:
                del self._entries[job_id]

    def __len__(self) -> int:
        return len(self._entries)


def end_attempt(record: dict, outcome: str) -> None:
    """Close the open entry of the record's attempt history (in place)."""
    history = record.setdefault("history", [])
    if history and history[-1].get("ended") is None:
        history[-1].update(ended=now_iso(), outcome=outcome)


def write_record(path: Path, record: dict) -> None:
    """Write a job record atomically (temp file, fsync, ``os.replace``).

    Unlike ``training.write_json`` the temp name is unique: processes on several hosts (web app,
    workers, reconcilers) may write one record at the same moment, and must never share a temp file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

