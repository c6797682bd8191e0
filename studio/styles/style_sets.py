"""Style sets, the evaluation's inputs: a styles folder (a folder or an image + ``.txt`` per style) or its
``styles.json`` manifest read into :class:`Style` records (images, style prompt, optional content captions),
with names made safe for folder names and readable errors for anything missing or malformed. The
folder format is described in :mod:`studio.styles.evaluate`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import InputError
from studio.media.images import slugify, validate_prompt

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Style:
    """One reference style: its images, style prompt and optional content captions."""

    name: str
    style_prompt: str
    images: list[Path]
    captions: list[str | None] | None = None


def _style_name(raw: str) -> str:
    return raw if _SAFE_NAME.fullmatch(raw) else slugify(raw)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _captions(lines: list[str], n_images: int, where: str) -> list[str | None] | None:
    if not lines:
        return None
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise InputError(f"{where}: give one caption line for all images or one per image ({n_images})")
    return list(lines)


def _manifest_styles(folder: Path, manifest: Path) -> list[Style]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{manifest} is not valid JSON ({exc})") from None
    entries = data.get("styles") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(f'{manifest}: expected {{"styles": [...]}} or a list of styles')
    styles = []
    for k, entry in enumerate(entries):
        where = f"{manifest.name} entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or not entry["images"]:
            raise InputError(f"{where}: give a dict with 'images' (a non-empty list) and 'style_prompt'")
        images = [folder / str(p) for p in entry["images"]]
        captions = entry.get("captions")
        if captions is not None and (not isinstance(captions, list) or len(captions) != len(images)):
            raise InputError(f"{where}: 'captions' must be a list with one caption per image")
        name = str(entry.get("name") or images[0].stem)
        prompt = validate_prompt(str(entry.get("style_prompt") or ""), f"style prompt of {name!r}")
        styles.append(Style(_style_name(name), prompt, images, [c or None for c in captions] if captions else None))
    return styles


def _folder_styles(folder: Path) -> list[Style]:
    styles = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            name = path.name
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
                            and not p.name.startswith("."))
            prompt_file, caption_file = path / "style.txt", path / "caption.txt"
        elif path.suffix.lower() in _IMAGE_SUFFIXES:
            name, images = path.stem, [path]
            prompt_file, caption_file = path.with_suffix(".txt"), path.with_name(f"{path.stem}.caption.txt")
        else:
            continue
        if not images:
            raise InputError(f"style folder {name!r} holds no images")
        if not prompt_file.is_file():
            raise InputError(f"style {name!r} has no style prompt: write it into "
                             f"{prompt_file.relative_to(folder)} (one line, e.g. 'watercolor painting')")
        lines = _read_lines(prompt_file)
        prompt = validate_prompt(lines[0] if lines else "", f"style prompt in {prompt_file.name}")
        captions = _captions(_read_lines(caption_file), len(images), caption_file.name) \
            if caption_file.is_file() else None
        styles.append(Style(_style_name(name), prompt, images, captions))
    return styles


def load_styles(folder: str | os.PathLike) -> list[Style]:
    """Read a styles folder (see :mod:`studio.styles.evaluate`); InputError naming what is wrong."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"styles folder {folder} does not exist")
    manifest = folder / "styles.json"
    styles = _manifest_styles(folder, manifest) if manifest.is_file() else _folder_styles(folder)
    if not styles:
        raise InputError(f"no styles found in {folder}: add one folder (images + style.txt) or image + .txt "
                         "per style, or a styles.json")
    names = [s.name for s in styles]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"two styles share the name(s) {', '.join(duplicates)}")
    return styles

