"""Shared by the queue tests: a real redis-server per session, per-test queue settings, waiting.

Test modules import the ``redis_url`` fixture from here (tests/ is on sys.path under pytest).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.jobs.queue import Settings

BACKENDS = ["sqlite", "redis"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A throw-away ``redis-server`` on a free port (no persistence); its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed, and CI must run the Redis-backed queue tests "
                        "(test.sh installs it with apt-get)")
        pytest.skip("redis-server is not installed (`apt-get install redis-server`; test.sh does it)")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def make_settings(request, backend: str, root: Path) -> Settings:
    """Settings for one test: its own data folder and its own queue name (so tests never share a queue)."""
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    return Settings(runs_dir=root / "runs", store_dir=root / "templates_store", redis_url=url,
                    queue_file=root / "runs" / ".queue.sqlite3", queue_name=f"t{uuid.uuid4().hex[:10]}")


def write_image(path: Path, color=(200, 60, 40), size: int = 64) -> Path:
    """A small reference image with a flat colour and a stripe."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = color
    arr[size // 3: size // 2] = (250, 200, 60)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
