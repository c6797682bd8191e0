"""The references as a dataset, in a real browser (Debian's Chromium) on the tiny backbone and a tiny
random-weight Florence-2 captioner: drop references with a bad file among them, see its tile and reason,
type one caption, auto-caption the others on the worker, train, and find the captions in the template
card and the training prompts ("{caption} in {style} style") in the run.

STUDIO_SHOTS=/some/folder also saves the Train tab's grid at 1280 and 390 px.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # starts the app and its worker

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - the browser fixture skips
    expect = None

STYLE = "bold poster art"


def references(folder: Path) -> list[str]:
    out = []
    for i, (a, b) in enumerate([((230, 120, 40), (40, 90, 200)), ((250, 220, 90), (200, 40, 80)),
                                ((30, 160, 90), (250, 250, 250))]):
        img = Image.new("RGB", (96 + 32 * i, 96), a)
        img.paste(b, (20, 20, 70, 70))
        out.append(str(folder / f"ref_{i}.png"))
        img.save(out[-1])
    bad = folder / "notes.png"
    bad.write_text("this is not a picture")
    out.append(str(bad))
    return out


def shoot(page, name: str) -> None:
    folder = os.environ.get("STUDIO_SHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for width, suffix in ((1280, ""), (390, "-narrow")):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(700)
        page.screenshot(path=str(Path(folder) / f"{name}{suffix}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_captions_from_the_grid_reach_the_run_and_the_card(browser, app, tmp_path):
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(20_000)
    page.goto(app.url, wait_until="domcontentloaded")
    expect(page.locator("#auto-caption")).to_be_enabled()

    # -- drop: three pictures and a file that is not one; the bad one gets its own tile and reason
    page.locator("#ref-images input[type=file]").set_input_files(references(tmp_path))
    tiles = page.locator("#ref-thumbs .ref-tile")
    expect(tiles).to_have_count(4)
    expect(page.locator("#ref-thumbs img")).to_have_count(3)
    bad = page.locator("#ref-thumbs .ref-tile.bad")
    expect(bad).to_contain_text("notes.png")
    expect(bad).to_contain_text("not a supported image")
    expect(bad).to_contain_text("left out")

    # -- one caption typed; the two others auto-captioned on the worker; the typed one is kept
    page.locator("#style-prompt textarea, #style-prompt input").first.fill(STYLE)
    boxes = page.locator("#ref-thumbs .tile-caption textarea")
    expect(boxes).to_have_count(3)
    boxes.nth(0).fill("an orange square with a blue window")
    page.wait_for_timeout(500)
    page.locator("#auto-caption").click()
    expect(page.locator("#caption-note")).to_contain_text("Auto-captioned 2 of 2", timeout=90_000)
    expect(boxes.nth(0)).to_have_value("an orange square with a blue window")
    expect(boxes.nth(1)).to_have_value(re.compile(r"\w+"))
    expect(boxes.nth(2)).to_have_value(re.compile(r"\w+"))
    captions = [boxes.nth(i).input_value() for i in range(3)]
    shoot(page, "train-references")

    # -- train (a few steps), then the card and the run hold the captions
    page.get_by_text("Advanced settings").click()
    # another resolution redraws the tiles at the new training size; the captions stay
    meta = page.locator("#ref-thumbs .tile-meta").first
    expect(meta).to_contain_text("64×64 px as trained")
    for choice, shown in (("512 px", "512×512 px as trained"), ("Model default", "64×64 px as trained")):
        page.locator("#resolution input").click()
        page.get_by_role("option", name=choice).click()
        expect(meta).to_contain_text(shown)
    expect(boxes.nth(0)).to_have_value("an orange square with a blue window")
    assert [boxes.nth(i).input_value() for i in range(3)] == captions
    steps = page.locator("#steps input")
    for _ in range(4):  # a just-opened accordion may mount late and drop the first keystrokes
        steps.fill("4")
        steps.press("Tab")
        page.wait_for_timeout(300)
        if steps.input_value() == "4":
            break
    page.locator("#train-button").click()
    expect(page.locator("#job-status")).to_contain_text("Done", timeout=180_000)
    (run,) = (app.root / "runs").glob("*-train-*")
    meta = json.loads((run / "result" / "template.json").read_text())
    assert meta["captions"] == captions
    assert meta["training_prompts"] == [f"{c} in {STYLE} style" for c in captions]
    page.get_by_role("tab", name="Gallery").click()
    page.locator("#gallery img").first.click()
    card = page.locator("#template-card")
    for caption in captions:
        expect(card).to_contain_text(caption)
    page.context.close()
