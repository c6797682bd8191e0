"""The Supervisor app.py runs: it starts the GPU worker (``python -m studio.jobs.worker``) as a child
process, restarts it when it dies and reconciles the job records.

It needs only the job records (:mod:`studio.jobs.jobs`, :mod:`studio.jobs.records`): the worker runs as a
subprocess, so this module never imports :mod:`studio.jobs.worker` (its runners, warm-model cache and GPU lock).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from studio.jobs import records as J
from studio.jobs.jobs import Jobs

log = logging.getLogger("studio.jobs.supervisor")


class Supervisor:
    """Runs ``python -m studio.jobs.worker`` as a child process and keeps it running.

    ``start()`` first reconciles the job records (a job left running by a dead worker is
    re-queued and resumes from its checkpoint, or fails after ``max_attempts`` crashes), then
    spawns the worker; a monitor thread restarts it when it dies and reconciles again.
    ``stop()`` stops it gracefully (SIGTERM: the running job is re-queued), SIGKILL after
    ``stop_timeout`` seconds.
    """

    def __init__(self, jobs: Jobs | None = None, backbone: str | None = None, *,
                 max_attempts: int = J.MAX_ATTEMPTS, env: dict[str, str] | None = None,
                 stop_timeout: float = 30.0, reconcile_every: float = 15.0, log_path: Path | None = None):
        self.jobs = jobs or Jobs()
        self.backbone = backbone
        self.max_attempts = max_attempts
        self.env = dict(env or {})
        self.stop_timeout = stop_timeout
        self.reconcile_every = reconcile_every
        self.log_path = log_path or self.jobs.runs_dir / J.WORKERS_DIR / f"worker-{socket.gethostname()}.log"
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._spawned_at = 0.0
        self._stopping = threading.Event()
        self._monitor_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The worker process's pid (None when not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Reconcile the records, start the worker and the monitor thread (returns at once)."""
        if self._monitor_thread is not None:
            return
        self._stopping.clear()
        try:
            self.jobs.reconcile(self.max_attempts)
        except Exception:  # e.g. Redis not up yet: the monitor thread retries every reconcile_every seconds
            log.exception("could not reconcile the job records")
        self._spawn()
        self._monitor_thread = threading.Thread(target=self._monitor, name="worker-supervisor", daemon=True)
        self._monitor_thread.start()
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 300.0) -> bool:
        """Block until the worker reports it is serving the queue (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid
            if pid and any(w.get("pid") == pid and w.get("host") == socket.gethostname()
                           and w.get("state") in ("ready", "busy") for w in self.jobs.workers()):
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker (gracefully, then by force) and re-queue whatever it left running."""
        self._stopping.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join()
            self._monitor_thread = None
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if proc is not None:
            self.jobs.reconcile(self.max_attempts)

    def _spawn(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, **self.jobs.settings.env(), "PYTHONUNBUFFERED": "1",
               "STUDIO_MAX_ATTEMPTS": str(self.max_attempts), **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "studio.jobs.worker", "--parent-pid", str(os.getpid())]
        if self.backbone:
            cmd += ["--backbone", self.backbone]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            # Its own session: Ctrl-C in the app's terminal reaches the app, which stops the worker gracefully.
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        with self._lock:
            self._proc, self._spawned_at = proc, time.monotonic()
        log.info("started worker pid %s (log: %s)", proc.pid, self.log_path)

    def _monitor(self) -> None:
        last_reconcile, quick_deaths = time.monotonic(), 0
        while not self._stopping.wait(0.5):
            with self._lock:
                proc = self._proc
            code = proc.poll() if proc is not None else None
            try:
                if proc is not None and code is not None:
                    lived = time.monotonic() - self._spawned_at
                    log.warning("worker pid %s exited with code %s; restarting it", proc.pid, code)
                    self.jobs.reconcile(self.max_attempts)  # its job is re-queued now: its pid is gone
                    quick_deaths = quick_deaths + 1 if lived < 30 else 0
                    if self._stopping.wait(min(30.0, 0.5 * 2 ** min(quick_deaths, 6))):
                        break
                    self.restarts += 1
                    self._spawn()
                elif time.monotonic() - last_reconcile > self.reconcile_every:
                    last_reconcile = time.monotonic()
                    self.jobs.reconcile(self.max_attempts)
            except Exception:  # the supervisor must survive a hiccup of the data folder or Redis
                log.exception("worker supervisor")


__all__ = ["Supervisor"]
