"""Job records and the queue, without a worker: validation, positions, cancel, claims, recovery.

Every test runs against both queue backends (SQLite file, real redis-server).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from queue_helpers import BACKENDS, make_settings, redis_url, write_image  # noqa: F401 (redis_url: a fixture)

from studio import config
from studio.engine.backbones import default_backbone, resolve
from studio.errors import InputError, NotFoundError
from studio.jobs.jobs import Jobs
from studio.jobs.records import CANCELLED, FAILED, QUEUED, RUNNING

STATUS_KEYS = {
    "id", "kind", "state", "name", "style_prompt", "backbone", "template_id", "created", "started", "finished",
    "step", "total_steps", "losses", "t", "previews", "queue_position", "eta_s", "sec_per_step", "peak_mem",
    "outputs", "error", "message", "attempts", "cancel_requested", "worker", "timing", "request",
    "checkpoint_step", "duration_s",
}
QUICK = {"steps": 2, "preview_every": 0, "checkpoint_every": 0}


@pytest.fixture(params=BACKENDS)
def settings(request, tmp_path):
    return make_settings(request, request.param, tmp_path / "data")


@pytest.fixture
def jobs(settings):
    j = Jobs(settings=settings)
    yield j
    j.queue.close()


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "upload" / "ref.png")


def job_folders(jobs):
    return [p for p in jobs.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def pretend_running(jobs, job_id, **worker):
    """What a worker writes when it takes a job (claim + record), with a chosen worker identity."""
    record = jobs.read(job_id)
    assert jobs.queue.claim(job_id, record["token"], "test-worker")
    info = {"id": "test-worker", "host": socket.gethostname(), "pid": os.getpid(), "pid_started": None,
            "heartbeat": time.time(), **worker}
    jobs.update(job_id, {"state": RUNNING, "worker": info, "attempts": record["attempts"] + 1,
                         "history": record["history"] + [{"attempt": 1, "ended": None}]})


def test_submit_validates_everything_before_writing(jobs, image, tmp_path):
    bad_file = tmp_path / "notes.png"
    bad_file.write_text("not an image")
    cases = [
        dict(images=[], style_prompt="watercolor", name="x"),
        dict(images=[bad_file], style_prompt="watercolor", name="x"),
        dict(images=[image], style_prompt="   ", name="x"),
        dict(images=[image], style_prompt="watercolor", name="a/b"),
        dict(images=[image], style_prompt="watercolor", name="x", recipe={"steps": 0}),
        dict(images=[image], style_prompt="watercolor", name="x", recipe={"stepz": 3}),
        dict(images=[image], style_prompt="watercolor", name="x", recipe={"steps": "many"}),
        dict(images=[image], style_prompt="watercolor", name="x", recipe={"preset": "nope"}),
        dict(images=[image], style_prompt="watercolor", name="x", backbone="no-such-model"),
        dict(images=[image], style_prompt="watercolor", name="x", captions=["a", "b"]),
    ]
    for kwargs in cases:
        with pytest.raises(InputError) as info:
            jobs.submit_train(**kwargs)
        assert str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError):
        jobs.submit_generate(None, {"prompt": ""})
    with pytest.raises(InputError):
        jobs.submit_generate(None, {"prompt": "a cat", "colour": "red"})
    with pytest.raises(InputError):
        jobs.submit_generate(None, {"prompt": "a cat", "num_images": "lots"})
    with pytest.raises(NotFoundError):
        jobs.submit_generate("no-such-template", {"prompt": "a cat"})
    assert job_folders(jobs) == []
    assert jobs.queue.pending() == []


def test_submit_copies_references_so_uploads_may_vanish(jobs, image):
    job_id = jobs.submit_train([image], "red poster", "Poster", recipe={"preset": "quick", **QUICK},
                               backbone="tiny", captions=["a lighthouse"])
    image.unlink()  # Gradio's upload temp file goes away
    folder = jobs.runs_dir / job_id
    assert (folder / "references" / "ref_00.png").is_file()
    request = json.loads((folder / "request.json").read_text())
    assert request["recipe"]["resolution"] == resolve("tiny").default_resolution == 64
    assert request["recipe"]["steps"] == 2 and request["captions"] == ["a lighthouse"]
    status = jobs.status(job_id)
    assert status["state"] == QUEUED and status["queue_position"] == 1
    assert status["total_steps"] == 2 and status["name"] == "Poster" and status["style_prompt"] == "red poster"
    assert "no worker is running" in status["message"]
    assert jobs.queue.pending() == [(job_id, jobs.read(job_id)["token"])]


def test_status_has_the_documented_json_keys(jobs, image):
    train = jobs.submit_train([image], "red poster", "P", recipe=QUICK)
    gen = jobs.submit_generate(None, {"prompt": "a cat", "steps": 2, "num_images": 3})
    for job_id in (train, gen):
        status = jobs.status(job_id)
        assert set(status) == STATUS_KEYS
        json.dumps(status)  # JSON-friendly all the way down
    assert jobs.status(gen)["total_steps"] == 3
    with pytest.raises(NotFoundError):
        jobs.status("../../etc")
    with pytest.raises(NotFoundError):
        jobs.status("20990101-000000-train-00000000")


def test_queue_positions_and_listing_survive_a_new_jobs_object(settings, jobs, image):
    first = jobs.submit_train([image], "red poster", "First", recipe=QUICK)
    second = jobs.submit_train([image], "red poster", "Second", recipe=QUICK)
    gen = jobs.submit_generate(None, {"prompt": "a cat", "steps": 2})
    jobs.queue.close()

    again = Jobs(settings=settings)  # e.g. the web app restarted
    assert [again.status(j)["queue_position"] for j in (gen, first, second)] == [1, 2, 3]  # generation first
    assert [s["id"] for s in again.list_jobs()] == [gen, second, first]  # newest first
    assert [s["id"] for s in again.list_jobs(kind="train", limit=1)] == [second]
    assert again.list_jobs(states=["done"]) == []
    assert again.active_job("train")["id"] == second
    assert again.active_job("generate")["id"] == gen
    assert {j for j, _ in again.queue.pending()} == {first, second, gen}
    again.queue.close()


def test_cancel_a_queued_job_at_once(jobs, image, settings):
    job_id = jobs.submit_train([image], "red poster", "P", recipe=QUICK)
    token = jobs.read(job_id)["token"]
    status = jobs.cancel(job_id)
    assert status["state"] == CANCELLED and status["queue_position"] is None and status["finished"]
    assert jobs.cancel(job_id)["state"] == CANCELLED  # idempotent
    assert jobs.active_job("train") is None
    # The message is still in the queue; a worker that gets it skips it without loading anything.
    from studio.jobs.worker import Worker

    worker = Worker(settings)
    worker.handle(job_id, token)
    assert jobs.read(job_id)["state"] == CANCELLED and jobs.read(job_id)["attempts"] == 0
    assert worker.backbones.loads == 0
    with pytest.raises(NotFoundError):
        jobs.cancel("nope")


def test_claims_are_exclusive_across_threads(jobs, image):
    job_id = jobs.submit_train([image], "red poster", "P", recipe=QUICK)
    token = jobs.read(job_id)["token"]
    other = Jobs(settings=jobs.settings)  # a second connection, as another process would have
    wins = []
    barrier = threading.Barrier(10)

    def claim(i):
        barrier.wait()
        if (jobs if i % 2 else other).queue.claim(job_id, token, f"w{i}"):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert jobs.queue.claim_info(job_id, token)["owner"] == f"w{wins[0]}"
    other.queue.close()


def test_reconcile_requeues_a_dead_workers_job_then_gives_up(jobs, image):
    job_id = jobs.submit_train([image], "red poster", "P", recipe=QUICK)
    old_token = jobs.read(job_id)["token"]
    jobs.queue.huey.storage.flush_queue()  # the dead worker had taken the message
    pretend_running(jobs, job_id, pid=dead_pid())

    assert jobs.reconcile(max_attempts=2)["requeued"] == [job_id]
    record = jobs.read(job_id)
    assert record["state"] == QUEUED and record["crashes"] == 1 and record["token"] != old_token
    assert record["history"][-1]["outcome"].startswith("the worker")
    assert jobs.queue.pending() == [(job_id, record["token"])]
    assert "resuming" in jobs.status(job_id)["message"]

    jobs.queue.huey.storage.flush_queue()
    pretend_running(jobs, job_id, pid=dead_pid())
    assert jobs.reconcile(max_attempts=2)["failed"] == [job_id]
    status = jobs.status(job_id)
    assert status["state"] == FAILED and "stopped 2 times" in status["error"]
    assert jobs.reconcile(max_attempts=2) == {"requeued": [], "failed": [], "resent": []}


def test_reconcile_uses_heartbeats_for_workers_on_other_hosts(jobs, image):
    alive = jobs.submit_train([image], "red poster", "Alive", recipe=QUICK)
    silent = jobs.submit_train([image], "red poster", "Silent", recipe=QUICK)
    pretend_running(jobs, alive, host="gpu-host-2", pid=1)
    pretend_running(jobs, silent, host="gpu-host-3", pid=1, heartbeat=time.time() - 3600)
    result = jobs.reconcile()
    assert result["requeued"] == [silent]
    assert jobs.read(alive)["state"] == RUNNING and jobs.read(silent)["state"] == QUEUED


def test_reconcile_resends_lost_messages_once(jobs, image):
    job_id = jobs.submit_train([image], "red poster", "P", recipe=QUICK)
    jobs.queue.huey.storage.flush_queue()  # e.g. Redis restarted without persistence
    assert jobs.reconcile()["resent"] == [job_id]
    assert jobs.reconcile()["resent"] == []
    assert jobs.queue.pending() == [(job_id, jobs.read(job_id)["token"])]


def test_config_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_BACKBONE", "sd3.5-medium")
    assert default_backbone() == "sd3.5-medium"
    monkeypatch.delenv("STUDIO_BACKBONE")
    import torch

    if not torch.cuda.is_available():
        assert default_backbone() == "tiny"
    for var in ("STUDIO_RUNS", "STUDIO_STORE", "STUDIO_QUEUE_FILE", "STUDIO_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STUDIO_DATA", str(tmp_path))
    assert config.runs_dir() == tmp_path / "runs" and config.store_dir() == tmp_path / "templates_store"
    assert config.queue_file() == tmp_path / "runs" / ".queue.sqlite3" and config.redis_url() is None
    monkeypatch.setenv("STUDIO_REDIS_URL", "redis://example:6379/1")
    assert config.redis_url() == "redis://example:6379/1"


def test_the_jobs_view_refuses_bad_values_and_unfinished_jobs(jobs, image):
    """The Jobs view's actions check their input: no bool for a number, no unknown kind, nothing done to a
    job that is still queued (it has no worker here, so it stays queued)."""
    from studio.api import StudioAPI
    from studio.jobs import run_actions

    api = StudioAPI(jobs)
    job_id = jobs.submit_train([image], "red poster", "Waiting", recipe=QUICK)
    with pytest.raises(InputError, match="limit must be a whole number"):
        api.jobs_list(None, True)
    with pytest.raises(InputError, match="kind must be train or generate"):
        api.jobs_list("painting")
    assert [r["id"] for r in api.jobs_list("train", 500)][0] == job_id
    for action in (run_actions.resume, run_actions.save_checkpoint):
        with pytest.raises(InputError, match="only a cancelled or failed training"):
            action(jobs, job_id)
    for action in (run_actions.retry, run_actions.delete):
        with pytest.raises(InputError, match="cancel it first|still queued"):
            action(jobs, job_id)
    with pytest.raises(NotFoundError):
        api.resume_job("../../etc")
    jobs.cancel(job_id)
    assert jobs.status(job_id)["state"] == "cancelled"
    with pytest.raises(InputError, match="no checkpoint yet"):
        run_actions.save_checkpoint(jobs, job_id)
    queued = run_actions.resume(jobs, job_id)  # no checkpoint: it starts again from step 0
    assert queued["state"] == "queued" and "from the start" in queued["message"]
    assert not queued["cancel_requested"]
    with pytest.raises(InputError, match="limit must be a whole number from 1"):
        api.generation_history("", 0)
    assert api.generation_history(None) == []  # no pictures made yet


def test_job_settings_carry_the_references_and_their_captions_back_to_the_form(jobs, image, tmp_path):
    """"Copy its settings to the Train form": the references come back as a dataset zip whose .txt files
    hold the captions, the same zip the drop zone reads."""
    from studio.api import StudioAPI
    from studio.media.datasets import open_dataset_zip

    api = StudioAPI(jobs)
    job_id = jobs.submit_train([image, image], "red poster", "Captioned", recipe=QUICK,
                               captions=["a red square", None])
    jobs.cancel(job_id)
    form = api.job_settings(job_id)
    assert form["style_prompt"] == "red poster" and form["recipe"]["steps"] == 2 and len(form["references"]) == 2
    unpacked = open_dataset_zip(form["dataset"], tmp_path / "back")
    assert [caption for _, caption in unpacked] == ["a red square", None]
    plain = api.job_settings(jobs.submit_train([image], "red poster", "Plain", recipe=QUICK))
    assert plain["dataset"] is None and len(plain["references"]) == 1  # no captions: the files themselves


def test_brief_listings_have_the_same_keys_without_the_curves(jobs, image):
    """Lists that are polled (the Jobs tab, the history) skip reading loss curves and previews."""
    job_id = jobs.submit_train([image], "red poster", "Brief", recipe=QUICK)
    run = jobs.job_dir(job_id)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "t": [0.9]}\n')
    (run / "previews").mkdir(exist_ok=True)
    (run / "previews" / "step_0000_p0.png").write_bytes(b"")
    full = next(s for s in jobs.list_jobs("train") if s["id"] == job_id)
    brief = next(s for s in jobs.list_jobs("train", brief=True) if s["id"] == job_id)
    assert set(brief) == set(full) == STATUS_KEYS
    assert full["losses"] == [0.5] and full["previews"] and brief["losses"] == [] and brief["previews"] == []
