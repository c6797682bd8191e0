"""Where the studio keeps its data. Every path can be changed with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def store_dir() -> Path:
    """The template store (``STUDIO_STORE``, default ``./templates_store``)."""
    return Path(os.environ.get("STUDIO_STORE", "templates_store")).expanduser().resolve()


def runs_dir() -> Path:
    """Work folders of training jobs: checkpoints, previews, metrics (``STUDIO_RUNS``, default ``./runs``)."""
    return Path(os.environ.get("STUDIO_RUNS", "runs")).expanduser().resolve()


def cache_dir() -> Path:
    """Locally built models such as the tiny backbone (``STUDIO_CACHE``, default ``~/.cache/style-studio``)."""
    return Path(os.environ.get("STUDIO_CACHE", "~/.cache/style-studio")).expanduser().resolve()
