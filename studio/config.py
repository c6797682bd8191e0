"""Where the studio keeps its data. Every path can be changed with an environment variable.

The data folder (``STUDIO_DATA``, default ``.``) holds the template store and the runs folder;
``STUDIO_STORE`` / ``STUDIO_RUNS`` move either one on its own. Several hosts share one studio by
pointing ``STUDIO_DATA`` at a shared folder and ``STUDIO_REDIS_URL`` at one Redis server.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The data folder (``STUDIO_DATA``, default the current folder)."""
    return Path(os.environ.get("STUDIO_DATA") or ".").expanduser().resolve()


def store_dir() -> Path:
    """The template store (``STUDIO_STORE``, default ``<data>/templates_store``)."""
    value = os.environ.get("STUDIO_STORE")
    return Path(value).expanduser().resolve() if value else data_dir() / "templates_store"


def runs_dir() -> Path:
    """Job folders: job records, checkpoints, previews, metrics (``STUDIO_RUNS``, default ``<data>/runs``)."""
    value = os.environ.get("STUDIO_RUNS")
    return Path(value).expanduser().resolve() if value else data_dir() / "runs"


def queue_file() -> Path:
    """The embedded SQLite queue (``STUDIO_QUEUE_FILE``, default ``<runs>/.queue.sqlite3``).

    Only used without a Redis URL; SQLite must live on a local disk (not NFS), so hosts that
    share a data folder share a Redis queue instead.
    """
    value = os.environ.get("STUDIO_QUEUE_FILE")
    return Path(value).expanduser().resolve() if value else runs_dir() / ".queue.sqlite3"


def redis_url() -> str | None:
    """The shared Redis queue (``STUDIO_REDIS_URL``, e.g. ``redis://gpu-host:6379/0``), or None for SQLite."""
    return os.environ.get("STUDIO_REDIS_URL") or None


def cache_dir() -> Path:
    """Locally built models such as the tiny backbone (``STUDIO_CACHE``, default ``~/.cache/style-studio``)."""
    return Path(os.environ.get("STUDIO_CACHE", "~/.cache/style-studio")).expanduser().resolve()


def configured_backbones() -> list[str]:
    """Backbones the operator allows besides the registry's ids: ``STUDIO_BACKBONE`` (also set by
    ``app.py --backbone``) and ``STUDIO_BACKBONES`` (comma-separated diffusers folders or hub ids).

    Requests and imported templates may name only these and the registry's ids
    (:func:`studio.engine.backbones.resolve_allowed`).
    """
    values = [os.environ.get("STUDIO_BACKBONE") or "", *(os.environ.get("STUDIO_BACKBONES") or "").split(",")]
    return list(dict.fromkeys(v.strip() for v in values if v.strip()))
