"""The job queue on Huey: a SQLite file in the data folder by default, Redis when a URL is set.

A queue message only says "run job X, enqueueing T" (``job_id``, ``token``); the job record on
the shared data folder is the source of truth. Whoever wants to run or cancel a queued job first
*claims* its token in the queue's key-value store (``put_if_empty``: one SQL insert or one
``HSETNX``, atomic in both backends and across hosts), so a job runs once even if its message is
delivered twice, or a worker already served it between training steps.

The SQLite file is checked when a queue opens it: a damaged file (random bytes, a broken page)
is moved aside as ``<file>.corrupt-<time>`` and replaced by an empty queue, which
:class:`studio.jobs.jobs.Jobs` refills from the job records. A file that gets damaged while the
studio runs is handled the same way on the first error, and every process that has the
queue open follows the replacement. Repeating consumer errors are logged once, then at
growing intervals, instead of once a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huey import PriorityRedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer
from huey.storage import SqliteStorage

from studio import config
from studio.errors import StudioError

log = logging.getLogger("studio.queue")

TASK_NAME = "studio.run_job"
# Higher runs first: a generation (seconds) never waits behind queued trainings (minutes).
# "caption" before "train": a training queued after its captions never starts without them.
PRIORITY = {"generate": 10, "caption": 8, "refine": 0, "evaluate": 5, "train": 0}


@dataclass(frozen=True)
class Settings:
    """Where one studio keeps its jobs and templates, and which queue its workers share."""

    runs_dir: Path
    store_dir: Path
    redis_url: str | None = None
    queue_file: Path | None = None  # the SQLite queue; default <runs>/.queue.sqlite3
    queue_name: str = "studio"

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None, redis_url: str | None = None) -> Settings:
        """Settings from ``studio.config`` (environment), or rooted at ``data_dir`` when given.

        ``redis_url=None`` reads ``STUDIO_REDIS_URL``; ``""`` forces the SQLite queue.
        """
        if data_dir is not None:
            data = Path(data_dir).expanduser().resolve()
            runs, store = data / "runs", data / "templates_store"
            queue = runs / ".queue.sqlite3"
        else:
            runs, store, queue = config.runs_dir(), config.store_dir(), config.queue_file()
        url = config.redis_url() if redis_url is None else (redis_url or None)
        name = os.environ.get("STUDIO_QUEUE_NAME") or "studio"  # several studios can share one Redis
        return cls(runs_dir=runs, store_dir=store, redis_url=url, queue_file=queue, queue_name=name)

    @property
    def backend(self) -> str:
        return "redis" if self.redis_url else "sqlite"

    def env(self) -> dict[str, str]:
        """Environment variables that give a child process (a worker) exactly these settings."""
        return {
            "STUDIO_RUNS": str(self.runs_dir),
            "STUDIO_STORE": str(self.store_dir),
            "STUDIO_QUEUE_FILE": str(self.sqlite_file),
            "STUDIO_REDIS_URL": self.redis_url or "",
            "STUDIO_QUEUE_NAME": self.queue_name,
        }

    @property
    def sqlite_file(self) -> Path:
        return self.queue_file or self.runs_dir / ".queue.sqlite3"


_handler: Callable[[str, str], None] | None = None  # set by the consumer of this process (its GPU worker)


def _run_job_message(job_id: str, token: str) -> None:
    """The one Huey task: hand the message to the handler this process's consumer was given."""
    if _handler is None:
        raise RuntimeError("no job handler in this process; start a worker with `python -m studio.worker`")
    _handler(job_id, token)


# -- a damaged SQLite queue file -----------------------------------------------------------------

_DAMAGE_CODES = (11, 26)  # SQLITE_CORRUPT ("malformed"), SQLITE_NOTADB ("file is not a database")
_SIDE_FILES = ("-wal", "-shm", "-journal")


def is_damage(exc: BaseException) -> bool:
    """Whether a sqlite3 error says the file itself is broken (not busy, locked or a constraint)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _DAMAGE_CODES
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def damage_of(path: Path) -> str | None:
    """What is wrong with a SQLite queue file: None when it is healthy, missing, empty or only busy."""
    try:
        if path.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    try:
        conn = sqlite3.connect(str(path), timeout=10)
        try:
            rows = conn.execute("pragma quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc) if is_damage(exc) else None  # "database is locked" says nothing about the file
    problems = [str(row[0]) for row in rows if row and row[0] != "ok"]
    return "; ".join(problems)[:300] or None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold ``<queue file>.lock`` exclusively: one process at a time checks, moves and remakes the file."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the check still runs, without the cross-process lock
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_schema(path: Path) -> None:
    """Create Huey's tables (idempotent), so no process ever opens a queue file without them."""
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        conn.isolation_level = None
        conn.execute('pragma journal_mode="wal"')
        for sql in SqliteStorage.ddl:
            conn.execute(sql)
    finally:
        conn.close()


def _move_aside(path: Path) -> Path:
    """Rename a damaged queue file (and its WAL / shared-memory files) to ``<name>.corrupt-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, aside)
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():  # a WAL of the broken file must never be replayed into the new one
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside


def recover_sqlite(path: Path) -> Path | None:
    """Check the queue file; if it is damaged, move it aside and put an empty queue in its place.

    Runs under a lock file, so of several processes that notice the damage only the first moves
    the file. Returns where the damaged file went, or None when it was fine. Nothing of it is
    lost that matters: the job folders are the truth and :meth:`studio.jobs.jobs.Jobs.reconcile`
    sends their messages again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        problem = damage_of(path)
        if problem is None:
            return None
        aside = _move_aside(path)
        _make_schema(path)
    log.warning("the job queue file %s was damaged (%s): moved it to %s and started an empty queue; "
                "queued and interrupted jobs are sent again from their job records", path, problem, aside.name)
    return aside


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class RecoveringSqliteStorage(SqliteStorage):
    """Huey's SQLite storage that survives its file being damaged or replaced while it is open.

    - before each operation: if the file at the path is no longer the one this connection opened
      (another process moved a damaged file aside, or someone deleted it), reconnect to the new one;
    - an operation that fails because the file is damaged moves it aside (:func:`recover_sqlite`)
      and reconnects, so the next operation works; the failing one still raises.
    """

    def __init__(self, *args, **kwargs):
        self._opened: tuple[int, int] | None = None
        self.recovered: list[Path] = []  # damaged files this storage moved aside while open
        super().__init__(*args, **kwargs)

    def _create_connection(self) -> sqlite3.Connection:
        conn = super()._create_connection()
        self._opened = _inode(self.filename)
        return conn

    @contextlib.contextmanager
    def db(self, commit: bool = False, close: bool = False) -> Iterator[sqlite3.Cursor]:
        self._follow_file()
        try:
            with super().db(commit=commit, close=close) as cursor:
                yield cursor
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                self._recover()
            raise

    def _follow_file(self) -> None:
        if self._conn is None or _inode(self.filename) == self._opened:
            return
        log.info("the queue file %s was replaced; reconnecting", self.filename)
        self.close()
        with _file_lock(Path(self.filename)):
            _make_schema(Path(self.filename))

    def _recover(self) -> None:
        aside = recover_sqlite(Path(self.filename))
        self.close()  # the next operation opens whatever file is at the path now
        if aside is not None:
            self.recovered.append(aside)


class _StudioSqliteHuey(SqliteHuey):
    storage_class = RecoveringSqliteStorage


# -- logging a repeating error once ---------------------------------------------------------------


class RepeatFilter(logging.Filter):
    """Let the first of a run of identical warnings / errors through (with its traceback), then one
    short line when the gap since the last report has doubled (``first_gap`` s, up to ``max_gap``).

    A consumer that cannot read its queue retries every second; without this its log grew by
    hundreds of lines a minute for as long as the fault lasted. A run ends after ``quiet_s``
    without the error; the next one is logged in full again.
    """

    def __init__(self, first_gap: float = 30.0, max_gap: float = 3600.0, quiet_s: float = 300.0,
                 max_keys: int = 64):
        super().__init__()
        self.first_gap, self.max_gap, self.quiet_s, self.max_keys = first_gap, max_gap, quiet_s, max_keys
        self._runs: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.name, str(record.msg), type(exc).__name__ if exc else "", str(exc)[:200] if exc else "")
        now = time.monotonic()
        with self._lock:
            run = self._runs.get(key)
            if run is None or now - run["last"] > self.quiet_s:
                self._runs[key] = {"first": now, "last": now, "count": 1, "gap": self.first_gap,
                                   "next": now + self.first_gap}
                self._runs.move_to_end(key)
                while len(self._runs) > self.max_keys:
                    self._runs.popitem(last=False)
                return True
            run["count"] += 1
            run["last"] = now
            if now < run["next"]:
                return False
            run["gap"] = min(run["gap"] * 2, self.max_gap)
            run["next"] = now + run["gap"]
            count, since, gap = run["count"], now - run["first"], run["gap"]
        what = f"{record.getMessage()}: {type(exc).__name__}: {exc}" if exc else record.getMessage()
        record.msg = f"{what} (still failing: {count} times in {since:.0f} s; next report in {gap:.0f} s at most)"
        record.args, record.exc_info, record.exc_text = None, None, None
        return True


_CONSUMER_LOGGERS = ("huey", "huey.consumer", "huey.consumer.Worker", "huey.consumer.Scheduler")


def quiet_repeats(names: tuple[str, ...] = _CONSUMER_LOGGERS) -> None:
    """Put a :class:`RepeatFilter` on these loggers (once): filters do not apply to child loggers."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())


class Queue:
    """The Huey instance of one studio plus the few operations jobs need on it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.redis_url:
            # PriorityRedisHuey is RedisHuey with a sorted-set queue (Redis >= 5), for PRIORITY.
            self.huey: Huey = PriorityRedisHuey(settings.queue_name, url=settings.redis_url, results=False,
                                                blocking=True, read_timeout=1)
        else:
            # A queue file damaged before this start (a crash, a full disk, a bad copy): set aside, start empty.
            moved = recover_sqlite(settings.sqlite_file)
            self.huey = self._sqlite_huey()
            if moved is not None:
                self.huey.storage.recovered.insert(0, moved)
        self._task = self.huey.task(name=TASK_NAME)(_run_job_message)

    def _sqlite_huey(self) -> Huey:
        return _StudioSqliteHuey(self.settings.queue_name, filename=str(self.settings.sqlite_file), results=False,
                                 timeout=30)

    @property
    def rebuilt(self) -> list[Path]:
        """Damaged queue files this queue moved aside (the queue restarted empty; records refill it)."""
        return list(getattr(self.huey.storage, "recovered", []))

    def describe(self) -> str:
        return f"Redis queue at {self.settings.redis_url}" if self.settings.redis_url else \
            f"SQLite queue {self.settings.sqlite_file}"

    def enqueue(self, job_id: str, token: str, kind: str) -> None:
        """Send "run this job" to whichever worker is free; StudioError if the queue is unreachable.

        A damaged SQLite file is replaced during the failing attempt (see :class:`RecoveringSqliteStorage`);
        the message then goes into the new queue.
        """
        for attempt in (1, 2):
            rebuilt = len(self.rebuilt)
            try:
                self.huey.enqueue(self._task.s(job_id, token, priority=PRIORITY.get(kind, 0)))
                return
            except Exception as exc:  # redis.ConnectionError, sqlite3.OperationalError...
                if attempt == 1 and len(self.rebuilt) > rebuilt:
                    continue
                raise StudioError(f"the job queue is not reachable ({self.describe()}): {exc}") from exc

    def pending(self) -> list[tuple[str, str]]:
        """(job_id, token) of every message waiting in the queue, in the order workers take them."""
        out = []
        for task in self.huey.pending():
            if len(task.args) == 2:
                out.append((str(task.args[0]), str(task.args[1])))
        return out

    def claim(self, job_id: str, token: str, owner: str) -> bool:
        """Atomically take the right to run (or cancel) this enqueueing of a job; True for exactly one caller."""
        value = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.time()}).encode()
        return bool(self.huey.storage.put_if_empty(_claim_key(job_id, token), value))

    def claim_info(self, job_id: str, token: str) -> dict | None:
        """Who claimed this enqueueing and when, or None if nobody did."""
        from huey.constants import EmptyData

        raw = self.huey.storage.peek_data(_claim_key(job_id, token))
        if raw is EmptyData or raw is None:
            return None
        try:
            return json.loads(bytes(raw))
        except ValueError:
            return {"owner": "?", "time": 0.0}

    def release(self, job_id: str, token: str) -> None:
        """Forget a claim once its job reached a final state (the record then says so)."""
        self.huey.storage.delete_data(_claim_key(job_id, token))

    def consumer(self, handler: Callable[[str, str], None], poll_max_s: float = 1.0) -> Consumer:
        """A Huey consumer with ONE worker thread: one GPU runs one job at a time.

        ``handler(job_id, token)`` runs each message (the queue knows nothing of workers).

        SIGTERM stops it gracefully (the running job stops at the next step and is re-queued);
        SIGINT stops it at once (the job resumes from its checkpoint when a worker comes back).
        """
        global _handler
        _handler = handler
        quiet_repeats()  # a queue that cannot be read is retried every second: log that once, not each time
        return self.huey.create_consumer(workers=1, worker_type="thread", periodic=False,
                                         initial_delay=0.05, backoff=1.3, max_delay=poll_max_s,
                                         graceful_signal="TERM")

    def close(self) -> None:
        self.huey.storage.close()


def _claim_key(job_id: str, token: str) -> str:
    return f"studio.claim.{job_id}.{token}"
