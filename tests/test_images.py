"""Tests for studio.media.images: every file is generated in a tmp dir (no binary fixtures)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from studio.errors import InputError
from studio.media import images
from studio.media.images import (
    MAX_REFERENCE_IMAGES,
    fit_to_budget,
    load_image,
    load_reference_images,
    make_thumbnail,
    slugify,
    validate_name,
    validate_prompt,
)

# --------------------------------------------------------------------------- helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_16bit_rgb(path: Path, rgb: np.ndarray) -> None:
    """Write a 16-bit RGB PNG by hand (Pillow cannot write 48-bit RGB)."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    )


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A tiny real PNG whose IHDR is patched to declare width x height."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rgb(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return tuple(img.getpixel(xy))


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 2) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------- bad input files


def _make_text_as_png(p: Path) -> str:
    p = p / "notes.png"
    p.write_text("these are my notes, not a picture\n")
    return p.name


def _make_empty(p: Path) -> str:
    (p / "empty.jpg").write_bytes(b"")
    return "empty.jpg"


def _make_truncated_png(p: Path) -> str:
    _noise(64, 64).save(p / "cut.png")
    _truncate(p / "cut.png")
    return "cut.png"


def _make_truncated_jpeg(p: Path) -> str:
    _noise(64, 64).save(p / "cut.jpg", quality=95)
    _truncate(p / "cut.jpg")
    return "cut.jpg"


def _make_garbage_after_png_signature(p: Path) -> str:
    (p / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return "garbage.png"


def _make_bomb_huge(p: Path) -> str:  # beyond Pillow's own hard limit
    _png_claiming_size(p / "bomb.png", 40000, 40000)
    return "bomb.png"


def _make_bomb_over_pil_warning(p: Path) -> str:  # Pillow would only warn
    _png_claiming_size(p / "warn.png", 10000, 10000)
    return "warn.png"


def _make_bomb_over_our_limit(p: Path) -> str:  # under Pillow's limits, over ours
    _png_claiming_size(p / "big.png", 9000, 9000)
    return "big.png"


def _make_missing(p: Path) -> str:
    return "missing.png"


def _make_folder(p: Path) -> str:
    (p / "folder.png").mkdir()
    return "folder.png"


def _make_percent_name_bomb(p: Path) -> str:
    _png_claiming_size(p / "100%s %d.png", 9000, 9000)
    return "100%s %d.png"


def _make_fifo(p: Path) -> str:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(p / "pipe.png")
    return "pipe.png"


BAD_FILES = {
    "text named .png": (_make_text_as_png, "not a supported image"),
    "empty file": (_make_empty, "empty"),
    "truncated PNG": (_make_truncated_png, "truncated or corrupt"),
    "truncated JPEG": (_make_truncated_jpeg, "truncated or corrupt"),
    "garbage after PNG signature": (_make_garbage_after_png_signature, ""),
    "40000x40000 bomb": (_make_bomb_huge, "too large (1600 megapixels"),
    "10000x10000 (Pillow warns)": (_make_bomb_over_pil_warning, "(100 megapixels"),
    "9000x9000 (our limit)": (_make_bomb_over_our_limit, "9000x9000 pixels"),
    "missing path": (_make_missing, "does not exist"),
    "folder": (_make_folder, "folder"),
    "FIFO": (_make_fifo, "not a regular file"),
    "'%' in the name": (_make_percent_name_bomb, "too large"),
}


@pytest.mark.parametrize("case", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_raise_input_error_naming_the_file(tmp_path: Path, case) -> None:
    make, expected = case
    name = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_image(tmp_path / name)
    message = str(info.value)
    assert f"'{name}'" in message
    assert expected in message
    assert "\n" not in message
    assert str(tmp_path) not in message  # basename only, no server paths


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF"])
def test_mutated_files_only_ever_raise_input_error(tmp_path: Path, fmt: str) -> None:
    """A tiny fuzz: random byte edits must give an image or an InputError."""
    path = tmp_path / f"fuzz.{fmt.lower()}"
    _noise(24, 16).save(path, fmt)
    original = path.read_bytes()
    rng = np.random.default_rng(42)
    for _ in range(40):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 6)):
            data[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(data[: rng.integers(len(data) // 2, len(data) + 1)]))
        try:
            assert load_image(path).mode == "RGB"
        except InputError as exc:
            assert path.name in str(exc)


def test_bomb_message_states_limit(tmp_path: Path) -> None:
    name = _make_bomb_over_our_limit(tmp_path)
    with pytest.raises(InputError, match="the limit is 64 megapixels"):
        load_image(tmp_path / name)


def test_file_over_upload_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(images, "MAX_UPLOAD_BYTES", 1000)
    _noise(64, 64).save(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"'big\.png' is larger than"):
        load_image(tmp_path / "big.png")


def test_accepts_str_paths_and_detaches_from_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (10, 6), (1, 2, 3)).save(path)
    img = load_image(str(path))
    path.unlink()
    assert img.size == (10, 6)
    assert _rgb(img) == (1, 2, 3)
    assert "icc_profile" not in img.info


# ------------------------------------------------------------------- normalisation


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    img = load_image(tmp_path / "cmyk.jpg")
    assert _close(_rgb(img), (255, 255, 255), tol=3)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(arr).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode.startswith("I")
    img = load_image(tmp_path / "grey16.png")
    assert [_rgb(img, (x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]


def test_32bit_float_tiff_is_scaled(tmp_path: Path) -> None:
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(arr).save(tmp_path / "float.tiff")
    img = load_image(tmp_path / "float.tiff")
    assert [_rgb(img, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_16bit_rgb_png(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), dtype=np.uint16)
    rgb[...] = (32896, 16448, 65535)  # 128, 64, 255 in 8-bit
    _png_16bit_rgb(tmp_path / "rgb16.png", rgb)
    img = load_image(tmp_path / "rgb16.png")
    assert img.size == (5, 4)
    assert _close(_rgb(img, (4, 3)), (128, 64, 255), tol=1)


def test_palette_png_with_transparency_goes_over_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "pal.png", transparency=0)
    out = load_image(tmp_path / "pal.png")
    assert _rgb(out, (0, 0)) == (255, 255, 255)  # transparent black -> white
    assert _rgb(out, (1, 1)) == (255, 0, 0)


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((2, 2), (0, 0, 255, 255))
    img.putpixel((3, 3), (0, 0, 0, 128))
    img.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert _rgb(out, (0, 0)) == (255, 255, 255)
    assert _rgb(out, (2, 2)) == (0, 0, 255)
    assert _close(_rgb(out, (3, 3)), (127, 127, 127))


def test_la_image(tmp_path: Path) -> None:
    img = Image.new("LA", (4, 4), (50, 255))
    img.putpixel((0, 0), (0, 0))
    img.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert _rgb(out, (0, 0)) == (255, 255, 255)
    assert _rgb(out, (1, 1)) == (50, 50, 50)


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grey(tmp_path: Path, mode: str) -> None:
    Image.new(mode, (3, 3), 255).save(tmp_path / f"{mode}.png")
    assert _rgb(load_image(tmp_path / f"{mode}.png")) == (255, 255, 255)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "anim.gif") as raw:
        assert raw.n_frames == 2
    assert _rgb(load_image(tmp_path / "anim.gif")) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_embedded_srgb_profile_keeps_colours(tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (200, 100, 50)).save(tmp_path / "icc.png", icc_profile=icc)
    assert _close(_rgb(load_image(tmp_path / "icc.png")), (200, 100, 50))


# ------------------------------------------------------------- reference image sets


def test_reference_images_count_limits(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Add at least one reference image"):
        load_reference_images([])
    too_many = [tmp_path / f"{i}.png" for i in range(MAX_REFERENCE_IMAGES + 1)]
    with pytest.raises(InputError, match="Too many reference images"):
        load_reference_images(too_many)


def test_reference_images_reports_first_bad_file(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"ok{i}.png")
        paths.append(tmp_path / f"ok{i}.png")
    paths.insert(1, tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("x")
    paths.append(tmp_path / "bad.png")
    with pytest.raises(InputError, match=r"'nope\.png' does not exist"):
        load_reference_images(paths)
    imgs = load_reference_images([p for p in paths if p.name.startswith("ok")])
    assert [i.mode for i in imgs] == ["RGB"] * 3


# ---------------------------------------------------------------------- resizing

SHAPES = [(1000, 1000), (1920, 1080), (1080, 1920), (3000, 1000), (1000, 1)]


@pytest.mark.parametrize("resolution", [512, 1024, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_fit_to_budget(shape: tuple[int, int], resolution: int) -> None:
    out = fit_to_budget(Image.new("RGB", shape, (9, 9, 9)), resolution)
    w, h = out.size
    budget = resolution**2
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
    assert 0.8 * budget <= w * h <= 1.01 * budget
    if resolution >= 512 and min(shape) >= 100:  # photos: aspect kept within ~1%
        assert abs(w / h - shape[0] / shape[1]) <= 0.01 * shape[0] / shape[1]
    assert _rgb(out, (w // 2, h // 2)) == (9, 9, 9)


def test_fit_to_budget_upscales_tiny_image() -> None:
    out = fit_to_budget(Image.new("RGB", (8, 8), (1, 2, 3)), 512)
    assert out.size == (512, 512)


def test_fit_to_budget_crops_rather_than_distorts() -> None:
    # A centred black square must stay square after hitting the multiples of 16.
    img = Image.new("L", (1920, 1080), 255)
    img.paste(0, (690, 270, 1230, 810))
    out = np.asarray(fit_to_budget(img, 512)) < 128
    rows, cols = np.nonzero(out.any(axis=1))[0], np.nonzero(out.any(axis=0))[0]
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1


def test_fit_to_budget_other_multiple() -> None:
    out = fit_to_budget(Image.new("RGB", (1000, 700)), 256, multiple=64)
    assert out.width % 64 == 0 and out.height % 64 == 0


def test_make_thumbnail() -> None:
    assert make_thumbnail(Image.new("RGB", (1000, 500))).size == (256, 128)
    assert make_thumbnail(Image.new("RGB", (500, 1000)), 100).size == (50, 100)
    assert make_thumbnail(Image.new("RGB", (20, 10))).size == (20, 10)  # no upscale


# ------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "../evil",
        "a/b",
        "a\\b",
        ".",
        "..",
        ".hidden",
        "nul\0byte",
        "tab\there",
        "new\nline",
        "x" * 1000,
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(InputError, match="template name"):
        validate_name(name)


def test_validate_name_cleans() -> None:
    assert validate_name(" ok ") == "ok"
    assert validate_name("ünïcödé 水彩") == "ünïcödé 水彩"
    assert validate_name("u\u0308ber") == "\u00fcber"  # NFC
    assert validate_name("x" * 80) == "x" * 80


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("ünïcödé 水彩", "unicode"),
        ("水彩", "template"),
        ("", "template"),
        ("../evil", "evil"),
        ("a/b", "a-b"),
        (" Ok, Fine! ", "ok-fine"),
        ("Straße", "strasse"),
        ("CON", "con-template"),
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_slugify_length_and_charset() -> None:
    slug = slugify("Long name " * 100)
    assert len(slug) <= 60 and not slug.endswith("-")
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_validate_prompt() -> None:
    assert validate_prompt("  watercolor painting \n") == "watercolor painting"
    with pytest.raises(InputError, match="The style prompt is empty: describe"):
        validate_prompt("   ")
    with pytest.raises(InputError, match=r"too long \(1000 characters; the limit is 500"):
        validate_prompt("x" * 1000)
    with pytest.raises(InputError, match="The negative prompt is empty"):
        validate_prompt("", what="negative prompt")
    assert validate_prompt("x" * 1000, max_chars=1000) == "x" * 1000
