"""The Gallery's Refine section in a real browser (Debian's Chromium through Playwright) on the tiny backbone:
make test pictures, tick favourites by clicking them, train round 2, find the new template linked to its parent.

Set STUDIO_SHOTS=/some/folder to also save ``refine.png`` (the section with ticked favourites) there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

pytestmark = pytest.mark.slow  # starts the app or a worker process

ROOT = Path(__file__).resolve().parent.parent

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - the browser fixture skips (or fails in CI) first
    expect = None


def crop_to(path: Path, page, first: str, last: str) -> None:
    """Crop a full-page screenshot to the band from element ``first`` to the end of ``last``."""
    top, bottom = page.evaluate(
        """([a, b]) => [document.querySelector(a).getBoundingClientRect().top + scrollY,
                        document.querySelector(b).getBoundingClientRect().bottom + scrollY]""", [first, last])
    with Image.open(path) as img:
        img.crop((0, max(0, int(top) - 16), img.width, min(img.height, int(bottom) + 16))).save(path)


def test_refine_with_favourites_in_the_gallery(browser, app):
    client = Client(app.url, verbose=False, analytics_enabled=False)
    job = client.predict([handle_file(str(ROOT / "assets" / "examples" / "watercolor.png"))], "watercolor painting",
                         "Watercolors", {"steps": 12, "preview_every": 6, "grad_accum": 1}, api_name="/train")
    deadline = time.monotonic() + 120
    while client.predict(job, api_name="/job_status")["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.3)
    client.close()


    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(app.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Gallery").click()
    expect(page.locator("#template-card")).to_contain_text("Watercolors")
    page.locator("#refine-box").get_by_text("Refine this style (round 2)").click()
    page.locator("#refine-n input[type=number]").fill("4")
    page.locator("#refine-n input[type=number]").press("Tab")
    page.locator("#refine-make").click()
    tiles = page.locator("#refine-candidates button.thumbnail-item")
    expect(tiles).to_have_count(4, timeout=90_000)
    expect(page.locator("#refine-train")).to_be_disabled()
    tiles.nth(1).click()
    expect(page.locator("#refine-picks input:checked")).to_have_count(1)
    tiles.nth(3).click()
    expect(page.locator("#refine-picks input:checked")).to_have_count(2)
    tiles.nth(3).click()  # un-pick, then pick again
    expect(page.locator("#refine-picks input:checked")).to_have_count(1)
    tiles.nth(3).click()
    expect(page.locator("#refine-picks input:checked")).to_have_count(2)
    expect(page.locator("#refine-candidates")).to_contain_text("✓")
    expect(page.locator("#refine-train")).to_be_enabled()
    folder = os.environ.get("STUDIO_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shot = Path(folder) / "refine.png"
        page.wait_for_timeout(800)
        page.screenshot(path=str(shot), full_page=True)
        crop_to(shot, page, "#tab-gallery", "#refine-box")

    page.locator("#refine-train").click()
    expect(page.locator("#refine-status")).to_contain_text("Done", timeout=120_000)
    # the new template is selected: linked to its parent, showing the two pictures it learned from
    expect(page.locator("#template-card")).to_contain_text("Watercolors · round 2", timeout=30_000)
    expect(page.locator("#template-card")).to_contain_text("Refined from Watercolors")
    expect(page.locator("#refine-learned img")).to_have_count(2)
    expect(page.locator("#gallery img")).to_have_count(2)
    page.close()
