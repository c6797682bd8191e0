"""Loading and normalising reference images, and resizing them to a pixel budget.

Everything a user hands us (files, template names, prompts) is checked here, and any
problem becomes an :class:`~studio.errors.InputError` with a one-line message that
names the file. Pillow and numpy only: no torch.
"""

from __future__ import annotations

import io
import math
import re
import stat
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from studio.errors import InputError

MAX_REFERENCE_IMAGES = 20
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # per file
MAX_PIXELS = 64_000_000  # decompression-bomb guard, checked before decoding
MAX_NAME_CHARS = 80
MAX_SLUG_CHARS = 60

# Formats we decode. Restricting Image.open also keeps Pillow away from formats such
# as EPS, which it would hand to Ghostscript.
# (Multi-picture JPEGs from cameras come through the JPEG opener as "MPO".)
Image.init()
_FORMATS = [f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN]
_FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF or AVIF"
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes / (1024 * 1024):.3g} MB"


def _detail(exc: BaseException) -> str:
    """The first line of an exception's message, short, for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit "L" (no clipping)."""
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:  # "I" or "F": the range is not recorded, so infer it from the data
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            arr = (arr - lo) * (255.0 / (hi - lo or 1.0))
        elif img.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255:
            arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert an RGB/CMYK image with an embedded ICC profile to sRGB (best effort)."""
    if not icc or img.mode not in ("RGB", "CMYK"):
        return img
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        return out if out is not None else img
    except Exception:  # noqa: BLE001 - a broken or odd profile: keep the raw values
        return img


def _normalise(img: Image.Image) -> Image.Image:
    """Turn any decoded image into a plain 8-bit RGB image (alpha over white)."""
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit_grey(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = _to_srgb(img, icc)
    out = img.convert("RGB")
    out.info = {}  # drop ICC/EXIF/etc.: the pixels are now plain sRGB
    return out


def load_image(path: str | Path) -> Image.Image:
    """Open one user image file and return it as a normalised 8-bit RGB image.

    Applies EXIF orientation, takes the first frame of animations, composites alpha
    over white, converts palette/CMYK/greyscale/16-bit images and embedded ICC
    profiles to 8-bit sRGB. Any problem with the file (missing, too big, not an
    image, truncated, decompression bomb...) raises :class:`InputError` naming it.
    """
    path = Path(path)
    name = path.name or str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"'{name}' does not exist.") from None
    except OSError as exc:
        raise InputError(f"'{name}' cannot be read ({exc.strerror or exc}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"'{name}' is a folder, not an image file.")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise InputError(f"'{name}' is not a regular file.")
    size = st.st_size
    if size == 0:
        raise InputError(f"'{name}' is empty (0 bytes).")
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"'{name}' is larger than {_size_text(MAX_UPLOAD_BYTES)} ({_size_text(size)}).")
    not_an_image = f"'{name}' is not a supported image ({_FORMATS_TEXT})."
    try:
        fp = path.open("rb")
    except OSError as exc:
        raise InputError(f"'{name}' cannot be read ({exc.strerror or exc}).") from None

    def too_large(size_text: str) -> InputError:
        limit = f"the limit is {MAX_PIXELS / 1e6:g} megapixels"
        return InputError(f"'{name}' is too large ({size_text}{limit}).")

    try:
        with fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. TIFF "Corrupt EXIF data" noise
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_FORMATS) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise too_large(f"{width}x{height} pixels; ")
                img.load()  # full decode now, so truncated files fail here
                return _normalise(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fired first: "Image size (N pixels) exceeds limit..."
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size_text = f"{int(found[1]) / 1e6:.0f} megapixels; " if found else ""
        raise too_large(size_text) from None
    except Image.UnidentifiedImageError:
        raise InputError(not_an_image) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise InputError(f"'{name}' is truncated or corrupt ({_detail(exc)}).") from None
    except MemoryError:
        raise InputError(f"'{name}' is too large to decode.") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        msg = f"'{name}' could not be read as an image ({_detail(exc)})."
        raise InputError(msg) from None


def load_reference_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Load 1..MAX_REFERENCE_IMAGES reference images with :func:`load_image`.

    Every file is validated before anything is returned; the first bad file raises
    :class:`InputError`.
    """
    if not paths:
        raise InputError("Add at least one reference image.")
    if len(paths) > MAX_REFERENCE_IMAGES:
        raise InputError(f"Too many reference images ({len(paths)}); the limit is {MAX_REFERENCE_IMAGES}.")
    return [load_image(p) for p in paths]


def _target_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """Pick (W, H), multiples of ``multiple``, with W*H <= 1.01 * resolution**2,
    losing as little of the image (crop + missing area) as possible."""
    budget = resolution * resolution
    limit = budget * 1.01
    aspect = width / height
    ideal_h = math.sqrt(budget / aspect) / multiple
    best: tuple[float, int, int] | None = None
    for k in range(max(1, math.floor(ideal_h) - 2), math.ceil(ideal_h) + 3):
        h = k * multiple
        ideal_w = h * aspect / multiple
        max_w = math.floor(limit / h / multiple)
        for j in {math.floor(ideal_w), math.ceil(ideal_w), max_w}:
            j = min(max(j, 1), max_w)
            if j < 1:
                continue
            w = j * multiple
            crop = 1 - min(w / h / aspect, aspect * h / w)
            cost = crop + max(0.0, 1 - w * h / budget)
            if best is None or cost < best[0]:
                best = (cost, w, h)
    if best is None:  # resolution**2 < multiple**2: cannot happen after the check
        return multiple, multiple
    return best[1], best[2]


def fit_to_budget(img: Image.Image, resolution: int, multiple: int = 16) -> Image.Image:
    """Resize ``img`` so that width*height is about ``resolution**2`` (at most 1% more).

    The aspect ratio is kept: both sides are multiples of ``multiple`` (at least
    ``multiple``), reached with a small center crop rather than a distortion (the
    crop is only large for extreme aspect ratios, where the short side would
    otherwise fall below ``multiple``). Small images are upscaled. LANCZOS.
    """
    if multiple < 1 or resolution < multiple:
        raise ValueError(f"resolution {resolution} must be >= multiple {multiple} >= 1")
    w, h = img.size
    tw, th = _target_size(w, h, resolution, multiple)
    # The centred source box with the target's aspect ratio: the crop.
    if w * th > tw * h:  # source is wider than the target
        box_w, box_h = h * tw / th, float(h)
    else:
        box_w, box_h = float(w), w * th / tw
    left, top = (w - box_w) / 2, (h - box_h) / 2
    box = (left, top, left + box_w, top + box_h)
    return img.resize((tw, th), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def crop_fraction(img: Image.Image, box: Sequence[float] | None) -> Image.Image:
    """The region ``box`` = (left, top, right, bottom) of ``img`` given as fractions 0-1 of its size
    (checked by :func:`studio.media.captions.check_crop`); None: the whole picture. At least 1 px."""
    if not box:
        return img
    w, h = img.size
    left, top = min(int(round(box[0] * w)), w - 1), min(int(round(box[1] * h)), h - 1)
    right, bottom = max(int(round(box[2] * w)), left + 1), max(int(round(box[3] * h)), top + 1)
    return img.crop((left, top, right, bottom))


def make_thumbnail(img: Image.Image, max_side: int = 256) -> Image.Image:
    """Return a copy scaled down (never up) to at most ``max_side`` on the long side."""
    thumb = img.copy()
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return thumb


def validate_name(name: str) -> str:
    """Check a template name and return it cleaned (stripped, NFC-normalised).

    Rejects empty names, names over 80 characters, ``/``, ``\\``, control characters
    and names starting with ``.`` (including ``.`` and ``..``).
    """
    cleaned = unicodedata.normalize("NFC", (name or "").strip())
    if not cleaned:
        raise InputError("The template name is empty.")
    if len(cleaned) > MAX_NAME_CHARS:
        raise InputError(f"The template name is too long ({len(cleaned)} characters; the limit is {MAX_NAME_CHARS}).")
    if "/" in cleaned or "\\" in cleaned:
        raise InputError(f"The template name {cleaned!r} cannot contain '/' or '\\'.")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in cleaned):
        raise InputError(f"The template name {cleaned!r} cannot contain control characters.")
    if cleaned.startswith("."):
        raise InputError(f"The template name {cleaned!r} cannot start with '.'.")
    return cleaned


_TRANSLITERATE = str.maketrans(dict(zip("ßæøœđłþ", ("ss", "ae", "o", "oe", "d", "l", "th"), strict=True)))
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def slugify(name: str) -> str:
    """Make a filesystem-safe lowercase id (``[a-z0-9-]``, at most 60 chars) from a name.

    Accented letters are transliterated (``ü`` -> ``u``), other scripts dropped;
    never empty (falls back to ``"template"``).
    """
    text = (name or "").lower().translate(_TRANSLITERATE)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    slug = slug[:MAX_SLUG_CHARS].rstrip("-")
    if slug in _WINDOWS_RESERVED:
        slug = f"{slug}-template"
    return slug or "template"


def validate_prompt(text: str, what: str = "style prompt", max_chars: int = 500) -> str:
    """Strip a prompt and reject it if empty or longer than ``max_chars``."""
    cleaned = (text or "").strip()
    if not cleaned:
        hint = ": describe the style, e.g. 'watercolor painting'"
        hint = hint if "style" in what else ""
        raise InputError(f"The {what} is empty{hint}.")
    if len(cleaned) > max_chars:
        raise InputError(f"The {what} is too long ({len(cleaned)} characters; the limit is {max_chars}).")
    return cleaned
