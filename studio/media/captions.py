"""Content captions of reference images: checks, style-word stripping, sidecar and caption files.

The paper trains on ``"{content} in {style prompt} style"`` with one content description per
reference (StyleDrop's protocol). A caption must therefore say *what* is in the picture, never
*how* it is drawn: :func:`strip_style_words` removes the style prompt's words (and phrases such as
"a painting of") from an automatic caption, so the style is learnt by the trigger, not by the
caption. Captions come from the user (typed, a ``--captions`` file, kohya / FluxGym ``image.txt``
sidecars) or from the captioner (:mod:`studio.engine.captioner`); the user's always win
(:func:`merge_captions`). Pure Python: no torch, no Pillow.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from studio.errors import InputError

MAX_CAPTION_CHARS = 300  # a content description, well inside CLIP's 77 tokens of words for most captions
MAX_CAPTIONS_FILE_BYTES = 1024 * 1024
MAX_SIDECAR_BYTES = 64 * 1024
# Words that carry no style on their own: kept even when the style prompt uses them ("in", "of", "a").
_GLUE = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "with", "by", "for", "from", "as", "is",
         "are", "its", "it", "this", "that", "very", "some", "into"}
# Medium / framing words a captioner adds that describe the style, not the content.
_MEDIUM = (r"(?:painting|drawing|illustration|sketch|render(?:ing)?|artwork|art|picture|image|photo(?:graph)?|"
           r"print|cartoon|poster|graphic|digital art|clip ?art|style|icon)")
_LEADS = [  # at the start: "The image shows", "A watercolor painting of", "An illustration depicting"
    re.compile(r"^(?:in )?(?:this|the) (?:image|picture|photo|painting|drawing|illustration) "
               r"(?:is|shows|depicts|features|contains|displays)(?: of)?\s+", re.I),
    re.compile(r"^(?:an? |the )?(?:[\w'-]+,? ){0,3}?" + _MEDIUM + r"s? (?:of|depicting|showing|featuring|with)\s+",
               re.I),
]
_TRAILS = re.compile(r"(?:\s*,)?\s+(?:in|with)(?: an?| the)?(?: (?!in\b|with\b)[\w'-]+){0,3}? " + _MEDIUM
                     + r"s?\.?$", re.I)


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", unicodedata.normalize("NFKC", text).casefold())


def style_words(style_prompt: str) -> set[str]:
    """The words of a style prompt that name the style (glue words such as "of" or "a" are left out),
    plus their simple plural / singular forms."""
    found = set()
    for word in _words(style_prompt or ""):
        if word in _GLUE or len(word) < 2:
            continue
        found |= {word, word + "s", word + "es", word[:-1] if word.endswith("s") else word}
    return found | {"style", "styled", "stylized", "stylised"}


def strip_style_words(caption: str, style_prompt: str) -> str:
    """An automatic caption cut down to its content: no words of the style prompt, no "a painting of".

    ``strip_style_words("A watercolor painting of a red fox in the snow", "watercolor painting")``
    gives ``"a red fox in the snow"``, which fits ``"{content} in {style} style"``. Returns "" when
    nothing but style was said.
    """
    text = " ".join(unicodedata.normalize("NFKC", caption or "").split()).strip(" .")
    for _ in range(2):  # "The image shows a painting of a cat": both leads
        for lead in _LEADS:
            text = lead.sub("", text)
    text = _TRAILS.sub("", text)
    banned = style_words(style_prompt)
    kept = [w for w in re.split(r"(\s+)", text) if re.sub(r"[^\w'-]", "", w).casefold() not in banned]
    text = "".join(kept)
    # Tidy what the removals left: doubled spaces, a dangling "in" / "of", empty commas.
    text = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", text))
    text = re.sub(r"(,\s*)+,", ",", text)
    glue = "|".join(sorted(_GLUE))
    text = re.sub(rf"\b(?:{glue})(?:\s+(?:{glue}))*\s*$", "", text.strip(" ,.;:"), flags=re.I)
    text = re.sub(r"^(?:(?:in|with|of|by|and|or|as)\s+)+", "", text.strip(" ,.;:"), flags=re.I)
    text = text.strip(" ,.;:-")
    first = text.split(" ", 1)[0]
    return first.lower() + text[len(first):] if first.lower() in ("a", "an", "the") else text


def check_caption(value: object, what: str = "caption") -> str | None:
    """One caption: a text of at most :data:`MAX_CAPTION_CHARS` on one line (blank means none), else InputError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"each {what} must be a text (or empty for none), not {type(value).__name__}")
    cleaned = " ".join(value.split())
    if not cleaned:
        return None
    if len(cleaned) > MAX_CAPTION_CHARS:
        raise InputError(f"a {what} is too long ({len(cleaned)} characters; the limit is {MAX_CAPTION_CHARS}): "
                         f"describe only what is in the picture")
    return cleaned


def merge_captions(user: Sequence[str | None] | None, auto: Sequence[str | None] | None,
                   n: int) -> list[str | None]:
    """One caption per image: the user's where given (they always win), else the automatic one, else None."""
    user, auto = list(user or []), list(auto or [])
    out = []
    for i in range(n):
        mine = user[i] if i < len(user) else None
        mine = mine.strip() if isinstance(mine, str) else None
        theirs = auto[i] if i < len(auto) else None
        out.append(mine or (theirs.strip() if isinstance(theirs, str) and theirs.strip() else None))
    return out


def read_sidecar(image: str | Path) -> str | None:
    """The kohya / FluxGym caption beside an image (``cat.png`` -> ``cat.txt``), or None when there is none.

    A sidecar that is too big, not UTF-8 or too long as a caption raises InputError naming it.
    """
    path = Path(image).with_suffix(".txt")
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise InputError(f"caption file '{path.name}' is too big for a caption")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"caption file '{path.name}' cannot be read as UTF-8 text ({type(exc).__name__})") from None
    try:
        return check_caption(raw, f"caption in '{path.name}'")
    except InputError as exc:
        raise InputError(str(exc)) from None


def read_captions_file(path: str | Path, images: Sequence[str | Path]) -> list[str | None]:
    """The captions for ``images`` from a ``--captions`` file, one per image, in their order.

    The file is either one JSON object mapping image file names to captions
    (``{"cat.png": "a cat"}``), or one line per image: the caption as plain text, or a JSON object
    ``{"caption": "a cat"}`` (``"file"`` / ``"image"`` may name the image it belongs to). An empty
    line means no caption for that image. Any mismatch raises InputError with a one-line reason.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CAPTIONS_FILE_BYTES:
            raise InputError(f"captions file '{path.name}' is larger than 1 MB")
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"captions file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"captions file '{path.name}' cannot be read as UTF-8 text ({type(exc).__name__})") from None
    names = [Path(p).name for p in images]
    stripped = raw.strip()
    if stripped.startswith("{") and "\n{" not in stripped:
        try:
            mapping = json.loads(stripped)
        except ValueError:
            mapping = None
        if isinstance(mapping, dict):
            return _by_name(mapping, names, path.name)
    lines = raw.splitlines()  # "a\n\n": two lines, the second empty (no caption for the second image)
    while len(lines) > len(names) and not lines[-1].strip():
        lines.pop()  # blank lines after the last image's
    named: dict[str, object] = {}
    plain: list[object] = []
    for number, line in enumerate(lines, 1):
        entry: object = line
        if line.lstrip().startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                raise InputError(f"{path.name}, line {number}: not valid JSON") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("caption", ""), str | None):
                raise InputError(f"{path.name}, line {number}: give {{\"caption\": \"...\"}} (and optionally \"file\")")
            target = entry.get("file") or entry.get("image")
            if target:
                named[Path(str(target)).name] = entry.get("caption")
                continue
            entry = entry.get("caption")
        plain.append(entry)
    if named and plain:
        raise InputError(f"{path.name}: name the image on every line or on none")
    if named:
        return _by_name(named, names, path.name)
    if len(plain) != len(names):
        raise InputError(f"{path.name} has {len(plain)} caption line(s) for {len(names)} image(s); "
                         f"give one line per image (an empty line for none)")
    return [_line_caption(c, path.name, i + 1) for i, c in enumerate(plain)]


def _line_caption(value: object, file: str, number: int) -> str | None:
    try:
        return check_caption(value)
    except InputError as exc:
        raise InputError(f"{file}, line {number}: {exc}") from None


def _by_name(mapping: dict, names: list[str], file: str) -> list[str | None]:
    unknown = sorted(str(k) for k in mapping if Path(str(k)).name not in names)
    if unknown:
        raise InputError(f"{file} names {len(unknown)} image(s) that were not given: {', '.join(unknown[:3])}")
    by_name = {Path(str(k)).name: v for k, v in mapping.items()}
    out = []
    for name in names:
        try:
            out.append(check_caption(by_name.get(name)))
        except InputError as exc:
            raise InputError(f"{file}, {name}: {exc}") from None
    return out


def check_crop(value: object, what: str = "crop") -> tuple[float, float, float, float] | None:
    """A crop box as fractions of the picture ``[left, top, right, bottom]`` (0-1, at least 2% wide and
    high), or None for the whole picture. Bools are not numbers."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise InputError(f"{what} must be [left, top, right, bottom] as fractions 0-1 of the picture, or null")
    left, top, right, bottom = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (left, top, right, bottom)):
        raise InputError(f"{what}: every edge must be between 0 and 1 (a fraction of the picture)")
    if right - left < 0.02 or bottom - top < 0.02:
        raise InputError(f"{what}: the region is empty (right must exceed left and bottom must exceed top)")
    if (left, top, right, bottom) == (0.0, 0.0, 1.0, 1.0):
        return None
    return left, top, right, bottom
