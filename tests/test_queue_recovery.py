"""Faults of the SQLite queue file and bounded per-process caches, without a worker or a web app.

A damaged queue file (random bytes, or one broken page of a valid file) is set aside and the
queue is refilled from the job folders; a file damaged while open is replaced on the next use,
and every open queue follows; a repeating consumer error is logged once, then rarely; the job
record cache stays bounded. The end-to-end runs (the app and its worker finish the jobs) are in
tests/test_app_faults.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
from queue_helpers import write_image

from studio.jobs.jobs import Jobs
from studio.jobs.queue import Queue, RepeatFilter, Settings, damage_of
from studio.jobs.records import DONE, QUEUED, RUNNING, RecordCache, write_record

QUICK = {"steps": 2, "preview_every": 0, "checkpoint_every": 0}


@pytest.fixture
def settings(tmp_path) -> Settings:
    root = tmp_path / "data"
    return Settings(runs_dir=root / "runs", store_dir=root / "templates_store", redis_url=None,
                    queue_file=root / "runs" / ".queue.sqlite3", queue_name=f"t{uuid.uuid4().hex[:10]}")


def dead_worker() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {"id": "gone", "host": socket.gethostname(), "pid": proc.pid, "pid_started": 1.0, "heartbeat": time.time()}


def make_jobs(settings: Settings, image, recipe: dict | None = None) -> tuple[str, str, str]:
    """A queued training, a queued generation and a training left running by a worker that died."""
    jobs = Jobs(settings=settings)
    recipe = recipe or QUICK
    queued = jobs.submit_train([image], "red poster", "Queued", recipe=recipe, backbone="tiny")
    gen = jobs.submit_generate(None, {"prompt": "a red barn", "steps": 1}, backbone="tiny")
    running = jobs.submit_train([image], "red poster", "Interrupted", recipe=recipe, backbone="tiny")
    record = jobs.read(running)
    assert jobs.queue.claim(running, record["token"], "gone")
    jobs.queue.huey.storage.flush_queue()  # the dead worker took its message off the queue
    for job_id in (queued, gen):  # the other two are still waiting
        r = jobs.read(job_id)
        jobs.queue.enqueue(job_id, r["token"], r["kind"])
    jobs.update(running, {"state": RUNNING, "worker": dead_worker(), "attempts": 1,
                          "history": [{"attempt": 1, "worker": "gone", "ended": None}]})
    jobs.queue.close()
    return queued, gen, running


def checkpoint(path) -> None:
    """Fold the WAL into the file, so damage written to the file is what SQLite reads."""
    conn = sqlite3.connect(str(path))
    conn.execute("pragma wal_checkpoint(TRUNCATE)")
    conn.close()


def damage_page(path, table: str = "task") -> None:
    """Overwrite one page in the middle of a valid queue file (the root page of a Huey table) with noise."""
    checkpoint(path)
    conn = sqlite3.connect(str(path))
    root = conn.execute("select rootpage from sqlite_master where name = ?", (table,)).fetchone()[0]
    size = conn.execute("pragma page_size").fetchone()[0]
    pages = conn.execute("pragma page_count").fetchone()[0]
    conn.close()
    assert 1 < root < pages, "the page must lie inside the file, after the header page"
    with open(path, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(os.urandom(size))


@pytest.mark.parametrize("damage", ["random bytes", "one page"])
def test_a_damaged_queue_file_is_set_aside_and_refilled_from_the_job_records(settings, tmp_path, damage, caplog):
    image = write_image(tmp_path / "ref.png")
    queued, gen, running = make_jobs(settings, image)
    path = settings.sqlite_file
    if damage == "random bytes":
        checkpoint(path)
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        damage_page(path)
    assert damage_of(path)  # the old code failed here: a raw DatabaseError at start, or every submit failing

    with caplog.at_level(logging.WARNING):
        jobs = Jobs(settings=settings)  # what app.py and the worker do at start
    try:
        aside = jobs.queue.rebuilt
        assert len(aside) == 1 and aside[0].name.startswith(".queue.sqlite3.corrupt-") and aside[0].exists()
        assert "damaged" in caplog.text and "refilled the job queue" in caplog.text
        assert damage_of(path) is None
        # Queued jobs are sent again with their own token; the interrupted one is re-queued with a new token.
        records = {j: jobs.read(j) for j in (queued, gen, running)}
        assert all(r["state"] == QUEUED for r in records.values())
        assert records[running]["crashes"] == 1 and "resuming" in records[running]["message"]
        assert sorted(jobs.queue.pending()) == sorted((j, r["token"]) for j, r in records.items())
        # ...and the queue works: submits, claims.
        more = jobs.submit_generate(None, {"prompt": "a blue barn", "steps": 1}, backbone="tiny")
        assert jobs.queue.claim(more, jobs.read(more)["token"], "w")
        # A second start finds a healthy file and leaves it alone.
        again = Jobs(settings=settings)
        assert again.queue.rebuilt == [] and len(again.queue.pending()) == 4
        again.queue.close()
    finally:
        jobs.queue.close()


def test_a_queue_damaged_while_open_is_replaced_on_the_next_use(settings, caplog):
    web, worker = Queue(settings), Queue(settings)  # two processes with the file open
    for i in range(30):
        web.enqueue(f"job{i}", "tok", "train")
    damage_page(settings.sqlite_file)
    for q in (web, worker):
        q.huey.storage.close()  # nothing cached in memory: the next read sees the broken page
    web.enqueue("new", "tok", "generate")  # the failing attempt moves the file aside; the retry succeeds
    assert len(web.rebuilt) == 1 and damage_of(settings.sqlite_file) is None
    # The other queue follows the replacement at its next operation, instead of reading the old file forever.
    assert worker.pending() == [("new", "tok")] and worker.claim("new", "tok", "w")
    assert not web.claim("new", "tok", "w2")
    web.close()
    worker.close()


def test_a_repeating_consumer_error_is_logged_once_then_rarely():
    logger = logging.getLogger(f"test.repeat.{uuid.uuid4().hex}")
    logger.propagate = False
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    logger.addFilter(RepeatFilter(first_gap=0.2, max_gap=10, quiet_s=60))
    error = sqlite3.DatabaseError("database disk image is malformed")
    for _ in range(200):  # a consumer retrying every second for three minutes
        try:
            raise error
        except sqlite3.DatabaseError:
            logger.exception("Error reading from queue")
    assert len(seen) == 1 and seen[0].exc_info  # the first one, with its traceback
    time.sleep(0.25)
    try:
        raise error
    except sqlite3.DatabaseError:
        logger.exception("Error reading from queue")
    assert len(seen) == 2 and not seen[1].exc_info
    assert "still failing: 201 times" in seen[1].getMessage() and "malformed" in seen[1].getMessage()
    logger.warning("something else")  # another message is not held back
    assert len(seen) == 3


def test_the_job_record_cache_stays_bounded(settings):
    jobs = Jobs(settings=settings)
    jobs._cache = RecordCache(max_entries=50)
    ids = []
    for i in range(300):  # many finished jobs, as a long-running studio collects them
        job_id = f"20260101-000000-train-{i:08x}"
        (jobs.runs_dir / job_id).mkdir()
        write_record(jobs.runs_dir / job_id / "job.json",
                     {"id": job_id, "kind": "train", "state": DONE, "name": f"n{i}", "created_ts": i,
                      "request": {"recipe": {"steps": 2}}, "history": []})
        ids.append(job_id)
    for job_id in ids:
        jobs.status(job_id)
    assert len(jobs.list_jobs(limit=1000)) == 300
    assert len(jobs._cache) <= 50
    for job_id in ids[:280]:  # deleted job folders leave the cache at the next listing
        shutil.rmtree(jobs.runs_dir / job_id)
    jobs.list_jobs()
    assert len(jobs._cache) <= 20
    jobs.queue.close()
