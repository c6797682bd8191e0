"""Comic page layout and meme captions (pure Pillow)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.errors import InputError
from studio.media import compose


def flat(color, size=(256, 256)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_bundled_fonts_and_licence_are_there():
    assert compose.MEME_FONT.is_file() and compose.CAPTION_FONT.is_file()
    assert "SIL OPEN FONT LICENSE" in (compose.FONTS_DIR / "OFL.txt").read_text()


@pytest.mark.parametrize("n,layout,grid", [(2, "auto", (1, 2)), (4, "auto", (2, 2)), (5, "auto", (2, 3)),
                                           (6, "3x2", (3, 2)), (4, "1x4", (1, 4))])
def test_grid_size_gutters_and_borders(n, layout, grid):
    page = compose.compose_panels([flat((200, 0, 0))] * n, layout, gutter=10, border=3)
    rows, cols = grid
    cell = 256 + 2 * 3
    assert page.size == (cols * cell + (cols + 1) * 10, rows * cell + (rows + 1) * 10)
    px = page.load()
    assert px[0, 0] == (255, 255, 255)  # gutter
    assert px[10, 10] == (0, 0, 0)  # border
    assert px[10 + 3 + 5, 10 + 3 + 5] == (200, 0, 0)  # panel


def test_panels_of_other_sizes_are_fitted_and_captions_drawn():
    page = compose.compose_panels([flat((0, 0, 200), (384, 288)), flat((0, 200, 0), (50, 80))], "1x2",
                                  captions=["Monday.", ""], gutter=8, border=2)
    no_caption = compose.compose_panels([flat((0, 0, 200), (384, 288))] * 2, "1x2", gutter=8, border=2)
    assert page.height > no_caption.height  # a caption strip
    strip = np.asarray(page)[8 + 2 + 288 + 2:, 8 + 2:8 + 2 + 384]
    assert (strip < 100).any()  # dark text in the strip


def test_bad_layouts_and_counts():
    with pytest.raises(InputError, match="room for 4"):
        compose.compose_panels([flat(0)] * 5, "2x2")
    with pytest.raises(InputError, match="unknown layout"):
        compose.parse_layout("big", 3)
    with pytest.raises(InputError, match="2-6 panels"):
        compose.parse_layout("auto", 7)
    with pytest.raises(InputError, match="one caption per panel"):
        compose.compose_panels([flat(0)] * 2, captions=["a"])


def test_meme_is_white_with_a_black_outline_and_fits():
    img = flat((120, 120, 120), (512, 512))
    out = compose.meme(img, "top text here", "and a much longer bottom caption that has to wrap onto lines")
    arr = np.asarray(out)
    assert out.size == img.size and img.getpixel((0, 0)) == (120, 120, 120)  # input untouched
    top, middle = arr[:140], arr[220:300]
    assert ((top == 255).all(axis=2)).sum() > 400 and ((top == 0).all(axis=2)).sum() > 200
    assert (middle == 120).all()  # nothing drawn in the middle
    assert ((arr[-160:] == 255).all(axis=2)).sum() > 400


def test_small_images_are_enlarged_so_text_stays_legible():
    assert compose.meme(flat(0, (64, 48)), "hi").size == (683, 512)
    page = compose.compose_panels([flat(0, (64, 64))] * 2, "1x2", gutter=0, border=0)
    assert page.size == (512, 256)


def test_long_words_wrap_and_text_shrinks():
    font_path = str(compose.MEME_FONT)
    font, lines = compose.fit_text("A" * 200, font_path, 100, 40, max_size=60)
    assert all(font.getlength(line) <= 100 for line in lines)


def test_non_latin_text_uses_a_covering_font_or_says_why(monkeypatch):
    assert compose.missing_chars(compose.MEME_FONT, "HELLO") == []
    cyr = compose.font_for("ПРИВЕТ")
    assert not compose.missing_chars(cyr, "ПРИВЕТ")
    compose.font_for.cache_clear()
    monkeypatch.setattr(compose, "_fc_candidates", lambda chars: [])
    monkeypatch.setattr(compose, "_scan_candidates", lambda: [])
    with pytest.raises(InputError, match="no font on this machine can draw"):
        compose.font_for("\u0b95\u0bbe")  # Tamil: not in the bundled font
    compose.font_for.cache_clear()


def test_reference_aspect_keeps_the_shape():
    w, h = compose.reference_aspect((1200, 400), 512)
    assert w % 16 == 0 and h % 16 == 0 and abs(w / h - 3) < 0.2 and abs(w * h - 512**2) < 0.1 * 512**2
