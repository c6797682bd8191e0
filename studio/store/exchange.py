"""Imports and exports of templates: the checks and conversions between files and a template folder.

:class:`studio.store.templates.TemplateStore` calls these: its ``import_file`` builds the template in a
staging folder with :func:`stage_import` (and removes the folder on any failure, so a rejected file leaves
the store unchanged); its ``export_*`` methods write with :func:`export_zip`, :func:`export_safetensors`
and :func:`export_comfy`.

Imports (``.zip`` exports and ``.safetensors`` LoRAs) are checked member by member
before anything is extracted and never unpickle anything. Their template.json keeps only the fields of
:mod:`studio.store.template_schema` (known fields, known types and bounds), and their backbone must be
one this studio allows (:func:`studio.engine.backbones.is_allowed`), else it is mapped by the LoRA's
shapes or refused. Exports carry only allowed file types and are written atomically.

torch / safetensors are imported only by the functions that touch tensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import unicodedata
import zipfile
from pathlib import Path

from studio.engine.backbones import KNOWN_BACKBONES, allowed_backbones, is_allowed
from studio.errors import InputError, StudioError
from studio.media.images import MAX_NAME_CHARS, validate_name
from studio.store.files import (
    IMAGE_SUFFIXES,
    LORA_FILE,
    TEMPLATE_JSON,
    atomic_output,
    now_iso,
    read_template_json,
    remove_stale_temp_files,
    safe_relative,
)
from studio.store.template_schema import dropped, sanitize

log = logging.getLogger(__name__)

# import limits
MAX_ZIP_MEMBERS = 500
MAX_LORA_BYTES = 2 * 1024**3  # lora.safetensors, uncompressed
MAX_OTHER_BYTES = 200 * 1024**2  # everything else in a zip together, uncompressed
MAX_COMPRESSION_RATIO = 100  # per member; real templates: json ~5-20x, images/tensors ~1x
RATIO_CHECK_MIN_BYTES = 1024**2  # small members may compress better (a few KB of JSON)
MAX_PATH_DEPTH = 3  # e.g. references/ref_00.png is 2
ALLOWED_SUFFIXES = frozenset({".json", ".jsonl", ".png", ".jpg", ".jpeg", ".webp", ".safetensors"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
DEFAULT_BACKBONES = {"flux": "flux-dev", "sd3": "sd3.5-large"}
# Attention widths of the known models (imports now match every layer: studio.store.lora_shapes)
# (tiny FLUX: 2 heads x 32; FLUX.1: 24 x 128; SD3.5 Large: 38 x 64; SD3.5 Medium: 24 x 64).
BACKBONES_BY_WIDTH = {("flux", 64): "tiny", ("flux", 3072): "flux-dev", ("sd3", 2432): "sd3.5-large",
                      ("sd3", 1536): "sd3.5-medium"}
STYLE_PROMPT_KEYS = ("style_prompt", "studio_style_prompt", "modelspec.trigger_phrase", "trigger_phrase",
                     "trigger_words", "trigger_word", "instance_prompt")
MAX_IMPORTED_PROMPT_CHARS = 2000
_ZIP_JUNK = ("__MACOSX/",)
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------- import

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


def check_import_path(path: Path) -> None:
    """InputError unless ``path`` is an existing ``.zip`` or ``.safetensors`` file (pickles are named as such)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InputError(f"{path.name}: {suffix} files are pickled PyTorch checkpoints, which are never "
                         "loaded (they can run code); convert the LoRA to .safetensors")
    if suffix not in (".zip", ".safetensors"):
        raise InputError(f"{path.name}: unsupported file type (import a template .zip or a LoRA .safetensors)")
    if not path.is_file():
        raise InputError(f"{path.name}: no such file")


def stage_import(src: Path, staging: Path) -> tuple[dict, str]:
    """Check ``src`` (passed by :func:`check_import_path`) and build its template in ``staging``.

    Returns the sanitised template.json (not written yet) and the name the file suggests: its card's
    name, else the file's name, made valid by :func:`sanitize_name`.
    """
    if src.suffix.lower() == ".zip":
        meta, fallback_name = _stage_zip(src, staging), None
    else:
        meta, fallback_name = _stage_safetensors(src, staging)
    name = (sanitize_name(meta["name"]) if isinstance(meta.get("name"), str) and meta["name"].strip()
            else sanitize_name(fallback_name or src.stem))
    return meta, name


def _stage_safetensors(src: Path, staging: Path) -> tuple[dict, str]:
    from studio.store import lora_files, lora_metadata

    _, header = lora_files.read_safetensors_header(src)  # rejects pickles, zips, bad headers
    refusal = lora_metadata.refused_architecture(header)
    if refusal:
        raise InputError(f"{src.name} is not a usable LoRA: {refusal}")
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
                "source_file": src.name, "created": now_iso(), "references": [], "previews": []}
    loaded = _load_staged_lora(lora, meta, src.name)
    if loaded.converted or card is not None:  # store plain diffusers keys, without the card
        kept = {k: v for k, v in loaded.metadata.items() if k != "studio_template"}
        if loaded.converted:
            kept.pop("lora_adapter_metadata", None)
        _save_lora(loaded.state, lora, {**kept, "format": "pt"})
    _finish_meta(meta, loaded, staging, header, src.name)
    return meta, (lora_metadata.name_from_header(header) if card is None else None) or src.stem


def _stage_zip(src: Path, staging: Path) -> dict:
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
    meta = _sanitize_imported(read_template_json(staging / TEMPLATE_JSON, src.name), src.name)
    if not isinstance(meta.get("style_prompt"), str):
        raise InputError(f"{src.name}: template.json has no usable style_prompt (a text of at most 2000 "
                         "characters)")
    loaded = _load_staged_lora(staging / LORA_FILE, meta, src.name)
    if loaded.converted:
        kept = {k: v for k, v in loaded.metadata.items() if k not in ("studio_template", "lora_adapter_metadata")}
        _save_lora(loaded.state, staging / LORA_FILE, {**kept, "format": "pt"})
    _finish_meta(meta, loaded, staging, {}, src.name)
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
    from studio.store import lora_files, lora_keys

    hint = meta.get("family") if meta.get("family") in lora_keys.FAMILIES else None
    try:
        loaded = lora_files.load_lora(lora, family_hint=hint)
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

    with atomic_output(dest) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def _prompt_from_header(header: dict[str, str]) -> str:
    """A bare file's style prompt: its trigger phrase (``in <style> style`` unwrapped), else the most
    frequent tags of its captions (kohya's ``ss_tag_frequency``), else empty."""
    from studio.store.lora_metadata import style_from_tags, unwrap_style

    for key in STYLE_PROMPT_KEYS:
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return unwrap_style(value)[:MAX_IMPORTED_PROMPT_CHARS]
    return (style_from_tags(header.get("ss_tag_frequency")) or "")[:MAX_IMPORTED_PROMPT_CHARS]


def _import_backbone(meta: dict, family: str, shapes: dict[str, tuple[int, int]], header: dict[str, str],
                     source: str) -> str:
    """The backbone an imported template gets: the one it names if this studio allows it, else the known
    model every layer of its LoRA fits (:mod:`studio.store.lora_shapes`). A LoRA that fits no known model
    is refused, naming the backbone it states if any."""
    from studio.store import lora_shapes

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
    fits = lora_shapes.fitting_backbones(family, shapes)
    if fits:
        if stated:
            log.info("import of %s: backbone %r is not allowed here; its LoRA's shapes say %s",
                     source, stated[:80], fits[0])
        return fits[0]
    if not stated:
        raise InputError(f"{source} is not a usable LoRA: {lora_shapes.mismatch_message(family, shapes)}")
    shown = stated if len(stated) <= 80 else stated[:77] + "..."
    raise InputError(f"{source}: its backbone {shown!r} is not one this studio allows "
                     f"({', '.join(allowed_backbones())}) and its LoRA's shapes match none of them")


def _finish_meta(meta: dict, loaded, folder: Path, header: dict[str, str], source: str) -> None:
    """Make an imported (already sanitised) template.json consistent with what is on disk."""
    from studio.store import lora_shapes

    meta["family"] = loaded.family
    backbone = _import_backbone(meta, loaded.family, lora_shapes.lora_shapes(loaded.state), header, source)
    meta["backbone"] = backbone
    if "base_model" in meta:  # what the model card names: the model the backbone really is
        known = KNOWN_BACKBONES.get(backbone)
        meta["base_model"] = (known[1] or backbone) if known else backbone  # "tiny" has no hub id
    if not isinstance(meta.get("created"), str):
        meta["created"] = now_iso()
    for key in ("previews", "references"):  # drop entries whose files did not come along
        if key in meta:
            meta[key] = [rel for rel in meta[key] if (folder / rel).is_file()]
    thumb = safe_relative(meta.get("thumbnail"))
    if "thumbnail" in meta and (thumb is None or not (folder / thumb).is_file()):
        meta.pop("thumbnail")
    if loaded.notes:
        meta["import_notes"] = list(loaded.notes)
        for note in loaded.notes:
            log.warning("import of %s: %s", source, note)


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
        rel = safe_relative(raw.rstrip("/") if is_dir else raw)
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
        from studio.store import lora_files

        try:
            lora_files.read_safetensors_header(path)
        except InputError as e:
            raise _zip_error(zip_name, rel, f"is not a valid safetensors file ({e})") from None


# --------------------------------------------------------------------------- export

def prepare_dest(dest_dir: Path) -> Path:
    """``dest_dir`` (created if missing), cleared of temp files that killed exports left."""
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(dest)  # left by an export that was killed while writing
    return dest


def export_members(folder: Path) -> list[tuple[Path, str]]:
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


def read_lora(template_id: str, folder: Path):
    """A stored template's LoRA: its tensors and safetensors header; StudioError if the file is damaged."""
    from safetensors.torch import load_file

    from studio.store import lora_files

    path = folder / LORA_FILE
    try:
        _, header = lora_files.read_safetensors_header(path)
        tensors = load_file(str(path))
    except (InputError, OSError, ValueError, RuntimeError) as e:
        raise StudioError(f"template {template_id!r} has a damaged {LORA_FILE}: {e}") from None
    return tensors, header


def export_zip(template_id: str, folder: Path, dest_dir: Path) -> Path:
    """``<dest_dir>/<template_id>.zip`` with the folder's files (names relative to the folder)."""
    out = prepare_dest(dest_dir) / f"{template_id}.zip"
    with atomic_output(out) as tmp, zipfile.ZipFile(tmp, "w", strict_timestamps=False) as zf:
        for path, arcname in export_members(folder):
            method = zipfile.ZIP_DEFLATED if path.suffix in (".json", ".jsonl") else zipfile.ZIP_STORED
            zf.write(path, arcname, compress_type=method)
    return out


def _export_header(template_id: str, meta: dict, family: str, state: dict) -> dict[str, str]:
    """What every LoRA export's header adds: the studio's card, kohya's and the model spec's keys."""
    from studio.store import lora_formats, lora_metadata

    title = meta.get("name") if isinstance(meta.get("name"), str) and meta["name"].strip() else template_id
    return {**lora_metadata.export_metadata(meta, family, lora_formats.module_rank(state), title),
            "studio_template": json.dumps(meta, ensure_ascii=False), "format": "pt"}


def export_safetensors(template_id: str, folder: Path, meta: dict, dest_dir: Path) -> Path:
    """``<dest_dir>/<template_id>.safetensors``: the LoRA (diffusers keys) with the template card.

    The scale diffusers applies (``lora_alpha / r``) is folded into the B matrices, so tools that ignore
    ``lora_adapter_metadata`` (ComfyUI) load it at the same strength
    (:func:`studio.store.lora_formats.fold_for_export`); the header adds ``studio_template`` (``meta``,
    template.json, as a JSON string), ``format: pt`` and the kohya / model-spec keys of
    :mod:`studio.store.lora_metadata`. Tensors keep the stored precision (float32).
    """
    from safetensors.torch import save_file

    from studio.store import lora_formats, lora_keys

    tensors, header = read_lora(template_id, folder)
    fmt, family = lora_keys.analyse(tensors, meta.get("family") or None)
    if fmt == "diffusers":
        tensors, header = lora_formats.fold_for_export(tensors, header)
    metadata = {**header, **_export_header(template_id, meta, family, tensors)}
    out = prepare_dest(dest_dir) / f"{template_id}.safetensors"
    with atomic_output(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


EXPORT_PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}


def export_comfy(template_id: str, folder: Path, meta: dict, family: str, dest_dir: Path,
                 precision: str = "bf16") -> Path:
    """``<dest_dir>/<template_id>_comfy.safetensors``: the LoRA in kohya/ComfyUI keys, same card.

    ``family`` is the template's ("" lets the tensors say). The effective scale diffusers would use
    (``lora_alpha / r``) is folded into the up matrices and every ``alpha`` equals its module's rank,
    so ComfyUI and diffusers' kohya loader (which drops the final layer's alpha) at strength 1 match the
    studio at LoRA scale 1. ``precision``: ``bf16`` (default, half the size) or ``fp32``. Fused q/k/v
    (and FLUX ``linear1``) keep their zero-padded block layout: diffusers' kohya converter splits
    ``linear1`` at FLUX's fixed widths and needs every row.
    """
    import torch
    from safetensors.torch import save_file

    from studio.store import lora_formats, lora_keys

    if precision not in EXPORT_PRECISIONS:
        raise InputError(f"unknown export precision {precision!r}: use {' or '.join(EXPORT_PRECISIONS)}")
    dtype = getattr(torch, EXPORT_PRECISIONS[precision])
    tensors, header = read_lora(template_id, folder)
    fmt, family = lora_keys.analyse(tensors, family or None)
    if fmt == "kohya":
        tensors = lora_formats.kohya_to_diffusers(tensors, family)  # alpha folded in: rank-scaled below
    else:
        tensors, _ = lora_formats.fold_for_export(tensors, header)
    kohya = lora_formats.diffusers_to_kohya(tensors, family)  # scale 1: alpha = rank
    kohya = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in kohya.items()}
    metadata = {k: v for k, v in header.items() if k != "lora_adapter_metadata"}
    metadata.update(_export_header(template_id, meta, family, tensors))
    out = prepare_dest(dest_dir) / f"{template_id}_comfy.safetensors"
    with atomic_output(out) as tmp:
        save_file(kohya, str(tmp), metadata=metadata)
    return out
