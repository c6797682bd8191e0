"""The job queue on Huey: a SQLite file in the data folder by default, Redis when a URL is set.

A queue message only says "run job X, enqueueing T" (``job_id``, ``token``); the job record on
the shared data folder is the source of truth. Whoever wants to run or cancel a queued job first
*claims* its token in the queue's key-value store (``put_if_empty``: one SQL insert or one
``HSETNX``, atomic in both backends and across hosts), so a job runs once even if its message is
delivered twice, or a worker already served it between training steps.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from huey import PriorityRedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer

from . import config
from .errors import StudioError

TASK_NAME = "studio.run_job"
# Higher runs first: a generation (seconds) never waits behind queued trainings (minutes).
PRIORITY = {"generate": 10, "refine": 0, "evaluate": 5, "train": 0}


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


def _run_job_message(job_id: str, token: str) -> None:
    """The one Huey task: hand the message to this process's GPU worker."""
    from . import worker

    worker.handle_message(job_id, token)


class Queue:
    """The Huey instance of one studio plus the few operations jobs need on it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.redis_url:
            # PriorityRedisHuey is RedisHuey with a sorted-set queue (Redis >= 5), for PRIORITY.
            self.huey: Huey = PriorityRedisHuey(settings.queue_name, url=settings.redis_url, results=False,
                                                blocking=True, read_timeout=1)
        else:
            settings.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            self.huey = SqliteHuey(settings.queue_name, filename=str(settings.sqlite_file), results=False,
                                   timeout=30)
        self._task = self.huey.task(name=TASK_NAME)(_run_job_message)

    def describe(self) -> str:
        return f"Redis queue at {self.settings.redis_url}" if self.settings.redis_url else \
            f"SQLite queue {self.settings.sqlite_file}"

    def enqueue(self, job_id: str, token: str, kind: str) -> None:
        """Send "run this job" to whichever worker is free; StudioError if the queue is unreachable."""
        try:
            self.huey.enqueue(self._task.s(job_id, token, priority=PRIORITY.get(kind, 0)))
        except Exception as exc:  # redis.ConnectionError, sqlite3.OperationalError...
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

    def consumer(self, poll_max_s: float = 1.0) -> Consumer:
        """A Huey consumer with ONE worker thread: one GPU runs one job at a time.

        SIGTERM stops it gracefully (the running job stops at the next step and is re-queued);
        SIGINT stops it at once (the job resumes from its checkpoint when a worker comes back).
        """
        return self.huey.create_consumer(workers=1, worker_type="thread", periodic=False,
                                         initial_delay=0.05, backoff=1.3, max_delay=poll_max_s,
                                         graceful_signal="TERM")

    def close(self) -> None:
        self.huey.storage.close()


def _claim_key(job_id: str, token: str) -> str:
    return f"studio.claim.{job_id}.{token}"
