"""A dataset zip (kohya / FluxGym style: ``cat.png`` + ``cat.txt``) opened into reference files and captions.

Only plain image files and their ``.txt`` captions are taken, by base name (no folders are created
from the zip's paths), with bounds on the count and the unpacked size; anything else in the zip is
ignored. Problems raise :class:`~studio.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from studio.errors import InputError
from studio.media.captions import read_sidecar
from studio.media.images import MAX_REFERENCE_IMAGES, MAX_UPLOAD_BYTES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
MAX_UNPACKED_BYTES = MAX_REFERENCE_IMAGES * MAX_UPLOAD_BYTES


def is_dataset_zip(path: str | Path) -> bool:
    return str(path).lower().endswith(".zip")


def open_dataset_zip(path: str | Path, dest: str | Path) -> list[tuple[Path, str | None]]:
    """Unpack the images of a dataset zip into ``dest``; ``[(image file, caption from its .txt or None)]``."""
    path, dest = Path(path), Path(dest)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"'{path.name}' is not a readable zip file ({type(exc).__name__})") from None
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir() and "__MACOSX" not in i.filename
                   and not PurePosixPath(i.filename).name.startswith(".")]
        images = [i for i in entries if PurePosixPath(i.filename).suffix.lower() in IMAGE_SUFFIXES]
        texts = {PurePosixPath(i.filename).with_suffix("").as_posix(): i for i in entries
                 if PurePosixPath(i.filename).suffix.lower() == ".txt"}
        if not images:
            raise InputError(f"'{path.name}' holds no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        if len(images) > MAX_REFERENCE_IMAGES:
            raise InputError(f"'{path.name}' holds {len(images)} images; the limit is {MAX_REFERENCE_IMAGES}")
        if sum(i.file_size for i in images) + sum(t.file_size for t in texts.values()) > MAX_UNPACKED_BYTES:
            raise InputError(f"'{path.name}' unpacks to more than {MAX_UNPACKED_BYTES // 2**20} MB")
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for k, info in enumerate(images):
            if info.file_size > MAX_UPLOAD_BYTES:
                raise InputError(f"'{info.filename}' in '{path.name}' is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            name = PurePosixPath(info.filename)
            target = dest / f"{k:02d}_{name.name}"
            target.write_bytes(archive.read(info))
            text = texts.get(name.with_suffix("").as_posix())
            if text is not None:
                target.with_suffix(".txt").write_bytes(archive.read(text)[:65536])
            out.append((target, read_sidecar(target)))
        return out


def write_dataset_zip(images: list[str | Path], captions: list[str | None], out: str | Path) -> Path:
    """The other way round: reference files and their captions as a dataset zip (``name.png`` + ``name.txt``
    for each captioned picture), written atomically. It is what the Train form takes back with captions."""
    out = Path(out)
    if len(captions) not in (0, len(images)):
        raise InputError(f"give one caption per image ({len(images)}), or none")
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # pictures are compressed already
        for image, caption in zip(images, captions or [None] * len(images), strict=True):
            name = Path(image).name
            archive.write(image, name)
            if caption:
                archive.writestr(str(PurePosixPath(name).with_suffix(".txt")), caption)
    tmp.replace(out)
    return out
