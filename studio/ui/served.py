"""What the web app serves: copies of the pictures and files the page shows, never the data folders.

Gradio serves any file under its ``allowed_paths`` to whoever asks for
``/gradio_api/file=<absolute path>``. With the data folders there, that was every job's
``request.json`` and ``job.json``, the queue file and the worker log too. Instead the data
folders stay out of ``allowed_paths``, and every file component of the app (galleries, images,
file downloads) hands the browser a copy in Gradio's own cache folder, which Gradio serves
anyway (it copies what a component shows there; a file already there is not copied again).
So what can be fetched is exactly what the page (or an API endpoint) showed: previews,
references, generated images, exports.

:func:`serve_copies` wraps the components' ``postprocess``; :func:`served_copy` makes one copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gradio as gr

SERVED_DIR = "studio-served"  # under Gradio's cache folder
_SALT = secrets.token_bytes(16)  # copy folders are not guessable from a data path
FILE_COMPONENTS = (gr.Gallery, gr.Image, gr.File)


def cache_folder() -> Path:
    """Gradio's cache folder (``GRADIO_TEMP_DIR``, default ``<tmp>/gradio``): Gradio serves what is in it."""
    try:
        from gradio.utils import get_upload_folder

        return Path(get_upload_folder())
    except ImportError:  # a Gradio without the helper: the same rule
        return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def served_copy(path: str | Path, roots: Iterable[Path]) -> str | Path:
    """The copy of ``path`` the page may show, when it is a file inside one of the data folders ``roots``;
    anything else is returned as it is (uploads, exports and name cards already live in temp folders).

    One copy per file version (path, size, modification time): repeated polls reuse it. A hard link
    where the file system allows one, else a copy; written under a temporary name, then renamed.
    """
    text = os.fspath(path)
    if not os.path.isabs(text):
        return path
    real = Path(os.path.realpath(text))
    if not _inside(real, roots):
        return path
    try:
        st = real.stat()
    except OSError:
        return path  # gone meanwhile: Gradio reports the missing file as before
    if not real.is_file():
        return path
    key = hashlib.sha256(_SALT + f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    folder = cache_folder() / SERVED_DIR / key
    dest = folder / real.name
    if dest.exists():
        return str(dest)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{real.name}.{secrets.token_hex(4)}.tmp"
    try:
        try:
            os.link(real, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(real, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return str(dest)


def serve_value(value: Any, roots: Iterable[Path]) -> Any:
    """``value`` with every absolute path inside ``roots`` replaced by its served copy (lists, tuples and
    gallery ``(path, caption)`` items included); other values are left alone."""
    roots = tuple(roots)
    if isinstance(value, (str, Path)):
        return served_copy(value, roots)
    if isinstance(value, tuple):
        return tuple(serve_value(v, roots) for v in value)
    if isinstance(value, list):
        return [serve_value(v, roots) for v in value]
    return value


def _postprocess(original: Callable[[Any], Any], roots: tuple[Path, ...], value: Any) -> Any:
    return original(serve_value(value, roots))


def serve_copies(demo: gr.Blocks, roots: Iterable[str | Path]) -> int:
    """Make every file-showing component of ``demo`` show copies of files under ``roots`` (the data folders).

    Call it after the Blocks are built and before launch. Returns how many components it wrapped.
    """
    resolved = tuple(Path(os.path.realpath(r)) for r in roots)
    n = 0
    for block in demo.blocks.values():
        if isinstance(block, FILE_COMPONENTS) and not isinstance(block.postprocess, functools.partial):
            block.postprocess = functools.partial(_postprocess, block.postprocess, resolved)
            n += 1
    return n


__all__ = ["SERVED_DIR", "cache_folder", "serve_copies", "serve_value", "served_copy"]
