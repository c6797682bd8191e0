"""Style Template Studio: the web app.

    python app.py                         # http://127.0.0.1:7860, worker started here
    python app.py --backbone flux-dev     # on a GPU with FLUX.1-dev downloaded
    python app.py --host 0.0.0.0 --auth me:secret
    python app.py --no-worker             # workers run elsewhere (same data folder + Redis)

With no GPU or no model weights it runs on the tiny offline demo backbone and says so on the
page. The web process only queues jobs and reads their progress; the GPU worker (a child
process, see studio.worker) trains and generates, so closing or reloading the page never
stops a training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Before gradio / huggingface_hub are imported: no phoning home from the web process.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger("studio.app")
DEFAULT_MAX_UPLOAD_MB = 1024  # template imports (a FLUX LoRA can be a few hundred MB); images: 50 MB each


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.data:
        os.environ["STUDIO_DATA"] = args.data
    auth = parse_auth(args.auth)

    from studio import config
    from studio.backbones import resolve
    from studio.errors import StudioError

    try:
        backbone = resolve(args.backbone or config.default_backbone()).backbone_id
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ["STUDIO_BACKBONE"] = backbone  # the worker and every request default to it

    import gradio as gr

    from studio.api import StudioAPI
    from studio.jobs import Jobs
    from studio.ui import build_demo
    from studio.ui.common import CSS
    from studio.worker import Supervisor

    jobs = Jobs()
    api = StudioAPI(jobs, backbone=backbone)
    supervisor = None
    if not args.no_worker:
        supervisor = Supervisor(jobs, backbone=backbone)
        supervisor.start()
        log.info("worker log: %s", supervisor.log_path)
    if backbone == "tiny":
        log.warning("running on the tiny offline demo backbone (no GPU or no model weights); "
                    "use --backbone flux-dev on a GPU for real styles")
    api.warm_index()  # style search: embed templates that are new since the last start, in the background
    demo = build_demo(api)
    demo.queue(default_concurrency_limit=1)
    host = args.host
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        log.warning("listening on %s without --auth: anyone who can reach this port can use the studio", host)
    try:
        demo.launch(
            server_name=host, server_port=args.port, share=args.share, auth=auth,
            auth_message="Style Template Studio: please log in",
            # Only the data folders are served (Gradio's own upload/cache folder is implicit).
            allowed_paths=[str(jobs.runs_dir), str(jobs.store.root), str(config.store_dir())],
            max_file_size=f"{args.max_upload_mb:g}mb", run_history=False, footer_links=["api", "settings"],
            theme=gr.themes.Soft(), css=CSS, show_error=True,
        )
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
