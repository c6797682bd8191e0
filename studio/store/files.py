"""The files of a template folder, read and written safely.

What both :mod:`studio.store.templates` (the store) and :mod:`studio.store.exchange` (imports and
exports) need: the names of a template's files, harmless relative paths, the checked
template.json reader, and the atomic writers (temp file in the same folder, ``fsync``,
``os.replace``) with the clean-up of the temp files that killed writers leave behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from studio.errors import InputError

TEMPLATE_JSON = "template.json"
LORA_FILE = "lora.safetensors"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_JSON_BYTES = 4 * 1024**2  # template.json
# Temp files of write_json_atomic / atomic_output / the index writers: ".<name>.<12 hex>.tmp[.npz]";
# one unchanged this long belongs to a process that was killed while writing.
TMP_MAX_AGE_S = 3600.0
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[a-z]+)?$")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temp file of the atomic writers (``.<name>.<random>.tmp[.ext]``)."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temp_files(folder: Path, max_age_s: float = TMP_MAX_AGE_S) -> int:
    """Delete the atomic writers' temp files in ``folder`` (not below it) unchanged for ``max_age_s``."""
    removed = 0
    cutoff = time.time() - max_age_s
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if is_temp_file(entry.name) and entry.is_file(follow_symlinks=False) \
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temp path next to ``out``; move it to ``out`` when the block succeeds."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # safetensors writes 0600; exports are meant to be shared
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def safe_relative(rel: Any) -> PurePosixPath | None:
    """``rel`` as a harmless relative path (no absolute, ``..``, backslash, hidden part), else None."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") or part.startswith(".") for part in rel.split("/")):
        return None
    if ":" in p.parts[0]:  # "C:..." drive letters
        return None
    return p


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_template_json(path: Path, source: str | None = None) -> dict:
    """A template.json as a dict; InputError (naming ``source`` when given) if it is missing, unreadable,
    too large or not a JSON object."""
    where = f"{source}: " if source else ""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{where}the template has no {TEMPLATE_JSON}") from None
    except OSError as e:
        raise InputError(f"{where}{TEMPLATE_JSON} is unreadable ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{where}{TEMPLATE_JSON} is too large")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{where}{TEMPLATE_JSON} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise InputError(f"{where}{TEMPLATE_JSON} is not a JSON object")
    return meta
