"""A synthetic style set for the tiny backbone (issue 16): ten styles drawn deterministically.

The tiny model works at 64 px through a VAE whose latent is the 4 x 4-pixel average colour, so a
style it can learn must live in palettes and in structures of 8 px or more at 64 px: outline weight,
halftone dots, hatching and stripes of a 2-latent-pixel period, mosaic tiles, pixel blocks, stained
glass cells, glow, blur, tone. Each reference is one content scene (a house, a boat, a vase of
flowers: :data:`SCENES`) drawn as a label map and then rendered by one style (:data:`STYLES`). The
references are drawn at 128 px (training resizes them to 64); style and content prompts use words of
the tiny model's vocabulary.

:func:`write_style_set` writes the folder format :mod:`studio.styles.style_sets` reads
(``<name>/reference.png``, ``style.txt``, ``caption.txt``); ``scripts/make_tiny_styles.py`` is its
command line. Same arguments, same bytes: seeded NumPy, no anti-aliasing, PNGs without metadata.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from studio.errors import InputError

SIZE = 128
_SEED = 1616

# Label roles of a scene, and the natural colour of each.
SKY, GROUND, SUN, BODY, ACCENT, DARK, PLANT = range(7)
NATURAL = np.array([(120, 175, 230), (95, 165, 75), (250, 205, 60), (215, 85, 60), (150, 70, 45),
                    (70, 45, 30), (45, 130, 60)], dtype=np.float64)


# -- content scenes as label maps -----------------------------------------------------------------


def _house(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle((0, 0, s, s), fill=SKY)
    d.polygon([(0, 0.68 * s), (0.3 * s, 0.6 * s), (0.7 * s, 0.66 * s), (s, 0.58 * s), (s, s), (0, s)], fill=GROUND)
    d.ellipse((0.72 * s, 0.08 * s, 0.9 * s, 0.26 * s), fill=SUN)
    d.rectangle((0.18 * s, 0.45 * s, 0.52 * s, 0.78 * s), fill=BODY)
    d.polygon([(0.12 * s, 0.46 * s), (0.35 * s, 0.24 * s), (0.58 * s, 0.46 * s)], fill=ACCENT)
    d.rectangle((0.3 * s, 0.6 * s, 0.4 * s, 0.78 * s), fill=DARK)
    d.rectangle((0.72 * s, 0.55 * s, 0.78 * s, 0.8 * s), fill=DARK)
    d.ellipse((0.6 * s, 0.3 * s, 0.9 * s, 0.6 * s), fill=PLANT)


def _boat(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle((0, 0, s, s), fill=SKY)
    d.rectangle((0, 0.62 * s, s, s), fill=GROUND)
    d.ellipse((0.1 * s, 0.3 * s, 0.3 * s, 0.5 * s), fill=SUN)
    d.ellipse((0.62 * s, 0.54 * s, 1.1 * s, 0.7 * s), fill=PLANT)
    d.polygon([(0.25 * s, 0.66 * s), (0.8 * s, 0.66 * s), (0.7 * s, 0.8 * s), (0.33 * s, 0.8 * s)], fill=BODY)
    d.rectangle((0.5 * s, 0.2 * s, 0.54 * s, 0.66 * s), fill=DARK)
    d.polygon([(0.55 * s, 0.22 * s), (0.78 * s, 0.6 * s), (0.55 * s, 0.6 * s)], fill=ACCENT)


def _vase(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle((0, 0, s, s), fill=SKY)
    d.rectangle((0, 0.72 * s, s, s), fill=GROUND)
    d.ellipse((0.66 * s, 0.58 * s, 0.84 * s, 0.76 * s), fill=SUN)
    d.rectangle((0.44 * s, 0.3 * s, 0.48 * s, 0.5 * s), fill=DARK)
    d.ellipse((0.25 * s, 0.32 * s, 0.45 * s, 0.44 * s), fill=PLANT)
    for cx, cy in ((0.36, 0.2), (0.55, 0.16), (0.46, 0.3)):
        d.ellipse(((cx - 0.09) * s, (cy - 0.09) * s, (cx + 0.09) * s, (cy + 0.09) * s), fill=ACCENT)
    d.polygon([(0.36 * s, 0.48 * s), (0.56 * s, 0.48 * s), (0.62 * s, 0.62 * s), (0.55 * s, 0.78 * s),
               (0.37 * s, 0.78 * s), (0.3 * s, 0.62 * s)], fill=BODY)


SCENES: dict[str, tuple[Callable[[ImageDraw.ImageDraw, int], None], str]] = {
    "house": (_house, "a red house and a tree on green hills under a blue sky"),
    "boat": (_boat, "a boat on the sea with the sun"),
    "vase": (_vase, "red flowers in a vase on a table"),
}


def scene_labels(scene: str, size: int = SIZE) -> np.ndarray:
    """The label map (size x size, uint8 roles) of one of :data:`SCENES`."""
    if scene not in SCENES:
        raise InputError(f"unknown scene {scene!r}; choose from {', '.join(SCENES)}")
    img = Image.new("L", (size, size), 0)
    SCENES[scene][0](ImageDraw.Draw(img), size)
    return np.asarray(img).copy()


# -- helpers ------------------------------------------------------------------------------------


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy: dy + SIZE, dx: dx + SIZE]
    return out


def _outline(labels: np.ndarray, r: int) -> np.ndarray:
    """Region borders, about 2r + 1 pixels wide."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return _dilate(edge, r)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _blur(rgb: np.ndarray, radius: float) -> np.ndarray:
    img = Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)


def _palette(*colours: tuple[int, int, int]) -> np.ndarray:
    return np.array(colours, dtype=np.float64)


# -- the styles: labels (and a seeded generator) -> RGB float array ---------------------------------


def _outline_cartoon(labels, rng):
    pal = _palette((90, 200, 250), (120, 220, 90), (255, 225, 40), (255, 70, 60), (255, 150, 30), (90, 60, 160),
                   (30, 170, 90))
    rgb = pal[labels]
    rgb[_outline(labels, 3)] = (15, 15, 20)
    return rgb


def _pop_dots(labels, rng):
    pal = _palette((0, 160, 230), (0, 200, 120), (255, 230, 0), (230, 20, 120), (255, 90, 0), (40, 20, 120),
                   (0, 140, 80))
    ys, xs = _grid()
    # a dot fills one 8 px cell of every 16 (the 4 x 4 latent cell at 64 px): averaging keeps it
    dot = ((ys % 16 - 3.5) ** 2 + (xs % 16 - 3.5) ** 2) < 4.8**2
    rgb = np.where(dot[..., None], pal[labels], np.array([250.0, 246, 236]))
    rgb[_outline(labels, 1)] = (10, 10, 10)
    return rgb


def _ink_hatching(labels, rng):
    paper, ink = np.array([246.0, 238, 218]), np.array([30.0, 45, 120])
    darkness = np.array([0.0, 0.35, 0.0, 0.5, 0.65, 0.9, 0.6])[labels]  # line width as a fraction of the period
    ys, xs = _grid()
    line = ((xs + ys) % 16) < 16 * darkness
    rgb = np.where(line[..., None], ink, paper)
    rgb[_outline(labels, 1)] = ink
    return rgb


def _neon_night(labels, rng):
    glow_colours = _palette((0, 0, 0), (0, 230, 255), (255, 240, 60), (255, 40, 200), (255, 40, 200),
                            (0, 230, 255), (120, 255, 80))
    rgb = np.zeros((SIZE, SIZE, 3)) + (12, 10, 40)
    lines = _outline(labels, 2)
    # a border takes the colour of the brighter-coded region on either side
    role = np.maximum(labels, np.roll(labels, 3, axis=0))
    rgb[lines] = glow_colours[role][lines]
    return np.maximum(rgb, _blur(rgb, 5) * 1.6)


def _soft_pastel(labels, rng):
    pastel = NATURAL * 0.45 + 255 * 0.55
    return _blur(pastel[labels], 3)


def _green_pixel(labels, rng):
    shades = _palette((15, 56, 15), (48, 98, 48), (139, 172, 15), (155, 188, 15))
    level = np.clip((_luma(NATURAL) / 256 * 4).astype(int), 0, 3)[labels]
    block = level[8::16, 8::16]  # 16 px blocks (8 px at 64): two latent pixels
    return shades[np.kron(block, np.ones((16, 16), int))]


def _mosaic(labels, rng):
    tile, grout = 24, 8  # three latent cells a tile, one of grout: the 4 x 4 averaging keeps both
    centres = labels[tile // 2:: tile, tile // 2:: tile]
    colours = NATURAL[centres] * 1.1 + rng.uniform(-25, 25, size=(*centres.shape, 3))
    rgb = np.kron(colours, np.ones((tile, tile, 1)))
    rgb = np.pad(rgb, ((0, SIZE), (0, SIZE), (0, 0)), mode="edge")[:SIZE, :SIZE]  # tiles cut at the border
    ys, xs = _grid()
    rgb[(ys % tile < grout) | (xs % tile < grout)] = (70, 62, 55)
    return rgb


def _vintage_photo(labels, rng):
    grey = _luma(NATURAL[labels]) / 255
    dark, light = np.array([70.0, 40, 15]), np.array([245.0, 225, 180])
    rgb = dark + (light - dark) * grey[..., None] * 0.9
    ys, xs = _grid()
    r = np.hypot(ys - SIZE / 2, xs - SIZE / 2) / (SIZE / 2)
    return _blur(rgb * np.clip(1.15 - 0.45 * r**2, 0, 1)[..., None], 1.5)


def _stained_glass(labels, rng):
    jewel = _palette((40, 90, 200), (30, 150, 70), (250, 200, 30), (200, 20, 40), (150, 30, 150), (60, 30, 20),
                     (20, 120, 110))
    points = rng.uniform(0, SIZE, size=(40, 2))
    ys, xs = _grid()
    dist = np.hypot(ys[..., None] - points[:, 0], xs[..., None] - points[:, 1])
    order = np.sort(dist, axis=-1)
    nearest = dist.argmin(axis=-1)
    anchor = labels[points[:, 0].astype(int), points[:, 1].astype(int)]
    rgb = jewel[anchor[nearest]] * (0.85 + 0.3 * rng.uniform(size=40)[nearest])[..., None]
    rgb[(order[..., 1] - order[..., 0]) < 3.5] = (20, 20, 20)
    rgb[_outline(labels, 1)] = (20, 20, 20)
    return rgb


def _bold_stripes(labels, rng):
    ys, _ = _grid()
    base = NATURAL[labels]
    dark = (ys % 16) < 8
    return np.where(dark[..., None], base * 0.55, np.minimum(base * 1.15, 255))


@dataclass(frozen=True)
class SyntheticStyle:
    """One style of the set: its folder name, style prompt, scene and renderer."""

    name: str
    prompt: str
    scene: str
    render: Callable[[np.ndarray, np.random.Generator], np.ndarray]


STYLES: tuple[SyntheticStyle, ...] = (
    SyntheticStyle("outline-cartoon", "flat cartoon with bold black outlines", "house", _outline_cartoon),
    SyntheticStyle("pop-dots", "pop art dots", "boat", _pop_dots),
    SyntheticStyle("ink-hatching", "blue ink lines sketch", "vase", _ink_hatching),
    SyntheticStyle("neon-night", "neon glowing lines at night", "house", _neon_night),
    SyntheticStyle("soft-pastel", "soft pastel painting", "boat", _soft_pastel),
    SyntheticStyle("green-pixel", "green retro pixel art", "vase", _green_pixel),
    SyntheticStyle("mosaic", "colorful mosaic", "house", _mosaic),
    SyntheticStyle("vintage-photo", "vintage photo", "boat", _vintage_photo),
    SyntheticStyle("stained-glass", "stained glass", "vase", _stained_glass),
    SyntheticStyle("bold-stripes", "bold stripes pattern", "house", _bold_stripes),
)


def render_style(style: SyntheticStyle, seed: int = _SEED) -> Image.Image:
    """The style's reference image (128 x 128 RGB), the same for the same seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InputError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    rng = np.random.default_rng([seed, STYLES.index(style)])
    rgb = style.render(scene_labels(style.scene), rng)
    return Image.fromarray(np.clip(np.asarray(rgb, dtype=np.float64), 0, 255).round().astype(np.uint8), "RGB")


def write_style_set(folder: str | os.PathLike, seed: int = _SEED) -> list[Path]:
    """Write every style of :data:`STYLES` into ``folder`` (created; existing files of the set are
    replaced) as ``<name>/reference.png``, ``style.txt`` and ``caption.txt``; returns the style folders."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for style in STYLES:
        target = folder / style.name
        target.mkdir(exist_ok=True)
        render_style(style, seed).save(target / "reference.png", format="PNG", optimize=False)
        (target / "style.txt").write_text(style.prompt + "\n", encoding="utf-8")
        (target / "caption.txt").write_text(SCENES[style.scene][1] + "\n", encoding="utf-8")
        written.append(target)
    return written
