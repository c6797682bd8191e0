"""The template store: one folder per style template, the single source of truth on disk.

Layout (see docs/ARCHITECTURE.md)::

    <root>/<template_id>/template.json, lora.safetensors, metrics.jsonl, references/, previews/, thumbnail.png
    <root>/.staging/<uuid>/   templates being built (never listed)
    <root>/.trash/<id>-<uuid>/ templates being deleted (never listed)
    <root>/.index/             caches of studio.styles.retrieval (never listed; safe to delete)

A template appears with a single ``os.rename`` of a complete staging folder and disappears
with a single ``os.rename`` into ``.trash``, so readers never see half a template. Every
JSON write goes through a temp file in the same folder, ``fsync`` and ``os.replace``.

Imports (``.zip`` exports and ``.safetensors`` LoRAs) are built in a staging folder that is
removed on any failure, so a rejected file leaves the store unchanged; what they are checked for
(member by member, before anything is extracted, never unpickling anything; template.json reduced to
:mod:`studio.store.template_schema`; only backbones this studio allows) and how exports are written is
in :mod:`studio.store.exchange`. File names, the template.json reader and the atomic writers are in
:mod:`studio.store.files`.

Every template.json read goes through the same schema, and parsed files are cached by
(mtime, size, inode), so listing 500 templates does not parse 500 files each time; the listing
comes in pages (:meth:`TemplateStore.page`).

torch / safetensors are imported only by the functions that touch tensors: listing and
renaming stay light for the UI.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from studio.errors import InputError, NotFoundError, StudioError
from studio.media.images import MAX_NAME_CHARS, slugify, validate_name
from studio.store import exchange
from studio.store.files import (
    IMAGE_SUFFIXES,
    LORA_FILE,
    TEMPLATE_JSON,
    TMP_MAX_AGE_S,
    fsync_dir,
    now_iso,
    read_template_json,
    remove_stale_temp_files,
    safe_relative,
    write_json_atomic,
)
from studio.store.template_schema import sanitize

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
INDEX_DIR = ".index"  # studio.styles.retrieval's caches (CLIP index, scores): rebuilt when deleted
MAX_ID_CHARS = 255
DEFAULT_PAGE_SIZE = 48  # templates per listing page (the gallery shows one page of tiles)
MAX_PAGE_SIZE = 200


# --------------------------------------------------------------------------- helpers

def _check_finite_lora(path: Path) -> None:
    """InputError if any tensor of the LoRA file holds NaN or inf (a diverged training): never stored.

    Reads one tensor at a time, so even a large LoRA needs little memory.
    """
    import torch
    from safetensors import safe_open

    bad = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
                    bad.append(key)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path.name} cannot be read: {e}") from None
    if bad:
        raise InputError(f"{path.name} has NaN/inf values in {len(bad)} tensor(s) (e.g. {bad[0]}): "
                         "the training diverged; it is not saved as a template")


def _created_ts(meta: dict) -> tuple[float, float]:
    """The listing's order, newest first: when the template came into this store (``added``: an import is
    new here, whenever it was trained), then when it was made."""
    return _timestamp(meta.get("added")), _timestamp(meta.get("created"))


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    return 0.0


def page_bounds(offset: Any = 0, limit: Any = None) -> tuple[int, int]:
    """A listing page's ``(offset, limit)`` from what a request gave: whole numbers (``3.0`` too),
    offset >= 0 (default 0), limit 1.. :data:`MAX_PAGE_SIZE` (None / 0: :data:`DEFAULT_PAGE_SIZE`;
    larger: the maximum). InputError for anything else."""
    def whole(value: Any, what: str) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{what} must be a whole number >= 0 (got {str(value)[:40]!r})")
        return value

    offset = whole(0 if offset is None else offset, "the page offset")
    limit = whole(0 if limit is None else limit, "the page size (limit)")
    return offset, min(limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _check_id(template_id: Any) -> str:
    """Reject ids that are not a plain folder name, before touching the filesystem."""
    if not isinstance(template_id, str) or not template_id.strip():
        raise NotFoundError("no template id given")
    bad = (len(template_id) > MAX_ID_CHARS or template_id.startswith(".")
           or any(c in template_id for c in "/\\\x00")
           or any(unicodedata.category(c) == "Cc" for c in template_id))
    if bad:
        raise NotFoundError(f"{template_id[:80]!r} is not a valid template id")
    return template_id


# --------------------------------------------------------------------------- TemplateInfo

@dataclass
class TemplateInfo:
    """One template as listed: its id (= folder name), folder and parsed template.json."""

    id: str
    path: Path
    meta: dict

    @property
    def name(self) -> str:
        value = self.meta.get("name")
        return value if isinstance(value, str) and value else self.id

    def _text(self, key: str) -> str:
        value = self.meta.get(key)
        return value if isinstance(value, str) else ""

    @property
    def style_prompt(self) -> str:
        return self._text("style_prompt")

    @property
    def backbone(self) -> str:
        return self._text("backbone")

    @property
    def family(self) -> str:
        return self._text("family")

    @property
    def created(self) -> str:
        """Creation time as stored (ISO 8601, UTC), or "" when unknown."""
        value = self.meta.get("created")
        return value if isinstance(value, str) else "" if value is None else str(value)

    @property
    def thumbnail(self) -> Path | None:
        rel = safe_relative(self.meta.get("thumbnail") or "thumbnail.png")
        path = self.path / rel if rel else None
        return path if path is not None and path.is_file() else None

    @property
    def previews(self) -> list[Path]:
        """Preview images (in template.json order; else every image in ``previews/``)."""
        return self._files("previews")

    @property
    def references(self) -> list[Path]:
        """Reference images (in template.json order; else every image in ``references/``)."""
        return self._files("references")

    def _files(self, key: str) -> list[Path]:
        entries = self.meta.get(key)
        if isinstance(entries, list) and entries:
            found = []
            for entry in entries:
                if isinstance(entry, dict):
                    entry = entry.get("path") or entry.get("file")
                rel = safe_relative(entry)
                if rel is not None and (self.path / rel).is_file():
                    found.append(self.path / rel)
            return found
        folder = self.path / key
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


@dataclass
class TemplatePage:
    """One page of the listing: ``items`` from ``offset`` (at most ``limit``) of ``total`` matches."""

    items: list[TemplateInfo]
    total: int
    offset: int
    limit: int


class _Broken(Exception):
    """A folder in the store that is not a usable template (the message says why)."""


# --------------------------------------------------------------------------- the store

class TemplateStore:
    """The template store under ``root`` (created if missing)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # folder name -> ((mtime_ns, size, inode) of its template.json, sanitised meta, created timestamp)
        self._parsed: dict[str, tuple[tuple[int, int, int], dict, float]] = {}

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING_DIR

    @property
    def trash_root(self) -> Path:
        return self.root / TRASH_DIR

    def __repr__(self) -> str:
        return f"TemplateStore({str(self.root)!r})"

    # -- building ------------------------------------------------------------------------

    def new_staging(self) -> Path:
        """A fresh empty folder ``<root>/.staging/<uuid>`` to assemble a template in."""
        self.staging_root.mkdir(exist_ok=True)
        path = self.staging_root / uuid.uuid4().hex
        path.mkdir()
        return path

    def create(self, staging: Path, name: str) -> TemplateInfo:
        """Publish a complete staging folder as a template named ``name``.

        Checks template.json (a JSON object with a string ``style_prompt``) and
        lora.safetensors (a FLUX/SD3 LoRA, header only), sets ``id``, ``name``,
        ``family`` (and ``created`` if missing), picks a free id ``slugify(name)``,
        ``-2``, ``-3``... and moves the folder into place with one ``os.rename``.
        """
        from studio.store import lora_files, lora_keys

        staging = Path(staging)
        if not staging.is_dir() or staging.resolve().parent != self.staging_root.resolve():
            raise InputError(f"{staging} is not a staging folder of this store (use new_staging())")
        name = validate_name(name)
        meta = read_template_json(staging / TEMPLATE_JSON)
        if not isinstance(meta.get("style_prompt"), str):
            raise InputError("template.json has no style_prompt")
        lora = staging / LORA_FILE
        if not lora.is_file() or lora.is_symlink():
            raise InputError(f"the template has no {LORA_FILE}")
        hint = meta.get("family") if meta.get("family") in lora_keys.FAMILIES else None
        family = lora_files.validate_lora(lora, family_hint=hint)
        _check_finite_lora(lora)
        if meta.get("family") not in (None, "", family):
            raise InputError(f"template.json says the family is {meta['family']!r} but the LoRA is a "
                             f"{family.upper()} LoRA")
        meta["family"] = family
        meta["name"] = name
        if not isinstance(meta.get("created"), str):
            meta["created"] = now_iso()
        meta["added"] = now_iso()
        base = slugify(name)
        for n in range(1, 10_000):
            template_id = base if n == 1 else f"{base}-{n}"
            target = self.root / template_id
            if os.path.lexists(target):
                continue
            meta["id"] = template_id
            write_json_atomic(staging / TEMPLATE_JSON, meta)
            try:
                os.rename(staging, target)  # fails if another writer took the id meanwhile
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                    continue
                raise
            fsync_dir(self.root)
            return TemplateInfo(template_id, target, sanitize(meta))
        raise StudioError(f"no free template id for {name!r}")

    # -- reading -------------------------------------------------------------------------

    def _load(self, template_id: str, path: Path) -> TemplateInfo:
        meta, _ = self._parsed_meta(template_id, path)
        if not os.path.isfile(path / LORA_FILE):
            raise _Broken(f"no {LORA_FILE}")
        return TemplateInfo(template_id, path, meta)

    def _parsed_meta(self, template_id: str, path: Path) -> tuple[dict, float]:
        """The folder's template.json through the schema, and its creation time; parsed again only
        when the file changed (atomic writes give it a new inode)."""
        file = path / TEMPLATE_JSON
        try:
            st = os.stat(file)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            key = None
        cached = self._parsed.get(template_id)
        if key is not None and cached is not None and cached[0] == key:
            return dict(cached[1]), cached[2]  # a shallow copy: callers may set top-level fields
        try:
            meta = sanitize(read_template_json(file))
        except InputError as e:
            self._parsed.pop(template_id, None)
            raise _Broken(str(e)) from None
        created = _created_ts(meta)
        if key is not None:
            self._parsed[template_id] = (key, meta, created)
        return dict(meta), created

    def list(self, query: str | None = None) -> list[TemplateInfo]:
        """Every usable template, newest first; ``query`` filters by name and style prompt.

        The query is case-insensitive; with several words, each must appear. Skipped
        with a warning: hidden folders (but ``.staging`` / ``.trash`` silently) and broken
        folders (no/unreadable/invalid template.json, no lora.safetensors); plain files
        are ignored. Reads only template.json per folder (no images, no tensors).
        """
        terms = query.casefold().split() if query else []
        found: list[tuple[float, TemplateInfo]] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        seen = set()
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if not is_dir:  # .gitkeep, a README, an export someone saved here...
                log.debug("template store: ignoring non-folder %s", entry.path)
                continue
            if entry.name.startswith("."):
                if entry.name not in (STAGING_DIR, TRASH_DIR, INDEX_DIR):
                    log.warning("template store: skipping hidden folder %s", entry.path)
                continue
            seen.add(entry.name)
            try:
                meta, created = self._parsed_meta(entry.name, Path(entry.path))
                if not os.path.isfile(os.path.join(entry.path, LORA_FILE)):
                    raise _Broken(f"no {LORA_FILE}")
            except _Broken as e:
                log.warning("template store: skipping %s: %s", entry.path, e)
                continue
            info = TemplateInfo(entry.name, Path(entry.path), meta)
            if terms:
                haystack = f"{info.name}\n{info.style_prompt}".casefold()
                if not all(t in haystack for t in terms):
                    continue
            found.append((created, info))
        for gone in set(self._parsed) - seen:  # deleted folders: forget their parsed files
            self._parsed.pop(gone, None)
        found.sort(key=lambda pair: (pair[0], pair[1].id), reverse=True)
        return [info for _, info in found]

    def page(self, query: str | None = None, offset: Any = 0, limit: Any = None) -> TemplatePage:
        """One page of :meth:`list` (newest first): at most ``limit`` templates from ``offset``, and
        how many match in all. ``limit`` defaults to :data:`DEFAULT_PAGE_SIZE`, at most
        :data:`MAX_PAGE_SIZE` (see :func:`page_bounds`); an offset past the end gives an empty page."""
        offset, limit = page_bounds(offset, limit)
        found = self.list(query)
        return TemplatePage(found[offset:offset + limit], len(found), offset, limit)

    def _folder(self, template_id: str) -> Path:
        template_id = _check_id(template_id)
        path = self.root / template_id
        if path.is_symlink() or not path.is_dir():
            raise NotFoundError(f"no template {template_id!r} in {self.root}")
        return path

    def get(self, template_id: str) -> TemplateInfo:
        """The template with this id; NotFoundError if there is none (or it is damaged)."""
        path = self._folder(template_id)
        try:
            return self._load(template_id, path)
        except _Broken as e:
            raise NotFoundError(f"template {template_id!r} is damaged: {e}") from None

    # -- changing ------------------------------------------------------------------------

    def rename(self, template_id: str, new_name: str) -> TemplateInfo:
        """Change a template's display name (its id and folder stay)."""
        name = validate_name(new_name)
        info = self.get(template_id)
        try:  # the file as written, so fields this version does not know are kept on disk
            meta = {**read_template_json(info.path / TEMPLATE_JSON), "name": name}
            write_json_atomic(info.path / TEMPLATE_JSON, meta)
        except (InputError, FileNotFoundError):  # deleted meanwhile
            raise NotFoundError(f"no template {template_id!r} in {self.root}") from None
        return TemplateInfo(info.id, info.path, sanitize(meta))

    def delete(self, template_id: str) -> None:
        """Remove a template: one rename into ``.trash`` (atomic), then delete the files."""
        path = self._folder(template_id)
        self.trash_root.mkdir(exist_ok=True)
        doomed = self.trash_root / f"{template_id}-{uuid.uuid4().hex}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            raise NotFoundError(f"no template {template_id!r} in {self.root}") from None
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def clean_staging(self, max_age_s: float = 24 * 3600, tmp_max_age_s: float = TMP_MAX_AGE_S) -> int:
        """Remove what killed processes left: staging folders untouched for ``max_age_s``,
        leftovers in ``.trash``, and temp files of the atomic writers older than ``tmp_max_age_s``.

        A staging folder's age is that of its newest file, so a long run that keeps
        writing into it is not removed; a temp file is written in one go, so one that has
        not changed for ``tmp_max_age_s`` belongs to a writer that died. Temp files are
        looked for in the store folder, each template folder and ``.index``. Workers call
        this when they start. Returns the number of folders and files removed.
        """
        removed = self._clean_temp_files(tmp_max_age_s)
        now = time.time()
        for root, always in ((self.staging_root, False), (self.trash_root, True)):
            if not root.is_dir():
                continue
            for entry in os.scandir(root):
                path = Path(entry.path)
                if not always and now - _newest_mtime(path) <= max_age_s:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed += 1
        return removed

    def _clean_temp_files(self, max_age_s: float) -> int:
        folders = [self.root]
        with contextlib.suppress(OSError):
            folders += [Path(e.path) for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)
                        and e.name not in (STAGING_DIR, TRASH_DIR, INDEX_DIR)]
        folders += [Path(dirpath) for dirpath, _, _ in os.walk(self.root / INDEX_DIR)]
        return sum(remove_stale_temp_files(folder, max_age_s) for folder in folders)

    # -- export --------------------------------------------------------------------------

    def export_zip(self, template_id: str, dest_dir: Path) -> Path:
        """``<dest_dir>/<id>.zip`` with the folder's files (names relative to the folder)."""
        info = self.get(template_id)
        return exchange.export_zip(info.id, info.path, dest_dir)

    def export_safetensors(self, template_id: str, dest_dir: Path) -> Path:
        """``<dest_dir>/<id>.safetensors``: the LoRA (diffusers keys) with the template card.

        The LoRA scale is folded into the weights (alpha = rank, so ComfyUI, which ignores
        ``lora_adapter_metadata``, loads it at the studio's strength); the header adds
        ``studio_template`` (template.json as a JSON string), ``format: pt`` and the kohya ``ss_*`` and
        ``modelspec.*`` keys other tools read (:mod:`studio.store.lora_metadata`).
        """
        info = self.get(template_id)
        return exchange.export_safetensors(info.id, info.path, info.meta, dest_dir)

    def export_comfy(self, template_id: str, dest_dir: Path, precision: str = "bf16") -> Path:
        """``<dest_dir>/<id>_comfy.safetensors``: the LoRA in kohya/ComfyUI keys, same card and keys.

        The LoRA scale is folded into the up matrices and every ``alpha`` equals its rank, so ComfyUI
        and diffusers at strength 1 match the studio at LoRA scale 1. ``precision``: ``bf16``
        (default) or ``fp32``.
        """
        info = self.get(template_id)
        return exchange.export_comfy(info.id, info.path, info.meta, info.family, dest_dir, precision)

    # -- import --------------------------------------------------------------------------

    def import_file(self, path: Path, name: str | None = None) -> TemplateInfo:
        """Import a template ``.zip`` (from export_zip) or a ``.safetensors`` LoRA.

        A safetensors file with a ``studio_template`` header (export_safetensors /
        export_comfy) keeps its template card; any other (another trainer's LoRA, diffusers
        or kohya keys) becomes a template named after the file, style prompt from its
        metadata if any, ``imported: true``. ``name`` (validated) overrides the name; a
        name already in the store gets " (2)", " (3)"... Raises InputError with a one-line
        message for anything unsafe or unusable, and then leaves the store unchanged.
        """
        path = Path(path)
        if name is not None:
            name = validate_name(name)
        exchange.check_import_path(path)
        staging = self.new_staging()
        try:
            meta, suggested_name = exchange.stage_import(path, staging)
            final_name = self._unique_name(name or suggested_name)
            for key in ("id", "job_id"):  # this store assigns the id; the job ran elsewhere
                meta.pop(key, None)
            meta["name"] = final_name
            write_json_atomic(staging / TEMPLATE_JSON, meta)
            return self.create(staging, final_name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _unique_name(self, name: str) -> str:
        taken = {info.name.casefold() for info in self.list()}
        if name.casefold() not in taken:
            return name
        for n in range(2, 10_000):
            tail = f" ({n})"
            candidate = name[:MAX_NAME_CHARS - len(tail)].rstrip() + tail
            if candidate.casefold() not in taken:
                return candidate
        raise StudioError(f"too many templates named {name!r}")


# --------------------------------------------------------------------------- helpers of clean_staging

def _newest_mtime(path: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = path.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest
