"""Style Template Studio: the web app.

    python app.py                         # http://127.0.0.1:7860, worker started here
    python app.py --backbone flux-dev     # on a GPU with FLUX.1-dev downloaded
    python app.py --host 0.0.0.0 --auth me:secret
    python app.py --no-worker             # workers run elsewhere (same data folder + Redis)

With no GPU or no model weights it runs on the tiny offline demo backbone and says so on the
page. The web process only queues jobs and reads their progress; the GPU worker (a child
process, see studio.jobs.worker) trains and generates, so closing or reloading the page never
stops a training.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys

# Before gradio / huggingface_hub are imported: no phoning home from the web process.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Gradio keeps per-event timings for its monitoring page: the last 1,000 events, not 10,000.
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")

log = logging.getLogger("studio.app")
DEFAULT_MAX_UPLOAD_MB = 1024  # template imports (a FLUX LoRA can be a few hundred MB); images: 50 MB each
# Browser sessions whose state (gr.State, component values) the app keeps. Gradio keeps 10,000, each with a
# copy of every component's settings (~0.3 MB in this app): an API client that opens a session per call
# grew the web process by ~67 MB per 200 calls. The least recently used sessions beyond this are dropped.
DEFAULT_SESSIONS = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Style Template Studio web app")
    parser.add_argument("--host", default=os.environ.get("STUDIO_HOST", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("STUDIO_PORT", "7860")))
    parser.add_argument("--backbone", default=None,
                        help="tiny | flux-dev | sd3.5-large | sd3.5-medium | a diffusers folder or hub id "
                             "(default: flux-dev on a GPU with its weights, else tiny)")
    parser.add_argument("--data", help="data folder for templates and runs (env STUDIO_DATA, default .)")
    parser.add_argument("--auth", default=os.environ.get("STUDIO_AUTH"),
                        help="require a login, user:password (env STUDIO_AUTH)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start a GPU worker here (workers run on other hosts against the same queue)")
    parser.add_argument("--max-upload-mb", type=float,
                        default=float(os.environ.get("STUDIO_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)),
                        help=f"refuse uploads larger than this (default {DEFAULT_MAX_UPLOAD_MB} MB)")
    parser.add_argument("--sessions", type=int, default=int(os.environ.get("STUDIO_SESSIONS", DEFAULT_SESSIONS)),
                        help=f"browser sessions kept in memory (default {DEFAULT_SESSIONS}; env STUDIO_SESSIONS)")
    parser.add_argument("--log-level", default=os.environ.get("STUDIO_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``"user:password"`` -> ("user", "password"); None when no login is wanted."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth / STUDIO_AUTH must look like user:password")
    return user, password


def internal_paths(jobs) -> list[str]:
    """The studio's own files that must never be served, even if a data folder were allowed: the SQLite
    queue with its WAL, shared-memory and lock files, and the workers' heartbeats and logs (``.workers``)."""
    queue = jobs.settings.sqlite_file
    files = [queue, *(queue.with_name(queue.name + s) for s in ("-wal", "-shm", "-journal", ".lock"))]
    return [str(p) for p in (*files, jobs.runs_dir / ".workers")]


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (``docker stop``, systemd) both stop the studio cleanly, its worker included.

    Also when the studio was started with SIGINT ignored (a shell script's background job): Python
    then installs no Ctrl-C handler of its own, and the app would ignore Ctrl-C for good.
    """
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.data:
        os.environ["STUDIO_DATA"] = args.data
    auth = parse_auth(args.auth)

    from studio.engine.backbones import default_backbone, resolve
    from studio.errors import StudioError

    try:
        backbone = resolve(args.backbone or default_backbone()).backbone_id
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ["STUDIO_BACKBONE"] = backbone  # the worker and every request default to it

    from studio.jobs.jobs import Jobs
    from studio.jobs.supervisor import Supervisor

    try:
        jobs = Jobs()  # opens the queue: a damaged SQLite queue file is set aside and refilled from the job records
    except (StudioError, OSError, sqlite3.Error) as exc:
        print(f"error: cannot open the job queue or the data folder: {exc}", file=sys.stderr)
        return 2
    supervisor = None
    if not args.no_worker:  # first: the worker loads the model while this process imports Gradio and builds the page
        supervisor = Supervisor(jobs, backbone=backbone)
        supervisor.start()
        log.info("worker log: %s", supervisor.log_path)

    try:  # from here on the worker runs: stop it however this process ends
        import gradio as gr
        from starlette.middleware import Middleware

        from studio.api import StudioAPI
        from studio.ui import build_demo
        from studio.ui.auth import LoginThrottle, login_note
        from studio.ui.common import CSS

        api = StudioAPI(jobs, backbone=backbone)
        if backbone == "tiny":
            log.warning("running on the tiny offline demo backbone (no GPU or no model weights); "
                        "use --backbone flux-dev on a GPU for real styles")
        api.warm_index()  # style search: embed templates that are new since the last start, in the background
        demo = build_demo(api)  # shows files of the data folders as copies in Gradio's cache (studio.ui.served)
        demo.queue(default_concurrency_limit=1)
        host = args.host
        if host not in ("127.0.0.1", "localhost", "::1") and auth is None:
            log.warning("listening on %s without --auth: anyone who can reach this port can use the studio", host)
        demo.launch(
            server_name=host, server_port=args.port, share=args.share, auth=auth,
            auth_message=f"Style Template Studio: please log in. {login_note()}",
            # Nothing of the data folders is served directly: not in allowed_paths, and the internals blocked
            # outright in case someone adds them (blocked_paths win over allowed_paths).
            allowed_paths=[], blocked_paths=internal_paths(jobs),
            app_kwargs={"middleware": [Middleware(LoginThrottle)]} if auth else None,
            state_session_capacity=max(1, args.sessions),
            max_file_size=f"{args.max_upload_mb:g}mb", run_history=False, footer_links=["api", "settings"],
            theme=gr.themes.Soft(), css=CSS, show_error=True,
        )
    except KeyboardInterrupt:
        pass
    finally:
        log.info("the web server has stopped")
        if supervisor is not None:
            log.info("stopping the worker")
            supervisor.stop()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
