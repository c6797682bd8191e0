"""Benchmark: memory of the web process (``python app.py``) under status polling. Not a test.

Starts the real app on the tiny backbone without a worker, in a throw-away data folder with a few
queued jobs, then polls ``/job_status`` in rounds and prints the app's resident memory (RSS) after
each round, in two ways clients really poll:

* ``rest``: one HTTP call per request (``POST /gradio_api/call/job_status`` + its result stream):
  every call is a new Gradio session; Gradio keeps each session's state (a copy of every component's
  settings, ~0.3 MB in this app), so this grew without bound before ``--sessions`` capped it;
* ``client``: one ``gradio_client.Client`` making all requests of a round (one session).

    python benchmarks/bench_web_memory.py                        # 3 rounds of 400, both ways
    python benchmarks/bench_web_memory.py --sessions 10000       # Gradio's own default: watch it grow
    python benchmarks/bench_web_memory.py --mode rest --rounds 5 --requests 800
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_jobs(data: Path, n: int = 3) -> list[str]:
    from studio.jobs.jobs import Jobs
    from studio.jobs.queue import Settings

    jobs = Jobs(settings=Settings(runs_dir=data / "runs", store_dir=data / "templates_store",
                                  queue_file=data / "runs" / ".queue.sqlite3"))
    image = data / "ref.png"
    Image.new("RGB", (64, 64), (200, 60, 40)).save(image)
    ids = [jobs.submit_train([str(image)], "red poster", f"job {i}", {"steps": 4}, backbone="tiny") for i in range(n)]
    jobs.queue.close()
    return ids


def rest_round(url: str, ids: list[str], n: int) -> None:
    with httpx.Client(timeout=60) as http:
        for i in range(n):
            event = http.post(f"{url}gradio_api/call/job_status", json={"data": [ids[i % len(ids)]]}).json()
            with http.stream("GET", f"{url}gradio_api/call/job_status/{event['event_id']}") as stream:
                for _ in stream.iter_lines():
                    pass


def client_round(url: str, ids: list[str], n: int) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False, analytics_enabled=False)
    for i in range(n):
        client.predict(ids[i % len(ids)], api_name="/job_status")
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["rest", "client", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400, help="requests per round")
    parser.add_argument("--sessions", type=int, default=None, help="the app's --sessions (default: its own)")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="studio-mem-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "STUDIO_BACKBONE": "tiny", "GRADIO_TEMP_DIR": str(data / "gradio"),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "localhost,127.0.0.1"}
    env.pop("STUDIO_RUNS", None), env.pop("STUDIO_STORE", None), env.pop("STUDIO_QUEUE_FILE", None)
    ids = make_jobs(data)
    cmd = [sys.executable, str(ROOT / "app.py"), "--data", str(data), "--port", str(port), "--no-worker"]
    if args.sessions is not None:
        cmd += ["--sessions", str(args.sessions)]
    log = open(data / "app.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "gradio_api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print((data / "app.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        app = psutil.Process(proc.pid)
        modes = ["rest", "client"] if args.mode == "both" else [args.mode]
        rest_round(url, ids, 20)  # warm-up: first-request allocations are not growth
        start = app.memory_info().rss / 2**20
        print(f"app RSS after start and warm-up: {start:.1f} MB (sessions: {args.sessions or 'app default'})")
        for mode in modes:
            for r in range(1, args.rounds + 1):
                t0 = time.monotonic()
                (rest_round if mode == "rest" else client_round)(url, ids, args.requests)
                rss = app.memory_info().rss / 2**20
                print(f"{mode:6s} round {r}: {args.requests} requests in {time.monotonic() - t0:5.1f} s, "
                      f"RSS {rss:7.1f} MB ({rss - start:+.1f} MB since start)", flush=True)
    finally:
        os.killpg(proc.pid, 2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
