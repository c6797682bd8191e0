"""Free disk space: checked before a training writes checkpoints and before a template is published.

A full disk found half-way is worse than one found first: a checkpoint or a template copy cut
short. :func:`require_free` refuses early with the numbers (``needs ~X MB, Y MB free on /path``).
Tests simulate a full disk by replacing :func:`free_bytes` (``monkeypatch.setattr(diskspace,
"free_bytes", ...)``); every check looks it up at call time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from studio.errors import StudioError

MB = 1024 * 1024
MARGIN_BYTES = 8 * MB  # file system overhead (blocks, directories, JSON files) on top of the estimate
LORA_BYTES_PER_PARAM = 4  # LoRA weights are kept in fp32
ADAM_BYTES_PER_PARAM = 8  # two fp32 moments per LoRA weight


class DiskFullError(StudioError):
    """Not enough free disk space for what a job is about to write; the message has the numbers."""


def free_bytes(path: str | Path) -> int:
    """Bytes free for this user on the file system holding ``path`` (its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return int(shutil.disk_usage(folder).free)


def megabytes(n: int | float) -> str:
    """``n`` bytes as a short MB figure: 0.3, 12.5, 840, 15320."""
    value = n / MB
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def require_free(path: str | Path, needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless ``needed`` bytes (plus a margin) are free where ``path`` lives."""
    needed = int(needed) + MARGIN_BYTES
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(f"not enough disk space to {what}: needs ~{megabytes(needed)} MB, "
                            f"{megabytes(free)} MB free on {path}")


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder`` (0 if it does not exist)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def training_bytes(lora_params: int, *, checkpoints: bool, previews: int, resolution: int,
                   references_bytes: int = 0) -> int:
    """What a training writes into its run folder at most, from its LoRA parameter count.

    A checkpoint holds the LoRA and Adam's two moments (12 bytes per parameter); while the next
    one is written the previous one still exists, so two. The result holds the LoRA (4 bytes per
    parameter), a copy of the references and the previews (PNG, about 1.5 bytes per pixel).
    """
    checkpoint = lora_params * (LORA_BYTES_PER_PARAM + ADAM_BYTES_PER_PARAM)
    preview_bytes = previews * resolution * resolution * 3 // 2
    result = lora_params * LORA_BYTES_PER_PARAM + references_bytes + preview_bytes
    return (2 * checkpoint if checkpoints else 0) + preview_bytes + result
