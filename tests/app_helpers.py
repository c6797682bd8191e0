"""Start the real app (``python app.py``, with its worker) in a subprocess on a free port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    def __init__(self, root: Path, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 worker: bool = True):
        self.root = root
        self.worker = worker  # False: --no-worker (a test that only reads and imports needs no model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / "app.log"
        full_env = {**os.environ, "STUDIO_STORE": str(root / "templates_store"), "STUDIO_RUNS": str(root / "runs"),
                    "STUDIO_QUEUE_FILE": str(root / "runs" / ".queue.sqlite3"), "STUDIO_BACKBONE": "tiny",
                    "GRADIO_TEMP_DIR": str(root / "gradio-tmp"), "GRADIO_ANALYTICS_ENABLED": "False",
                    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
                    "STUDIO_HEARTBEAT_S": "0.5", "NO_PROXY": "localhost,127.0.0.1", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        full_env.pop("STUDIO_DATA", None)
        with open(self.log, "wb") as out:
            args = [str(ROOT / "app.py"), "--port", str(self.port), *(extra_args or []),
                    *([] if worker else ["--no-worker"])]
            # Started with Ctrl-C ignored, as a shell script's background job is: the app must still stop on it.
            self.proc = subprocess.Popen([sys.executable, *args], cwd=root, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "gradio_api/info", timeout=2) as r:
                    if r.status == 200 and (not self.worker or self.worker_ready()):
                        return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"the app did not come up in {timeout:.0f}s:\n{self.tail()}")

    def worker_ready(self) -> bool:
        folder = self.root / "runs" / ".workers"
        return any('"ready"' in p.read_text() or '"busy"' in p.read_text() for p in folder.glob("*.json")) \
            if folder.is_dir() else False

    def tail(self, n: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        worker = self.root / "runs" / ".workers"
        for log in worker.glob("*.log") if worker.is_dir() else []:
            text += f"\n--- {log.name}\n" + log.read_text(errors="replace")[-n:]
        return text[-2 * n:]

    def kill(self) -> None:
        """End of a test module: no graceful shutdown (that path has its own tests), just gone at once.

        The worker lives in its own session; it sees its parent gone at its next heartbeat (0.5 s
        here) and stops itself.
        """
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C: the app stops its worker
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_app(root: Path, **kw) -> RunningApp:
    app = RunningApp(root, **kw)
    app.wait_ready()
    return app


# -- the app shared by the API and browser test modules ------------------------------------------------

SHARED_MAX_UPLOAD_MB = 2  # small, so tests/test_app_api.py can prove an over-size upload is refused
SHARED_OOM = "Doomed Blobs:3"  # test-only hook (studio.jobs.worker): step 3 of "Doomed Blobs" runs out of memory


def start_shared_app(root: Path, metric_env: dict[str, str], captioner: Path) -> RunningApp:
    """The one app (web process and worker) the API and browser modules share: starting one costs ~20 CPU-seconds
    of imports, so the suite starts it once. Its settings are the union of what those modules need: the tiny
    metric models (scores, search, refine), the tiny captioner, the out-of-memory hook, a 2 MB upload limit."""
    return start_app(root, extra_args=["--max-upload-mb", str(SHARED_MAX_UPLOAD_MB)],
                     env={**metric_env, "STUDIO_CAPTION_MODEL": str(captioner), "STUDIO_TEST_OOM": SHARED_OOM})


def empty_studio(app: RunningApp, timeout: float = 180) -> None:
    """Wait until no job is queued or running, then delete every job and template through the public API, so a
    module starts on an empty studio, as with an app of its own."""
    from gradio_client import Client

    client = Client(app.url, verbose=False, analytics_enabled=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = client.predict("", 500, api_name="/jobs")
            if not [r for r in rows if r["state"] in ("queued", "running")]:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"jobs still running after {timeout:.0f}s: {rows}\n{app.tail()}")
            time.sleep(0.3)
        while rows:
            for row in rows:
                client.predict(row["id"], api_name="/delete_job")
            rows = client.predict("", 500, api_name="/jobs")
        while page := client.predict("", 0, 200, api_name="/templates")["templates"]:
            for template in page:
                client.predict(template["id"], api_name="/delete_template")
    finally:
        client.close()


def wait_done(client, job_id: str, timeout: float = 180, ok: bool = False) -> dict:
    """Poll ``/job_status`` until the job ends and return its last status (``ok``: it must have succeeded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name="/job_status")
        if status["state"] in ("done", "failed", "cancelled"):
            assert not ok or status["state"] == "done", status["error"]
            return status
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not finish in {timeout}s")
