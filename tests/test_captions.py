"""Captions of the references (issue 12): style words out of auto captions, the user's captions win,
.txt sidecars / --captions files / dataset zips are read, crops and checks at the door, and the
captioner's worker job (a tiny random-weight Florence-2 built locally) reports progress and stops on cancel."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from studio.errors import InputError
from studio.media.captions import (
    MAX_CAPTION_CHARS,
    check_crop,
    merge_captions,
    read_captions_file,
    read_sidecar,
    strip_style_words,
)


@pytest.mark.parametrize(("raw", "style", "content"), [
    ("A watercolor painting of a red fox in the snow", "watercolor painting", "a red fox in the snow"),
    ("The image shows a cartoon illustration of a cat sitting on a chair.", "flat cartoon illustration",
     "a cat sitting on a chair"),
    ("a woman with a hat, watercolor", "watercolor painting", "a woman with a hat"),
    ("a ukiyo-e woodblock print of a wave", "ukiyo-e woodblock print", "a wave"),
    ("a red fox in the snow in watercolor style", "watercolor painting", "a red fox in the snow"),
    ("a 3d render of a clay duck", "3d render, soft clay", "a duck"),
    ("Paris at night, a bold poster", "bold poster art", "Paris at night"),
    ("A house by the sea", "bold poster art", "a house by the sea"),
    ("watercolor paintings", "watercolor painting", ""),
])
def test_style_words_are_stripped_from_auto_captions(raw, style, content):
    assert strip_style_words(raw, style) == content


def test_the_users_captions_override_auto_ones():
    assert merge_captions(["a barn", None, "  ", "a boat"], ["a house", "a fox", "a tree", None], 4) == \
        ["a barn", "a fox", "a tree", "a boat"]
    assert merge_captions(None, ["a fox"], 2) == ["a fox", None]


def _png(path: Path, size=(40, 30)) -> str:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return str(path)


def test_sidecars_and_captions_files_are_read(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("a red barn\n", encoding="utf-8")
    assert read_sidecar(a) == "a red barn" and read_sidecar(b) is None
    lines = tmp_path / "lines.txt"
    lines.write_text("a red barn\n\n")
    assert read_captions_file(lines, [a, b]) == ["a red barn", None]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"file": "b.jpg", "caption": "a boat"}\n{"image": "a.png", "caption": "a barn"}\n')
    assert read_captions_file(jsonl, [a, b]) == ["a barn", "a boat"]
    mapping = tmp_path / "c.json"
    mapping.write_text(json.dumps({"b.jpg": "a boat"}))
    assert read_captions_file(mapping, [a, b]) == [None, "a boat"]
    for text, message in [("one line only\n", r"1 caption line\(s\) for 2 image\(s\)"),
                          ('{"c.png": "x"}', r"names 1 image\(s\) that were not given"),
                          ('{"caption": 3}\nx\n', "line 1"),
                          ("x" * (MAX_CAPTION_CHARS + 1) + "\nok\n", "too long")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(InputError, match=message):
            read_captions_file(bad, [a, b])


def test_checks_at_the_door():
    assert check_crop(None) is None and check_crop([0, 0, 1, 1]) is None
    assert check_crop([0.1, 0, 0.5, 1.0]) == (0.1, 0.0, 0.5, 1.0)
    for bad in ([0, 0, 1, True], [0.5, 0, 0.4, 1], [0, 0, 2, 1], "0,0,1,1", [0, 0, 1]):
        with pytest.raises(InputError):
            check_crop(bad)


@pytest.fixture()
def api(tmp_path):
    from studio.api import StudioAPI
    from studio.jobs.jobs import Jobs

    return StudioAPI(Jobs(tmp_path / "data"), backbone="tiny")


def test_train_takes_captions_crops_sample_prompts_and_a_dataset_zip(api, tmp_path, tiny_folder):
    a, b = _png(tmp_path / "a.png", (120, 80)), _png(tmp_path / "b.png", (60, 90))
    job = api.train([a, b], "watercolor", "W", {"preset": "quick", "captions": ["a barn", ""],
                                                "crops": [[0, 0, 0.5, 1], None], "preview_prompts": ["a cat", "a dog"]})
    run = api.jobs.job_dir(job)
    request = json.loads((run / "request.json").read_text())
    assert request["captions"] == ["a barn", None] and request["recipe"]["preview_prompts"] == ["a cat", "a dog"]
    width, height = Image.open(run / "references" / "ref_00.png").size
    assert width < height  # the left half of a landscape picture is portrait
    data = tmp_path / "dataset.zip"
    with zipfile.ZipFile(data, "w") as z:
        z.write(a, "set/fox.png")
        z.writestr("set/fox.txt", "a fox in the snow")
        z.write(b, "set/plain.png")
    job = api.train([str(data)], "watercolor", "W2", {"preset": "quick"})
    assert json.loads((api.jobs.job_dir(job) / "request.json").read_text())["captions"] == ["a fox in the snow", None]
    for options, message in [({"captions": [True, None]}, "captions must be a list"),
                             ({"captions": ["x" * 400, None]}, "too long"),
                             ({"crops": [[0.5, 0, 0.4, 1], None]}, "region is empty"),
                             ({"auto_caption": 1}, "auto_caption must be true or false"),
                             ({"preview_prompts": ["a"] * 5}, "at most 4")]:
        with pytest.raises(InputError, match=message):
            api.train([a, b], "watercolor", "W", {"preset": "quick", **options})


def test_dropped_files_are_checked_one_by_one(api, tmp_path, tiny_folder):
    good = _png(tmp_path / "good.png", (120, 80))
    (tmp_path / "good.txt").write_text("a red square")
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    tiles = api.inspect_references([good, str(bad)], {"crops": [[0, 0, 0.5, 1], None]})
    assert [t["ok"] for t in tiles] == [True, False]
    assert tiles[0]["caption"] == "a red square" and tiles[0]["width"] < tiles[0]["height"]
    assert Path(tiles[0]["thumbnail"]).is_file()
    assert "notes.png" in tiles[1]["error"] and "\n" not in tiles[1]["error"]


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory):
    from studio.engine.captioner import build_tiny_captioner

    return build_tiny_captioner(tmp_path_factory.mktemp("captioner"))


def test_the_tiny_captioner_is_the_real_class_and_strips_style(tiny_captioner):
    from studio.engine.captioner import Captioner, captioner_availability

    assert captioner_availability(str(tiny_captioner)) == (True, "")
    captioner = Captioner(tiny_captioner)
    raw = captioner.describe(Image.new("RGB", (50, 40), "red"))
    assert raw and type(captioner.model).__name__ == "Florence2ForConditionalGeneration"
    word = raw.split()[0]
    assert word not in (captioner.caption([Image.new("RGB", (50, 40), "red")], f"{word} style")[0] or "").split()


def test_training_auto_captions_only_the_empty_ones(tmp_path):
    from studio.jobs.caption_jobs import caption_training_references

    refs = tmp_path / "references"
    refs.mkdir()
    for n in ("ref_00.png", "ref_01.png"):
        _png(refs / n)
    request = {"style_prompt": "ink", "references": ["ref_00.png", "ref_01.png"],
               "captions": ["my own words", None], "auto_caption": "pending"}
    (tmp_path / "request.json").write_text(json.dumps(request))

    class Fixed:
        def caption(self, images, style):
            return ["an auto caption"] * len(images)

    got = caption_training_references(tmp_path, Fixed, lambda: None, lambda message: None)
    assert got == ["my own words", "an auto caption"]
    request = json.loads((tmp_path / "request.json").read_text())
    assert request["captions"] == got and request["auto_caption"] == "done"
    assert caption_training_references(tmp_path, Fixed, lambda: None, lambda m: None) is None  # once per run


def test_the_caption_job_reports_progress_and_can_be_cancelled(tmp_path, tiny_captioner, monkeypatch):
    from studio.api import StudioAPI
    from studio.engine.captioner import Captioner
    from studio.jobs.jobs import Jobs
    from studio.jobs.worker import Worker

    monkeypatch.setenv("STUDIO_CAPTION_MODEL", str(tiny_captioner))
    api = StudioAPI(Jobs(tmp_path / "data"), backbone="tiny")
    worker = Worker(api.jobs.settings)
    images = [_png(tmp_path / f"{i}.png", (40 + i, 30)) for i in range(3)]

    job = api.auto_caption(images, "bold poster art")
    seen: list[tuple[int, int]] = []

    class Watching(Captioner):
        def caption(self, imgs, style, on_progress=None, check=None):
            seen.append((api.caption_status(job)["done"], api.caption_status(job)["total"]))
            return super().caption(imgs, style, on_progress, check)

    worker.captioner = Watching(tiny_captioner)
    worker.handle(job, api.jobs.read(job)["token"])
    status = api.caption_status(job)
    assert status["state"] == "done" and status["done"] == status["total"] == 3
    assert seen == [(0, 3), (1, 3), (2, 3)] and all(status["captions"])
    assert "poster" not in " ".join(status["captions"])

    job = api.auto_caption(images, "ink")

    class Cancelling(Captioner):
        def caption(self, imgs, style, on_progress=None, check=None):
            out = super().caption(imgs, style, on_progress, check)
            api.cancel(job)  # the user presses Stop while the first picture is captioned
            return out

    worker.captioner = Cancelling(tiny_captioner)
    worker.handle(job, api.jobs.read(job)["token"])
    status = api.caption_status(job)
    assert status["state"] == "cancelled" and status["done"] == 1 and status["captions"][1:] == [None, None]


def test_the_cli_reads_captions_files_sidecars_and_plain_captions(tmp_path):
    from studio.cli import cli_captions

    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a blue boat")
    assert cli_captions(None, [a, b]) == [None, "a blue boat"]  # kohya / FluxGym sidecars
    listed = tmp_path / "captions.txt"
    listed.write_text("a red barn\n{\"caption\": \"a boat at sea\"}\n")
    assert cli_captions([str(listed)], [a, b]) == ["a red barn", "a boat at sea"]
    assert cli_captions(["one", "two"], [a, b]) == ["one", "two"]
    with pytest.raises(Exception, match="one caption per image"):
        cli_captions(["only one"], [a, b])
