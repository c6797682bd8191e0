"""Faults at the app's edges, through HTTP against the real app (``python app.py``) and its worker:

- a queue file of random bytes at start: the app starts, and the queued jobs and the one a dead
  worker left running all finish (the job folders are the truth);
- a queue file with one broken page, through the supervisor / worker entry points app.py uses;
- what the page may fetch: previews and generated pictures it shows, never the queue file, the
  worker log, job records or requests (``/gradio_api/file=<path>`` used to serve all of ``runs/``);
- ``--auth``: failed logins lock the client out for longer and longer, with a clear message.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import uuid
from pathlib import Path

import httpx
import pytest
from app_helpers import RunningApp, start_app, wait_done
from gradio_client import Client
from queue_helpers import wait_for, write_image
from test_queue_recovery import damage_page, make_jobs

from studio.jobs.jobs import Jobs
from studio.jobs.queue import Settings
from studio.jobs.records import DONE, FINAL
from studio.jobs.supervisor import Supervisor

pytestmark = pytest.mark.slow  # starts the app or a worker process

FAST = {"steps": 4, "preview_every": 2, "checkpoint_every": 0, "grad_accum": 1, "rank": 4}
SESSIONS = 20  # browser sessions the app keeps (its default is 200; Gradio's own 10,000)


def app_settings(root) -> Settings:
    """The settings app_helpers.RunningApp gives the app (same folders, the default queue name)."""
    return Settings(runs_dir=root / "runs", store_dir=root / "templates_store", redis_url=None,
                    queue_file=root / "runs" / ".queue.sqlite3")


@pytest.fixture(scope="module")
def recovered(tmp_path_factory, tiny_folder):
    """Jobs made while no app ran, then the queue file overwritten with random bytes, then the app started."""
    root = tmp_path_factory.mktemp("faults")
    settings = app_settings(root)
    job_ids = make_jobs(settings, write_image(root / "ref.png"), FAST)
    path = settings.sqlite_file
    path.write_bytes(os.urandom(64 * 1024))
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    app = start_app(root, extra_args=["--sessions", str(SESSIONS)])  # the old app exited here with a raw DatabaseError
    client = Client(app.url, verbose=False, analytics_enabled=False)
    yield app, client, job_ids
    client.close()
    app.kill()


def test_a_queue_file_of_random_bytes_is_recovered_at_start(recovered):
    app, client, job_ids = recovered
    for job_id in job_ids:  # queued training, queued generation, the training whose worker died
        status = wait_done(client, job_id, timeout=240)
        assert status["state"] == "done", (status["error"], app.tail())
    assert list((app.root / "runs").glob(".queue.sqlite3.corrupt-*"))
    assert "damaged" in app.log.read_text()


def fetch(app: RunningApp, path, **kw) -> httpx.Response:
    return httpx.get(f"{app.url}gradio_api/file={urllib.parse.quote(str(path))}", timeout=30, **kw)


def event_output(app: RunningApp, elem_id: str, trigger: str, data: list):
    """Run the page's own (private) event that fills component ``elem_id`` on ``trigger``, as the browser
    does, and return the value it sends for that component."""
    config = httpx.get(f"{app.url}config", timeout=30).json()
    target = next(c["id"] for c in config["components"] if (c.get("props") or {}).get("elem_id") == elem_id)
    dep = next(d for d in config["dependencies"]
               if target in d["outputs"] and any(t[1] == trigger for t in d["targets"]))
    session = uuid.uuid4().hex
    joined = httpx.post(f"{app.url}gradio_api/queue/join", timeout=30,
                        json={"data": data, "fn_index": dep["id"], "session_hash": session, "event_data": None,
                              "trigger_id": dep["targets"][0][0]})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{app.url}gradio_api/queue/data", params={"session_hash": session},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    assert msg.get("success"), msg
                    return msg["output"]["data"][dep["outputs"].index(target)]
    pytest.fail("the event did not complete")



def test_only_what_the_page_shows_is_served(recovered):
    app, client, job_ids = recovered
    queued, gen, interrupted = job_ids
    for job_id in job_ids:
        wait_done(client, job_id, timeout=240)
    runs, store = app.root / "runs", app.root / "templates_store"
    status = client.predict(queued, api_name="/job_status")
    preview = Path(status["previews"][-1]["files"][0])
    template = store / status["template_id"]
    internals = [runs / ".queue.sqlite3", next(runs.glob(".queue.sqlite3.corrupt-*")),
                 next((runs / ".workers").glob("*.log")), runs / queued / "job.json", runs / queued / "request.json",
                 runs / interrupted / "job.json", template / "template.json", template / "lora.safetensors",
                 preview]  # a preview too: the page gets a copy, never a path into the data folders
    for path in internals:
        assert path.is_file(), path
        response = fetch(app, path)
        assert response.status_code in (403, 404), (path, response.status_code)

    # The Train tab's progress panel (the event its timer runs) shows the previews: those copies are served.
    gallery = event_output(app, "previews", "tick", [queued, {}])
    url = gallery[0]["image"]["url"]
    shown = httpx.get(url if url.startswith("http") else app.url + url.lstrip("/"), timeout=30)
    assert shown.status_code == 200 and shown.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(runs) not in url and str(store) not in url
    assert fetch(app, gallery[0]["image"]["path"]).status_code == 200  # the same request form as the refusals above
    # A generated picture returned by the API is fetched by the client the same way.
    files = client.predict(status["template_id"], "a red barn", "text-to-image", {"steps": 1}, api_name="/generate")
    assert files and os.path.getsize(files[0]) > 0


def test_the_web_process_keeps_a_bounded_number_of_sessions(recovered):
    """Every plain HTTP API call is a new Gradio session, and Gradio kept 10,000 of them, each with a copy of
    every component's settings (~0.3 MB here): 250 calls grew the old app by ~80 MB, without end."""
    import psutil

    app, client, job_ids = recovered
    web = psutil.Process(app.proc.pid)

    def calls(n: int) -> None:
        with httpx.Client(timeout=60) as http:
            for i in range(n):
                event = http.post(f"{app.url}gradio_api/call/job_status", json={"data": [job_ids[i % 3]]}).json()
                with http.stream("GET", f"{app.url}gradio_api/call/job_status/{event['event_id']}") as stream:
                    assert any(line.startswith("event: complete") for line in stream.iter_lines())

    calls(2 * SESSIONS)  # the session table is full from here on
    before = web.memory_info().rss
    calls(250)
    grown = (web.memory_info().rss - before) / 2**20
    assert grown < 25, f"the web process grew by {grown:.0f} MB over 250 status calls"


def test_a_queue_file_with_a_broken_page_is_recovered_by_the_supervisor(tmp_path, tiny_folder):
    """The same recovery through the entry points app.py uses (Jobs(), then Supervisor.start())."""
    settings = app_settings(tmp_path)
    job_ids = make_jobs(settings, write_image(tmp_path / "ref.png"))
    damage_page(settings.sqlite_file)
    jobs = Jobs(settings=settings)
    supervisor = Supervisor(jobs, backbone="tiny", env={"OMP_NUM_THREADS": "1", "STUDIO_HEARTBEAT_S": "0.5"},
                            stop_timeout=20)
    supervisor.start()
    try:
        def finished():
            states = [jobs.read(j, fresh=True)["state"] for j in job_ids]
            return all(s in FINAL for s in states) and states

        log = supervisor.log_path
        states = wait_for(finished, 240, f"the jobs to finish\n{log.read_text()[-3000:] if log.exists() else ''}",
                          interval=0.5)
        assert states == [DONE] * 3
        assert "Error reading from queue" not in log.read_text()
    finally:
        supervisor.stop()
        jobs.queue.close()


# -- logins --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    """The app with a login and a 1 s first lock-out; no worker (logins only)."""
    root = tmp_path_factory.mktemp("auth")
    app = RunningApp(root, extra_args=["--auth", "me:secret", "--no-worker"], env={"STUDIO_LOGIN_LOCK_S": "1"})
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(app.url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if app.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the app did not start:\n{app.tail()}")
        time.sleep(0.3)
    yield app
    app.kill()


def login(app: RunningApp, password: str) -> httpx.Response:
    return httpx.post(f"{app.url}login", data={"username": "me", "password": password}, timeout=30)


def test_failed_logins_lock_the_client_out_for_longer_each_time(locked_app):
    app = locked_app
    assert "wrong passwords" in httpx.get(f"{app.url}config", timeout=30).text  # the login page says so
    for _ in range(5):
        assert login(app, "guess").status_code == 400  # Gradio's "Incorrect credentials"
    refused = login(app, "secret")  # even the right password waits now
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "Too many failed logins" in refused.json()["detail"] and "try again in 1 s" in refused.json()["detail"]
    time.sleep(1.1)
    assert login(app, "guess").status_code == 400  # checked again after the wait...
    assert "in 2 s" in login(app, "secret").json()["detail"]  # ...and the next lock-out is twice as long
    time.sleep(2.1)
    ok = login(app, "secret")
    assert ok.status_code == 200 and ok.json() == {"success": True}
    assert all(login(app, "guess").status_code == 400 for _ in range(5))  # a success clears the count

    # A guessing loop: 200 tries, only a handful of passwords are checked (the old app checked all 200 in 2.75 s).
    time.sleep(1.1)
    start = time.monotonic()
    codes = [login(app, f"guess{i}").status_code for i in range(200)]
    took = time.monotonic() - start
    # 2, 4, 8... s lock-outs: in `took` seconds at most about log2(took) + 1 passwords are checked
    assert codes.count(400) <= 2 + int(took).bit_length(), (codes.count(400), took)
    assert codes.count(429) >= 190
