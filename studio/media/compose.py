"""Composing generated images: comic pages (panel grids) and classic meme captions.

Pure Pillow, no model: the worker generates the panels, this module lays them out.

- :func:`compose_panels` puts 2-6 panels in a grid with gutters, borders and optional caption
  strips under each panel (Comic Neue, bundled).
- :func:`meme` writes top/bottom captions the classic way: upper case, white with a black
  outline, as large as fits, wrapped to the image width (Bebas Neue, bundled).

Both fonts are SIL OFL 1.1 and live in ``assets/fonts/`` with their licence. Text the bundled
font cannot draw (CJK, Arabic, ...) is drawn with a system font that covers it (fontconfig,
else a scan of the usual font folders); if none does, :class:`InputError` says which
characters are missing and how to add a font.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from studio.checks import shown, strict_int
from studio.errors import InputError

FONTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "fonts"
MEME_FONT = FONTS_DIR / "BebasNeue-Regular.otf"
CAPTION_FONT = FONTS_DIR / "ComicNeue-Bold.otf"
FONT_FOLDERS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
                "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")
MIN_PANELS, MAX_PANELS = 1, 6
MAX_CAPTION_CHARS = 300
MAX_GUTTER, MAX_BORDER = 200, 50  # px
# Layouts offered in the UI, as "rows x columns"; any "RxC" with R*C >= panels is accepted.
LAYOUTS = ("auto", "1x2", "2x1", "1x3", "3x1", "2x2", "1x4", "4x1", "2x3", "3x2", "1x5", "1x6", "6x1")
MIN_MEME_SIDE = 512  # smaller images (the tiny demo model's 64 px) are enlarged first so text stays crisp
MIN_PANEL_SIDE = 256
_AUTO = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2), 5: (2, 3), 6: (2, 3)}
Color = tuple[int, int, int]


# --------------------------------------------------------------------------- fonts

@functools.lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=4096)
def _covers(path: str, char: str) -> bool:
    """Whether the font at ``path`` has a real glyph for ``char`` (not its "missing" box)."""
    if char.isspace() or not char.isprintable():
        return True
    font = _font(path, 48)
    try:
        mask = font.getmask(char)
        missing = font.getmask("\U0010fffd")  # a private-use code point no font draws
    except (OSError, ValueError):
        return False
    return not (mask.size == missing.size and bytes(mask) == bytes(missing))


def missing_chars(font_path: str | Path, text: str) -> list[str]:
    """The distinct characters of ``text`` the font cannot draw, in order of appearance."""
    return [c for c in dict.fromkeys(text) if not _covers(str(font_path), c)]


def _fc_candidates(chars: Sequence[str]) -> list[str]:
    """Font files fontconfig says cover every character (empty if fontconfig is missing)."""
    exe = shutil.which("fc-list")
    if not exe or not chars:
        return []
    charset = " ".join(f"{ord(c):x}" for c in chars)
    try:
        out = subprocess.run([exe, f":charset={charset}", "file"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    files = [line.split(":")[0].strip() for line in out.splitlines() if line.strip()]
    # Prefer bold/black faces (captions), then sans over serif, then a stable order.
    def rank(path: str) -> tuple:
        name = Path(path).name.lower()
        return (not any(w in name for w in ("bold", "black", "heavy")), "serif" in name and "sans" not in name,
                "mono" in name, name)

    return sorted((f for f in files if f.lower().endswith((".ttf", ".otf", ".ttc"))), key=rank)


def _scan_candidates() -> list[str]:
    found: list[str] = []
    for folder in FONT_FOLDERS:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for dirpath, _, files in os.walk(root):
            found += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith((".ttf", ".otf"))]
            if len(found) > 400:  # enough to look at; a font collection can be huge
                return found
    return found


@functools.lru_cache(maxsize=256)
def font_for(text: str, preferred: str | Path = MEME_FONT) -> str:
    """A font file that can draw every character of ``text``: the preferred one if it can,
    else a system font that covers it. InputError (naming the characters) if none does."""
    preferred = str(preferred)
    missing = missing_chars(preferred, text)
    if not missing:
        return preferred
    for candidate in _fc_candidates(missing) + _scan_candidates():
        try:
            if not missing_chars(candidate, "".join(missing)):
                return candidate
        except OSError:
            continue
    shown = "".join(missing[:12])
    raise InputError(f"no font on this machine can draw {shown!r}: install a font that covers this script "
                     "(e.g. `apt-get install fonts-noto-cjk` for Chinese/Japanese/Korean, "
                     "`fonts-noto-core` for most others) and try again")


# --------------------------------------------------------------------------- text layout

def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words wider than a line are broken by character
    (also the way scripts without spaces, such as Chinese, wrap)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
                line = ""
            for char in word:  # word alone too wide: break it
                if line and font.getlength(line + char) > max_width:
                    lines.append(line)
                    line = ""
                line += char
        if line or not lines:
            lines.append(line)
    return lines


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def fit_text(text: str, font_path: str, max_width: float, max_height: float, max_size: int,
             min_size: int = 8, spacing: float = 1.0) -> tuple[ImageFont.FreeTypeFont, list[str]]:
    """The largest font size (<= ``max_size``) whose wrapped text fits the box; the smallest
    size wrapped regardless when nothing fits (long text on a small image still shows)."""
    lo, hi = min_size, max(min_size, max_size)
    best = None
    while lo <= hi:  # binary search: taller text never fits in less room
        size = (lo + hi) // 2
        font = _font(font_path, size)
        lines = wrap_text(text, font, max_width)
        height = len(lines) * _line_height(font) * spacing
        widest = max(font.getlength(line) for line in lines)
        if height <= max_height and widest <= max_width:
            best = (font, lines)
            lo = size + 1
        else:
            hi = size - 1
    if best is None:
        font = _font(font_path, min_size)
        best = (font, wrap_text(text, font, max_width))
    return best


def check_caption(text: str | None, what: str) -> str:
    """A caption cleaned for drawing; InputError if it is not a text or is too long. Front ends call it
    before queueing any generation, so a bad caption never costs a GPU run."""
    if not isinstance(text, str | None):
        raise InputError(f"the {what} must be a text (got {shown(text)})")
    text = " ".join((text or "").replace("\r", "").split(" ")).strip()
    if len(text) > MAX_CAPTION_CHARS:
        raise InputError(f"the {what} is too long ({len(text)} characters; the limit is {MAX_CAPTION_CHARS})")
    return text


def check_frame(gutter: object = 16, border: object = 4) -> tuple[int, int]:
    """A comic page's gutter (0-200 px) and panel border (0-50 px) as ints; checked before panels are made."""
    return (strict_int(gutter, "gutter (px)", 0, MAX_GUTTER), strict_int(border, "border (px)", 0, MAX_BORDER))


# --------------------------------------------------------------------------- memes

def meme(image: Image.Image, top: str | None = "", bottom: str | None = "", *, uppercase: bool = True,
         font_path: str | Path | None = None) -> Image.Image:
    """Classic meme captions: white text with a black outline, top and bottom, auto-sized and wrapped.

    Each caption gets at most about a quarter of the image height and the full width minus a
    margin; the font shrinks until the wrapped text fits. Returns a new RGB image.
    """
    top, bottom = check_caption(top, "top caption"), check_caption(bottom, "bottom caption")
    out = _at_least(image.convert("RGB"), MIN_MEME_SIDE)
    if not top and not bottom:
        return out
    if uppercase:
        top, bottom = top.upper(), bottom.upper()
    width, height = out.size
    margin = max(2, round(width * 0.04))
    box_w, box_h = width - 2 * margin, height * 0.26
    draw = ImageDraw.Draw(out)
    for text, at_top in ((top, True), (bottom, False)):
        if not text:
            continue
        path = font_for(text, font_path or MEME_FONT)
        font, lines = fit_text(text, path, box_w, box_h, max_size=max(10, height // 6), min_size=8)
        stroke = max(1, round(font.size / 14))
        line_h = _line_height(font)
        block_h = line_h * len(lines)
        y = margin if at_top else height - margin - block_h
        for line in lines:
            x = (width - font.getlength(line)) / 2
            draw.text((x, y), line, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0))
            y += line_h
    return out


# --------------------------------------------------------------------------- comic pages

def parse_layout(layout: str | None, n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels: ``"auto"`` or ``"RxC"`` with room for every panel."""
    if not MIN_PANELS <= n <= MAX_PANELS:
        raise InputError(f"a comic page has {MIN_PANELS + 1}-{MAX_PANELS} panels (got {n})"
                         if n > MAX_PANELS else "a comic page needs at least one panel")
    if not layout or layout == "auto":
        return _AUTO[n]
    match = re.fullmatch(r"\s*(\d)\s*[x×]\s*(\d)\s*", str(layout))
    if not match:
        raise InputError(f"unknown layout {layout!r}: use 'auto' or rows x columns such as '2x2'")
    rows, cols = int(match[1]), int(match[2])
    if rows < 1 or cols < 1 or rows * cols < n:
        raise InputError(f"layout {layout} has room for {rows * cols} panels, not {n}")
    if (rows - 1) * cols >= n or rows * (cols - 1) >= n:
        raise InputError(f"layout {layout} leaves a whole row or column empty for {n} panels")
    return rows, cols


def _at_least(img: Image.Image, side: int) -> Image.Image:
    """A copy enlarged (never shrunk) so its short side is at least ``side`` pixels."""
    short = min(img.size)
    if short >= side:
        return img.copy()
    scale = side / short
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale and centre-crop to exactly ``size`` (panels generated at other sizes still line up)."""
    img = img.convert("RGB")
    return img if img.size == size else ImageOps.fit(img, size, Image.Resampling.LANCZOS)


def compose_panels(images: Sequence[Image.Image], layout: str | None = "auto", *, gutter: int = 16,
                   border: int = 4, captions: Sequence[str | None] | None = None,
                   background: Color = (255, 255, 255), border_color: Color = (0, 0, 0),
                   font_path: str | Path | None = None) -> Image.Image:
    """Lay panels out on a comic page.

    All panels take the first panel's size (enlarged to at least 256 px so captions stay
    legible). ``gutter`` is the white space between panels and
    around the page, ``border`` the black frame of each panel (0 for none). ``captions`` (one
    per panel, blank for none) are set in a strip under the panel, inside its frame; every
    strip on the page has the same height so rows line up. An incomplete last row is centred.
    """
    n = len(images)
    rows, cols = parse_layout(layout, n)
    gutter, border = check_frame(gutter, border)
    captions = [check_caption(c, "panel caption") for c in (captions or [])]
    if captions and len(captions) != n:
        raise InputError(f"give one caption per panel ({n}), or none")
    first = _at_least(images[0], MIN_PANEL_SIDE)
    pw, ph = first.size
    panels = [_cover(img, (pw, ph)) for img in images]

    strip_h, fonts = 0, []
    if any(captions):
        pad = max(4, pw // 40)
        size = max(10, pw // 16)
        for text in captions:
            if not text:
                fonts.append(None)
                continue
            path = font_for(text, font_path or CAPTION_FONT)
            font, lines = fit_text(text, path, pw - 2 * pad, ph * 0.3, max_size=size, min_size=8)
            fonts.append((font, lines))
            strip_h = max(strip_h, len(lines) * _line_height(font) + 2 * pad)

    cell_w = pw + 2 * border
    cell_h = ph + 2 * border + (strip_h + (border if strip_h else 0))
    page = Image.new("RGB", (cols * cell_w + (cols + 1) * gutter, rows * cell_h + (rows + 1) * gutter), background)
    draw = ImageDraw.Draw(page)
    for i, panel in enumerate(panels):
        row, col = divmod(i, cols)
        in_row = min(cols, n - row * cols)
        offset = (cols - in_row) * (cell_w + gutter) / 2  # centre an incomplete last row
        x = round(gutter + col * (cell_w + gutter) + offset)
        y = gutter + row * (cell_h + gutter)
        if border:
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=border_color)
            if strip_h:
                draw.rectangle([x + border, y + 2 * border + ph, x + cell_w - border - 1,
                                y + cell_h - border - 1], fill=background)
        elif strip_h:
            draw.rectangle([x, y + ph, x + cell_w - 1, y + cell_h - 1], fill=background)
        page.paste(panel, (x + border, y + border))
        if strip_h and fonts[i]:
            font, lines = fonts[i]
            line_h = _line_height(font)
            top = y + 2 * border + ph if border else y + ph
            ty = top + (strip_h - len(lines) * line_h) / 2
            for line in lines:
                tx = x + (cell_w - font.getlength(line)) / 2
                draw.text((tx, ty), line, font=font, fill=(20, 20, 20))
                ty += line_h
    return page


def reference_aspect(size: tuple[int, int], resolution: int, multiple: int = 16) -> tuple[int, int]:
    """A generation size with the aspect ratio of ``size`` and about ``resolution**2`` pixels
    (for single-shot multi-panel pages at the reference's shape)."""
    w, h = size
    scale = math.sqrt(resolution * resolution / (w * h))
    width = max(multiple, round(w * scale / multiple) * multiple)
    height = max(multiple, round(h * scale / multiple) * multiple)
    return width, height


def name_card(name: str, note: str, size: int = 384) -> Image.Image:
    """A plain card with a template's name and a short note: the gallery tile of a template that has
    no picture (a LoRA imported without previews), so it can still be found and picked."""
    img = Image.new("RGB", (size, size), (236, 232, 224))
    draw = ImageDraw.Draw(img)
    draw.rectangle([6, 6, size - 7, size - 7], outline=(150, 140, 125), width=3)
    margin = size // 10
    path = font_for(name, CAPTION_FONT)
    largest = size // 7
    longest = max(name.split() or [name], key=len)
    while largest > 12 and _font(path, largest).getlength(longest) > size - 2 * margin:
        largest -= 2  # words are not broken while a smaller size keeps them whole
    font, lines = fit_text(name, path, size - 2 * margin, size * 0.5, max_size=largest)
    y = size * 0.34 - len(lines) * _line_height(font) / 2  # the gallery captions cover the bottom fifth
    for line in lines:
        draw.text(((size - font.getlength(line)) / 2, y), line, font=font, fill=(40, 36, 32))
        y += _line_height(font)
    small = _font(str(CAPTION_FONT), max(10, size // 20))
    for i, line in enumerate(wrap_text(note, small, size - 2 * margin)):
        draw.text(((size - small.getlength(line)) / 2, size * 0.58 + i * _line_height(small)), line,
                  font=small, fill=(110, 100, 90))
    return img
