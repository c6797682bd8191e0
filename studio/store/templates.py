"""The template store: one folder per style template, the single source of truth on disk.

Layout (see docs/ARCHITECTURE.md)::

    <root>/<template_id>/template.json, lora.safetensors, metrics.jsonl, references/, previews/, thumbnail.png
    <root>/.staging/<uuid>/   templates being built (never listed)
    <root>/.trash/<id>-<uuid>/ templates being deleted (never listed)
    <root>/.index/             caches of studio.styles.retrieval (never listed; safe to delete)

A template appears with a single ``os.rename`` of a complete staging folder and disappears
with a single ``os.rename`` into ``.trash``, so readers never see half a template. Every
JSON write goes through a temp file in the same folder, ``fsync`` and ``os.replace``.

Imports (``.zip`` exports and ``.safetensors`` LoRAs) are checked member by member
before anything is extracted, never unpickle anything, and are built in a staging
folder that is removed on any failure, so a rejected file leaves the store unchanged.
Their template.json keeps only the fields of :mod:`studio.store.template_schema` (known fields, known
types and bounds), and their backbone must be one this studio allows
(:func:`studio.engine.backbones.is_allowed`), else it is mapped by the LoRA's shapes or refused.

Every template.json read goes through the same schema, and parsed files are cached by
(mtime, size, inode), so listing 500 templates does not parse 500 files each time; the listing
comes in pages (:meth:`TemplateStore.page`).

torch / safetensors are imported only by the functions that touch tensors: listing and
renaming stay light for the UI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import time
import unicodedata
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from studio.engine.backbones import KNOWN_BACKBONES, allowed_backbones, is_allowed
from studio.errors import InputError, NotFoundError, StudioError
from studio.media.images import MAX_NAME_CHARS, slugify, validate_name
from studio.store.template_schema import dropped, sanitize

log = logging.getLogger(__name__)

TEMPLATE_JSON = "template.json"
LORA_FILE = "lora.safetensors"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
INDEX_DIR = ".index"  # studio.styles.retrieval's caches (CLIP index, scores): rebuilt when deleted

# import limits
MAX_ZIP_MEMBERS = 500
MAX_LORA_BYTES = 2 * 1024**3  # lora.safetensors, uncompressed
MAX_OTHER_BYTES = 200 * 1024**2  # everything else in a zip together, uncompressed
MAX_JSON_BYTES = 4 * 1024**2  # template.json
MAX_COMPRESSION_RATIO = 100  # per member; real templates: json ~5-20x, images/tensors ~1x
RATIO_CHECK_MIN_BYTES = 1024**2  # small members may compress better (a few KB of JSON)
MAX_PATH_DEPTH = 3  # e.g. references/ref_00.png is 2
MAX_ID_CHARS = 255
ALLOWED_SUFFIXES = frozenset({".json", ".jsonl", ".png", ".jpg", ".jpeg", ".webp", ".safetensors"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
DEFAULT_BACKBONES = {"flux": "flux-dev", "sd3": "sd3.5-large"}
# An imported LoRA with no backbone in its metadata: its attention width says which model it was trained on
# (tiny FLUX: 2 heads x 32; FLUX.1: 24 x 128; SD3.5 Large: 38 x 64; SD3.5 Medium: 24 x 64).
BACKBONES_BY_WIDTH = {("flux", 64): "tiny", ("flux", 3072): "flux-dev", ("sd3", 2432): "sd3.5-large",
                      ("sd3", 1536): "sd3.5-medium"}
STYLE_PROMPT_KEYS = ("style_prompt", "studio_style_prompt", "modelspec.trigger_phrase", "trigger_phrase",
                     "trigger_words", "trigger_word", "instance_prompt")
MAX_IMPORTED_PROMPT_CHARS = 2000
DEFAULT_PAGE_SIZE = 48  # templates per listing page (the gallery shows one page of tiles)
MAX_PAGE_SIZE = 200
_ZIP_JUNK = ("__MACOSX/",)
# Temp files of write_json_atomic / _atomic_output / the index writers: ".<name>.<12 hex>.tmp[.npz]";
# one unchanged this long belongs to a process that was killed while writing.
TMP_MAX_AGE_S = 3600.0
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[a-z]+)?$")
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------- helpers

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


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temp path next to ``out``; move it to ``out`` when the block succeeds."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # safetensors writes 0600; exports are meant to be shared
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _safe_relative(rel: Any) -> PurePosixPath | None:
    """``rel`` as a harmless relative path (no absolute, ``..``, backslash, hidden part), else None."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") or part.startswith(".") for part in rel.split("/")):
        return None
    if ":" in p.parts[0]:  # "C:..." drive letters
        return None
    return p


def _created_ts(meta: dict) -> float:
    value = meta.get("created")
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


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def sanitize_name(raw: str, fallback: str = "Imported template") -> str:
    """Make a valid template name out of untrusted text (a file name, an archive's metadata)."""
    text = unicodedata.normalize("NFC", str(raw or ""))
    text = "".join("-" if c in "/\\" else " " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c
                   for c in text)
    text = " ".join(text.split()).lstrip(".").strip()[:MAX_NAME_CHARS].strip()
    try:
        return validate_name(text)
    except InputError:
        return validate_name(fallback)


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

    @property
    def style_prompt(self) -> str:
        value = self.meta.get("style_prompt")
        return value if isinstance(value, str) else ""

    @property
    def backbone(self) -> str:
        value = self.meta.get("backbone")
        return value if isinstance(value, str) else ""

    @property
    def family(self) -> str:
        value = self.meta.get("family")
        return value if isinstance(value, str) else ""

    @property
    def created(self) -> str:
        """Creation time as stored (ISO 8601, UTC), or "" when unknown."""
        value = self.meta.get("created")
        return value if isinstance(value, str) else "" if value is None else str(value)

    @property
    def thumbnail(self) -> Path | None:
        rel = _safe_relative(self.meta.get("thumbnail") or "thumbnail.png")
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
                rel = _safe_relative(entry)
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
        from studio.store import lora_formats

        staging = Path(staging)
        if not staging.is_dir() or staging.resolve().parent != self.staging_root.resolve():
            raise InputError(f"{staging} is not a staging folder of this store (use new_staging())")
        name = validate_name(name)
        meta = _read_template_json(staging / TEMPLATE_JSON)
        if not isinstance(meta.get("style_prompt"), str):
            raise InputError("template.json has no style_prompt")
        lora = staging / LORA_FILE
        if not lora.is_file() or lora.is_symlink():
            raise InputError(f"the template has no {LORA_FILE}")
        hint = meta.get("family") if meta.get("family") in lora_formats.FAMILIES else None
        family = lora_formats.validate_lora(lora, family_hint=hint)
        _check_finite_lora(lora)
        if meta.get("family") not in (None, "", family):
            raise InputError(f"template.json says the family is {meta['family']!r} but the LoRA is a "
                             f"{family.upper()} LoRA")
        meta["family"] = family
        meta["name"] = name
        if not isinstance(meta.get("created"), str):
            meta["created"] = _now_iso()
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
            _fsync_dir(self.root)
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
            meta = sanitize(_read_template_json(file))
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
            meta = {**_read_template_json(info.path / TEMPLATE_JSON), "name": name}
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
        _fsync_dir(self.root)
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
        out = _prepare_dest(dest_dir) / f"{info.id}.zip"
        with _atomic_output(out) as tmp, zipfile.ZipFile(tmp, "w", strict_timestamps=False) as zf:
            for path, arcname in _export_members(info.path):
                method = zipfile.ZIP_DEFLATED if path.suffix in (".json", ".jsonl") else zipfile.ZIP_STORED
                zf.write(path, arcname, compress_type=method)
        return out

    def export_safetensors(self, template_id: str, dest_dir: Path) -> Path:
        """``<dest_dir>/<id>.safetensors``: the LoRA (diffusers keys) with the template card.

        The header keeps lora.safetensors' metadata (diffusers' ``lora_adapter_metadata``)
        and adds ``studio_template`` (template.json as a JSON string) and ``format: pt``.
        """
        from safetensors.torch import save_file

        info = self.get(template_id)
        tensors, header = self._read_lora(info)
        metadata = {**header, "studio_template": json.dumps(info.meta, ensure_ascii=False), "format": "pt"}
        out = _prepare_dest(dest_dir) / f"{info.id}.safetensors"
        with _atomic_output(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return out

    def export_comfy(self, template_id: str, dest_dir: Path) -> Path:
        """``<dest_dir>/<id>_comfy.safetensors``: the LoRA in kohya/ComfyUI keys, same card.

        The effective scale diffusers would use (``lora_alpha / r`` from the file's
        metadata) becomes the kohya ``alpha`` tensors, so ComfyUI at strength 1 matches
        the studio at LoRA scale 1.
        """
        from safetensors.torch import save_file

        from studio.store import lora_formats

        info = self.get(template_id)
        tensors, header = self._read_lora(info)
        fmt, family = lora_formats.analyse(tensors, info.family or None)
        if fmt == "kohya":
            kohya = tensors
        else:
            kohya = lora_formats.diffusers_to_kohya(tensors, family, lora_formats.diffusers_scales(tensors, header))
        metadata = {k: v for k, v in header.items() if k != "lora_adapter_metadata"}
        metadata.update({"studio_template": json.dumps(info.meta, ensure_ascii=False), "format": "pt"})
        out = _prepare_dest(dest_dir) / f"{info.id}_comfy.safetensors"
        with _atomic_output(out) as tmp:
            save_file(kohya, str(tmp), metadata=metadata)
        return out

    def _read_lora(self, info: TemplateInfo):
        from safetensors.torch import load_file

        from studio.store import lora_formats

        path = info.path / LORA_FILE
        try:
            _, header = lora_formats.read_safetensors_header(path)
            tensors = load_file(str(path))
        except (InputError, OSError, ValueError, RuntimeError) as e:
            raise StudioError(f"template {info.id!r} has a damaged {LORA_FILE}: {e}") from None
        return tensors, header

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
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise InputError(f"{path.name}: {suffix} files are pickled PyTorch checkpoints, which are never "
                             "loaded (they can run code); convert the LoRA to .safetensors")
        if suffix not in (".zip", ".safetensors"):
            raise InputError(f"{path.name}: unsupported file type (import a template .zip or a LoRA .safetensors)")
        if not path.is_file():
            raise InputError(f"{path.name}: no such file")
        staging = self.new_staging()
        try:
            if suffix == ".zip":
                meta, fallback_name = self._stage_zip(path, staging), None
            else:
                meta, fallback_name = self._stage_safetensors(path, staging)
            final_name = name or (sanitize_name(meta["name"]) if isinstance(meta.get("name"), str)
                                  and meta["name"].strip() else sanitize_name(fallback_name or path.stem))
            final_name = self._unique_name(final_name)
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

    def _stage_safetensors(self, src: Path, staging: Path) -> tuple[dict, str]:
        from studio.store import lora_formats

        _, header = lora_formats.read_safetensors_header(src)  # rejects pickles, zips, bad headers
        lora = staging / LORA_FILE
        shutil.copyfile(src, lora)  # validate our own copy from here on
        card = header.get("studio_template")
        if card is not None:
            try:
                meta = json.loads(card)
            except ValueError:
                raise InputError(f"{src.name}: its studio_template metadata is not valid JSON") from None
            if not isinstance(meta, dict):
                raise InputError(f"{src.name}: its studio_template metadata is not a JSON object")
            meta = _sanitize_imported(meta, src.name)
            if not isinstance(meta.get("style_prompt"), str):
                raise InputError(f"{src.name}: its studio_template metadata has no usable style_prompt (a text of "
                                 "at most 2000 characters)")
        else:
            meta = {"format_version": 1, "style_prompt": _prompt_from_header(header), "imported": True,
                    "source_file": src.name, "created": _now_iso(), "references": [], "previews": []}
        loaded = _load_staged_lora(lora, meta, src.name)
        if loaded.converted or card is not None:  # store plain diffusers keys, without the card
            kept = {k: v for k, v in loaded.metadata.items() if k != "studio_template"}
            if loaded.converted:
                kept.pop("lora_adapter_metadata", None)
            _save_lora(loaded.state, lora, {**kept, "format": "pt"})
        _finish_meta(meta, loaded.family, staging, header, src.name)
        return meta, src.stem

    def _stage_zip(self, src: Path, staging: Path) -> dict:
        limit = MAX_LORA_BYTES + MAX_OTHER_BYTES + 64 * 1024**2  # the archive itself
        if src.stat().st_size > limit:
            raise InputError(f"{src.name} is too large ({src.stat().st_size / 1024**3:.2f} GB)")
        try:
            zf = zipfile.ZipFile(src)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise InputError(f"{src.name} is not a valid zip archive") from None
        with zf:
            plan = _plan_zip(zf.infolist(), src.name)
            for info, rel in plan:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _extract_member(zf, info, dest)
                except InputError:
                    raise
                except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as e:
                    raise InputError(f"{src.name}: cannot extract {rel}: {e}") from None
        for _, rel in plan:
            _check_member_content(staging / rel, rel, src.name)
        meta = _sanitize_imported(_read_template_json(staging / TEMPLATE_JSON, src.name), src.name)
        if not isinstance(meta.get("style_prompt"), str):
            raise InputError(f"{src.name}: template.json has no usable style_prompt (a text of at most 2000 "
                             "characters)")
        loaded = _load_staged_lora(staging / LORA_FILE, meta, src.name)
        if loaded.converted:
            kept = {k: v for k, v in loaded.metadata.items() if k not in ("studio_template", "lora_adapter_metadata")}
            _save_lora(loaded.state, staging / LORA_FILE, {**kept, "format": "pt"})
        _finish_meta(meta, loaded.family, staging, {}, src.name)
        return meta


# --------------------------------------------------------------------------- import helpers

def _read_template_json(path: Path, source: str | None = None) -> dict:
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


def _sanitize_imported(raw: dict, source: str) -> dict:
    """An imported template.json reduced to the schema (unknown fields and bad values dropped)."""
    meta = sanitize(raw)
    lost = dropped(raw, meta)
    if lost:
        log.info("import of %s: dropped template.json fields %s", source, ", ".join(lost[:20]))
    return meta


def _load_staged_lora(lora: Path, meta: dict, source: str):
    """Validate and load the staged LoRA; errors name ``source`` (the file the user gave)."""
    from studio.store import lora_formats

    hint = meta.get("family") if meta.get("family") in lora_formats.FAMILIES else None
    try:
        loaded = lora_formats.load_lora(lora, family_hint=hint)
    except InputError as e:
        message = str(e)
        if source.lower().endswith(".safetensors") and message.startswith(lora.name):
            raise InputError(source + message[len(lora.name):]) from None  # it is the user's file
        raise InputError(f"{source}: {message}") from None
    if meta.get("family") not in (None, "", loaded.family):
        raise InputError(f"{source}: the template says {meta['family']!r} but the LoRA is a "
                         f"{loaded.family.upper()} LoRA")
    return loaded


def _save_lora(state: dict, dest: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with _atomic_output(dest) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def _prompt_from_header(header: dict[str, str]) -> str:
    for key in STYLE_PROMPT_KEYS:
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())[:MAX_IMPORTED_PROMPT_CHARS]
    return ""


def _import_backbone(meta: dict, family: str, folder: Path, header: dict[str, str], source: str) -> str:
    """The backbone an imported template gets: the one it names if this studio allows it, else the
    registry's model its LoRA's attention width belongs to; with no backbone named and no width
    match, the family's default. A named backbone that is not allowed and matches no width is refused."""
    stated = meta.get("backbone")
    if not isinstance(stated, str) or not stated.strip():
        stated = header.get("backbone") or header.get("studio_backbone") or ""
        arch = header.get("modelspec.architecture", "").lower()
        if not stated and family == "sd3" and "medium" in arch:
            stated = "sd3.5-medium"
    stated = stated.strip()
    if stated in KNOWN_BACKBONES and KNOWN_BACKBONES[stated][0] != family:
        stated = ""  # a registry id of the other family: the file is wrong about it, ignore it
    if stated and is_allowed(stated):
        return stated
    by_width = BACKBONES_BY_WIDTH.get((family, _attention_width(folder / LORA_FILE)))
    if by_width:
        if stated:
            log.info("import of %s: backbone %r is not allowed here; its LoRA's shapes say %s",
                     source, stated[:80], by_width)
        return by_width
    if not stated:
        return DEFAULT_BACKBONES[family]
    shown = stated if len(stated) <= 80 else stated[:77] + "..."
    raise InputError(f"{source}: its backbone {shown!r} is not one this studio allows "
                     f"({', '.join(allowed_backbones())}) and its LoRA's shapes match none of them")


def _finish_meta(meta: dict, family: str, folder: Path, header: dict[str, str], source: str) -> None:
    """Make an imported (already sanitised) template.json consistent with what is on disk."""
    meta["family"] = family
    backbone = _import_backbone(meta, family, folder, header, source)
    meta["backbone"] = backbone
    if "base_model" in meta:  # what the model card names: the model the backbone really is
        known = KNOWN_BACKBONES.get(backbone)
        meta["base_model"] = (known[1] or backbone) if known else backbone  # "tiny" has no hub id
    if not isinstance(meta.get("created"), str):
        meta["created"] = _now_iso()
    for key in ("previews", "references"):  # drop entries whose files did not come along
        if key in meta:
            meta[key] = [rel for rel in meta[key] if (folder / rel).is_file()]
    thumb = _safe_relative(meta.get("thumbnail"))
    if "thumbnail" in meta and (thumb is None or not (folder / thumb).is_file()):
        meta.pop("thumbnail")


def _attention_width(lora: Path) -> int | None:
    """The input width of the first attention query projection's LoRA (lora_A is rank x width), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(lora), framework="pt") as f:
            for key in f.keys():
                if key.endswith(("to_q.lora_A.weight", "to_q.lora_down.weight")):
                    shape = f.get_slice(key).get_shape()
                    return int(shape[1]) if len(shape) == 2 else None
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def _zip_error(zip_name: str, member: str, why: str) -> InputError:
    return InputError(f"{zip_name}: member {member[:120]!r} {why}")


def _plan_zip(infos: list[zipfile.ZipInfo], zip_name: str) -> list[tuple[zipfile.ZipInfo, str]]:
    """Check every member before extracting anything; return (member, relative path) pairs."""
    if len(infos) > MAX_ZIP_MEMBERS:
        raise InputError(f"{zip_name} has {len(infos)} entries (the limit is {MAX_ZIP_MEMBERS})")
    files: list[tuple[zipfile.ZipInfo, str]] = []
    seen: set[str] = set()
    for info in infos:
        raw = info.filename
        if raw.startswith(_ZIP_JUNK) or raw.rsplit("/", 1)[-1] == ".DS_Store":
            continue  # macOS Finder metadata: skipped, never extracted
        mode = (info.external_attr >> 16) & 0xFFFF
        if stat.S_ISLNK(mode):
            raise _zip_error(zip_name, raw, "is a symbolic link")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _zip_error(zip_name, raw, "is not a regular file")
        if info.flag_bits & 0x1:
            raise _zip_error(zip_name, raw, "is encrypted")
        is_dir = raw.endswith("/")
        rel = _safe_relative(raw.rstrip("/") if is_dir else raw)
        if rel is None:
            raise _zip_error(zip_name, raw, "has an unsafe path (absolute, '..', '\\' or hidden)")
        if len(rel.parts) > MAX_PATH_DEPTH + 1:
            raise _zip_error(zip_name, raw, "is nested too deeply")
        if is_dir:
            continue
        if rel.suffix.lower() not in ALLOWED_SUFFIXES:
            raise _zip_error(zip_name, raw, "is not an allowed file type (json, jsonl, png, jpg, webp, "
                                            "safetensors)")
        key = str(rel).casefold()
        if key in seen:
            raise _zip_error(zip_name, raw, "appears twice")
        seen.add(key)
        files.append((info, str(rel)))
    # an archive of the folder itself ("my-style/template.json"): drop that top folder
    names = {rel for _, rel in files}
    if TEMPLATE_JSON not in names:
        tops = {rel.split("/", 1)[0] for rel in names}
        if len(tops) == 1 and all("/" in rel for rel in names):
            top = tops.pop() + "/"
            files = [(info, rel[len(top):]) for info, rel in files]
            names = {rel for _, rel in files}
    for required in (TEMPLATE_JSON, LORA_FILE):
        if required not in names:
            raise InputError(f"{zip_name} is not a template export: it has no {required}")
    other_total = 0
    for info, rel in files:
        size = info.file_size
        if rel == LORA_FILE:
            if size > MAX_LORA_BYTES:
                raise _zip_error(zip_name, rel, f"is {size / 1024**3:.2f} GB (the limit is "
                                                f"{MAX_LORA_BYTES / 1024**3:.0f} GB)")
        else:
            other_total += size
            if other_total > MAX_OTHER_BYTES:
                raise InputError(f"{zip_name}: the files besides the LoRA exceed "
                                 f"{MAX_OTHER_BYTES // 1024**2} MB uncompressed")
        if size > RATIO_CHECK_MIN_BYTES and size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise _zip_error(zip_name, rel, f"expands {size / max(info.compress_size, 1):.0f}x (a zip bomb?)")
    return files


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    """Copy one member, never writing more than its declared size (zipfile checks the CRC)."""
    written = 0
    with zf.open(info) as src, open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise InputError(f"member {info.filename!r} is larger than it declares")
            out.write(chunk)


_MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",)}


def _check_member_content(path: Path, rel: str, zip_name: str) -> None:
    """Images must be what their extension says; other safetensors files must parse."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(12)
        ok = head[:4] == b"RIFF" and head[8:12] == b"WEBP" if suffix == ".webp" else head.startswith(_MAGIC[suffix])
        if not ok:
            raise _zip_error(zip_name, rel, f"is not a {suffix[1:].upper()} image")
    elif suffix == ".safetensors" and rel != LORA_FILE:
        from studio.store import lora_formats

        try:
            lora_formats.read_safetensors_header(path)
        except InputError as e:
            raise _zip_error(zip_name, rel, f"is not a valid safetensors file ({e})") from None


def _prepare_dest(dest_dir: Path) -> Path:
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(dest)  # left by an export that was killed while writing
    return dest


def _export_members(folder: Path) -> list[tuple[Path, str]]:
    """The files an export carries: allowed types, no hidden files, no symlinks."""
    members = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d)))
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            rel = path.relative_to(folder).as_posix()
            if (fname.startswith(".") or path.is_symlink() or path.suffix.lower() not in ALLOWED_SUFFIXES
                    or rel.count("/") > MAX_PATH_DEPTH):
                continue
            members.append((path, rel))
    return members


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = path.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest
