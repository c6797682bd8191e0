"""The command line: the README's demo run end to end, and every bad input answered in one line."""

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.cli import main

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture()
def torch_state() -> Iterator[None]:
    """Give later tests in this process back what an in-process training changes: the thread count
    (the tiny backbone sets one thread) and the global RNG (the LoRA init seeds it)."""
    import torch

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    path = tmp_path / "store"
    path.mkdir()
    return path


def png(path: Path, color=(200, 40, 40), size=(48, 40), mode="RGB") -> Path:
    Image.new(mode, size, color if mode == "RGB" else None).save(path)
    return path


def bomb(path: Path) -> Path:
    """A real 1x1 PNG whose header claims 40000 x 40000 pixels."""
    png(path, size=(1, 1))
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", 40000, 40000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    good = str(png(tmp / "good.png"))
    text = tmp / "notes.png"
    text.write_text("not an image")
    truncated = tmp / "cut.png"
    png(truncated, size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    base = ["--style", "watercolor painting", "--name", "ok", "--backbone", "tiny"]
    return {
        "missing file": (["--images", str(tmp / "nope.png"), *base], "nope.png"),
        "not an image": (["--images", str(text), *base], "notes.png"),
        "truncated": (["--images", str(truncated), *base], "cut.png"),
        "bomb": (["--images", str(bomb(tmp / "bomb.png")), *base], "bomb.png"),
        "zero images": (["--images", *base], "at least one"),
        "unknown backbone": (["--images", good, "--style", "ink", "--backbone", "nonsense-model"], "backbone"),
        "empty style": (["--images", good, "--style", "   ", "--backbone", "tiny"], "style prompt"),
        "slash name": (["--images", good, "--style", "ink", "--name", "a/b", "--backbone", "tiny"], "name"),
        "dotdot name": (["--images", good, "--style", "ink", "--name", "..", "--backbone", "tiny"], "name"),
        "bad rank": (["--images", good, "--style", "ink", "--rank", "0", "--backbone", "tiny"], "rank"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "not an image", "truncated", "bomb", "zero images", "unknown backbone",
    "empty style", "slash name", "dotdot name", "bad rank"])
def test_bad_train_input_is_one_line_and_changes_nothing(case, store, tmp_path, capsys):
    argv, needle = bad_cases(tmp_path)[case]
    before = snapshot(store)
    code = main(["--store", str(store), "train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle.lower() in err.lower()
    assert "Traceback" not in err
    assert snapshot(store) == before
    assert not (tmp_path / "runs").exists()  # nothing was started


def odd_images(tmp: Path) -> list[Path]:
    """CMYK, 16-bit, palette, alpha, animated, EXIF-rotated: all accepted."""
    files = []
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(tmp / "cmyk.jpg")
    Image.fromarray((np.ones((30, 40)) * 30000).astype(np.uint16)).save(tmp / "grey16.png")
    Image.new("P", (40, 30), 3).save(tmp / "palette.png")
    Image.new("RGBA", (40, 30), (10, 200, 10, 100)).save(tmp / "alpha.png")
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (90, 90, 200)).save(tmp / "rotated.jpg", exif=exif)
    for name in ("cmyk.jpg", "grey16.png", "palette.png", "alpha.png", "anim.gif", "rotated.jpg"):
        files.append(tmp / name)
    return files


def test_odd_formats_train_and_list(store, tmp_path, capsys, torch_state):
    files = odd_images(tmp_path)
    code = main(["--store", str(store), "train", "--images", *map(str, files), "--style", "odd formats",
                 "--name", "Odd", "--backbone", "tiny", "--steps", "3", "--preview-every", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    folder = Path(out[-1])
    assert folder.parent == store and (folder / "lora.safetensors").is_file()
    refs = sorted((folder / "references").glob("*.png"))
    assert len(refs) == len(files)
    assert all(Image.open(r).mode == "RGB" and Image.open(r).width % 16 == 0 for r in refs)
    rotated = Image.open(refs[-1])
    assert rotated.height > rotated.width  # EXIF orientation 6 applied
    assert main(["--store", str(store), "templates", "list"]) == 0
    assert "Odd\todd formats\ttiny" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_demo_command_end_to_end(tmp_path, monkeypatch, capfd, torch_state):
    """The README's command, as a user runs it: paper recipe, visible progress, last line = folder.

    In this process (`python -m studio` is `sys.exit(main())`; tests/test_architecture.py starts it for real):
    a second interpreter would only add its imports, ~10 CPU-seconds.
    """
    monkeypatch.setenv("STUDIO_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)  # where a user runs it from
    code = main(["train", "--backbone", "tiny", "--images", str(ROOT / "assets" / "examples" / "watercolor.png"),
                 "--style", "watercolor painting", "--name", "demo"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    folder = Path(out.strip().splitlines()[-1])
    assert folder == tmp_path / "store" / "demo"
    assert (folder / "lora.safetensors").is_file() and (folder / "template.json").is_file()
    assert "300/300" in err and "loss" in err  # tqdm progress was shown

    gen = tmp_path / "gen"
    code = main(["generate", "--template", "demo", "--prompt", "a wood cabin", "--out", str(gen), "--steps", "6",
                 "-n", "2"])
    err = capfd.readouterr().err
    assert code == 0, err[-2000:]
    images = sorted(gen.glob("*.png"))
    assert len(images) == 2
    params = Image.open(images[0]).text
    assert "a wood cabin in watercolor painting style" in params["parameters"]
    assert '"seed": 0' in params["studio"]


def test_generate_bad_input(store, capsys):
    assert main(["--store", str(store), "generate", "--template", "missing", "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--store", str(store), "generate", "--prompt", "  "]) == 2
    assert "prompt" in capsys.readouterr().err
