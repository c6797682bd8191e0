"""End to end in a real browser (Debian's Chromium through Playwright) on the tiny backbone:
upload references, train, watch the loss and previews, reload mid-training and re-attach, find the
template in the gallery, download it, make a 4-panel comic and a captioned meme.

Set STUDIO_SHOTS=/some/folder to also save screenshots of every tab at 1280 and 400 px.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # starts the app or a worker process


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - CI installs it (requirements-dev.txt); the browser fixture skips
    sync_playwright = None


def refs(tmp_path: Path) -> list[str]:
    out = []
    for i, (a, b) in enumerate([((230, 120, 40), (40, 90, 200)), ((250, 220, 90), (200, 40, 80))]):
        img = Image.new("RGB", (96, 96), a)
        img.paste(b, (20, 20, 70, 70))
        path = tmp_path / f"ref_{i}.png"
        img.save(path)
        out.append(str(path))
    return out


def field(page, elem_id: str):
    """A Textbox's editing element (an input when it is one line, else a textarea)."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def type_number(box, value: int, shown=None) -> None:
    """Type a number into a box and wait until ``shown`` (default: the box) still holds it a moment later.

    On a busy machine the first keystrokes can land while a just-opened accordion's components are
    still being mounted; the new component then shows (and sends) the old value, so type again."""
    shown = shown or box
    for _ in range(4):
        box.fill(str(value))
        box.press("Tab")
        try:
            expect(shown).to_have_value(str(value), timeout=2_000)
            box.page.wait_for_timeout(300)
            expect(shown).to_have_value(str(value), timeout=500)
            return
        except AssertionError:
            continue
    expect(shown).to_have_value(str(value))


def set_slider(page, label: str, value: int) -> None:
    """A Slider's number box; the range slider itself must show the value (that is what Generate sends)."""
    type_number(page.get_by_label(f"number input for {label}"), value, page.get_by_label(f"range slider for {label}"))


def shoot(page, name: str) -> None:
    folder = os.environ.get("STUDIO_SHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for width in (1280, 400):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(600)
        page.screenshot(path=str(Path(folder) / f"{name}_{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_train_reload_gallery_download_comic_meme(browser, app, tmp_path):
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    page.goto(app.url, wait_until="domcontentloaded")
    expect(page.locator("#train-button")).to_be_visible()
    expect(page.locator("#demo-notice")).to_contain_text("tiny")
    shoot(page, "train_empty")

    # -- train
    page.locator("#ref-images input[type=file]").set_input_files(refs(tmp_path))
    expect(page.locator("#ref-thumbs img")).to_have_count(2)
    field(page, "template-name").fill("Poster test")  # typed first: the suggestion must not replace it
    field(page, "style-prompt").fill("bold poster art")
    field(page, "style-prompt").blur()
    expect(field(page, "template-name")).to_have_attribute("placeholder", "Bold poster art")
    expect(field(page, "template-name")).to_have_value("Poster test")
    page.get_by_text("Advanced settings").click()
    type_number(page.locator("#steps input"), 200)
    type_number(page.locator("#preview-every input"), 50)
    expect(page.locator("#steps input")).to_have_value("200")
    page.locator("#train-button").click()
    status = page.locator("#job-status")
    expect(status).to_contain_text("Training", timeout=60_000)
    expect(page.locator("#loss-plot svg .mark-line path").first).to_be_visible(timeout=60_000)
    expect(page.locator("#previews img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#cancel-button")).to_be_visible()
    expect(page).to_have_title(re.compile(r"^\[\d+%\] Training Poster test"), timeout=10_000)

    # -- reload mid-training: the page re-attaches to the running job
    assert "Done" not in status.inner_text()
    page.reload(wait_until="domcontentloaded")
    expect(page.locator("#job-status")).to_contain_text("Poster test", timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("step", timeout=30_000)
    expect(page.locator("#loss-plot svg .mark-line path").first).to_be_visible(timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("Done", timeout=120_000)
    # steps 0, 50, 100, 150, 200 x 3 preview prompts
    expect(page.locator("#previews").get_by_label("Thumbnail 15 of 15")).to_be_attached()
    expect(page.locator("#use-template")).to_be_visible()
    expect(page).to_have_title(re.compile(r"^Done: Poster test"))
    shoot(page, "train_done")

    # -- a refused Train click says why and leaves the finished run on screen
    field(page, "style-prompt").fill("")
    page.locator("#train-button").click()
    # (the reload above cleared the uploads too: both problems in one message)
    expect(page.locator(".toast-body")).to_contain_text("Add at least one reference image, and describe",
                                                        timeout=10_000)
    expect(page.locator("#previews").get_by_label("Thumbnail 15 of 15")).to_be_attached()
    expect(page.locator("#loss-plot svg .mark-line path").first).to_be_visible()
    expect(page.locator("#job-status")).to_contain_text("Done")
    shoot(page, "train_refused")
    page.locator(".toast-body").first.locator("xpath=..").get_by_role("button").first.click()

    # -- gallery: the new template, then download it as a .zip
    page.get_by_role("tab", name="Gallery").click()
    expect(page.locator("#gallery img")).to_have_count(1)
    expect(page.locator("#template-card")).to_contain_text("Poster test")
    expect(page.locator("#template-card")).to_contain_text("bold poster art")
    with page.expect_download(timeout=30_000) as download:
        page.locator("#export-button").click()
    assert download.value.suggested_filename == "poster-test.zip"
    shoot(page, "gallery")

    # -- a LoRA imported without any picture still gets a tile (a card with its name), and picking it
    # selects it, not a neighbour
    lora = tmp_path / "someone-elses-style.safetensors"
    with zipfile.ZipFile(download.value.path()) as z:
        lora.write_bytes(z.read("lora.safetensors"))
    page.locator("#import-box").get_by_text("Import a template").click()
    page.locator("#import-file input[type=file]").set_input_files(str(lora))
    page.locator("#import-button").click()
    expect(page.locator("#gallery img")).to_have_count(2, timeout=30_000)
    page.locator("#gallery img").nth(0).click()  # newest first
    expect(page.locator("#template-card")).to_contain_text("someone-elses-style", timeout=10_000)
    expect(page.locator("#template-card")).to_contain_text("tiny")  # its width says which model it fits
    shoot(page, "gallery_import")
    page.locator("#gallery img").nth(1).click()
    expect(page.locator("#template-card")).to_contain_text("Poster test")

    # -- generate: a 4-panel comic page, then a classic meme
    page.locator("#gallery-generate").click()
    expect(field(page, "gen-prompt")).to_have_value("a cozy wood cabin in the snow in bold poster art style")
    page.get_by_label("Comic page").check()
    expect(field(page, "panel-prompts")).to_be_visible()
    page.get_by_text("Size, seed, strength and steps").click()
    set_slider(page, "Denoising steps", 4)
    page.locator("#generate-button").click()
    expect(page.locator("#generated-files")).to_contain_text("comic_", timeout=90_000)
    expect(page.locator("#generated img")).to_have_count(1)
    shoot(page, "generate_comic")

    page.get_by_label("Meme").check()
    field(page, "meme-top").fill("one does not simply")
    field(page, "meme-bottom").fill("train a style")
    page.locator("#generate-button").click()
    expect(page.locator("#generated-files")).to_contain_text("meme_", timeout=90_000)
    shoot(page, "generate_meme")
    ctx.close()


def test_cancel_during_the_first_previews_stops_within_one_picture(browser, app, tmp_path):
    """The slow part of a large run is its step-0 previews; Cancel shows at once and ends the job after
    the picture being drawn, not after the whole set."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    page.goto(app.url, wait_until="domcontentloaded")
    page.locator("#ref-images input[type=file]").set_input_files(refs(tmp_path))
    expect(page.locator("#ref-thumbs img")).to_have_count(2)
    field(page, "style-prompt").fill("slow big previews")
    field(page, "template-name").fill("Early stop")
    page.get_by_text("Advanced settings").click()
    page.locator("#resolution input").click()
    page.get_by_role("option", name="512 px").click()
    earlier = set((app.root / "runs").glob("*-train-*"))
    page.locator("#train-button").click()
    expect(page.locator("#cancel-button")).to_be_visible(timeout=30_000)
    (run,) = set((app.root / "runs").glob("*-train-*")) - earlier

    def first_previews() -> list[Path]:
        return sorted(run.glob("previews/step_0000_p*.png"))

    def wait_for_first_picture() -> None:
        for _ in range(600):
            if first_previews():
                return
            page.wait_for_timeout(200)
        pytest.fail("no step-0 preview was drawn in 2 minutes")

    wait_for_first_picture()
    page.locator("#cancel-button").click()
    expect(page.locator("#job-status")).to_contain_text("Cancelling…", timeout=3_000)  # at once
    expect(page.locator("#job-status .badge")).to_have_text("Cancelled", timeout=120_000)
    assert len(first_previews()) <= 2  # the picture being drawn when Cancel came may finish; no more of the 3
    expect(page).to_have_title(re.compile(r"^Cancelled: Early stop"))
    ctx.close()


def lora_of(app, template_id: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(app.root / "templates_store" / template_id / "lora.safetensors"))


def pick_job(page, name: str) -> None:
    """Click the job's line in the Jobs table (the newest with this name)."""
    page.locator("#jobs-table [role=gridcell][data-col='0']").filter(
        has_text=re.compile(f"^\\s*{re.escape(name)}\\s*$")).first.click()
    expect(page.locator("#job-detail-card")).to_contain_text(name)


def test_jobs_view_resumes_a_cancelled_run_and_keeps_a_failed_runs_checkpoint(browser, app, tmp_path):
    """A cancelled training resumed from the Jobs tab ends with the template an uninterrupted run makes; a
    failed one's last checkpoint becomes a template; both without the CLI."""
    import torch
    from app_helpers import wait_done
    from gradio_client import Client, handle_file

    client = Client(app.url, verbose=False, analytics_enabled=False)
    ref = [handle_file(p) for p in refs(tmp_path)]
    run = {"steps": 24, "checkpoint_every": 4, "preview_every": 0, "rank": 4, "seed": 7}
    cut = client.predict(ref, "blob poster", "Cut Blobs", run, api_name="/train")
    deadline = time.monotonic() + 120
    while client.predict(cut, api_name="/job_status")["step"] < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    client.predict(cut, api_name="/cancel")
    cancelled = wait_done(client, cut)
    assert cancelled["state"] == "cancelled" and cancelled["checkpoint_step"] >= 4, cancelled
    doomed = client.predict(ref, "blob poster", "Doomed Blobs", {**run, "steps": 6, "checkpoint_every": 2},
                            api_name="/train")
    assert wait_done(client, doomed)["state"] == "failed"

    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    page.goto(app.url, wait_until="domcontentloaded")
    page.locator("#tab-jobs-button, button[role=tab]:has-text('Jobs')").first.click()
    expect(page.locator("#jobs-table")).to_contain_text("Cut Blobs")
    pick_job(page, "Cut Blobs")
    expect(page.locator("#job-detail-card")).to_contain_text(f"last saved step: {cancelled['checkpoint_step']}")
    expect(page.locator("#job-save")).to_be_enabled()
    shoot(page, "jobs")
    page.locator("#job-resume").click()
    resumed = wait_done(client, cut, ok=True)
    assert resumed["template_id"]
    expect(page.locator("#job-detail-card .badge")).to_have_text("Done", timeout=30_000)  # the view follows it

    pick_job(page, "Doomed Blobs")
    expect(page.locator("#job-detail-card")).to_contain_text("out of GPU memory at step 3")
    page.locator("#job-save").click()
    saved = wait_done(client, doomed, ok=True)
    expect(page.locator("#job-detail-card")).to_contain_text("checkpoint of step 2 of 6", timeout=30_000)

    # "Copy its settings to the Train form": the Train tab opens with the run's references, prompt and steps
    pick_job(page, "Cut Blobs")
    page.locator("#job-clone").click()
    expect(field(page, "style-prompt")).to_have_value("blob poster")
    expect(field(page, "template-name")).to_have_value("Cut Blobs")
    expect(page.locator("#ref-thumbs .ref-tile")).to_have_count(2, timeout=30_000)
    page.get_by_text("Advanced settings").click()
    expect(page.locator("#steps input")).to_have_value("24")
    ctx.close()

    template = client.predict(saved["template_id"], api_name="/template")
    assert template["name"] == "Doomed Blobs" and template["steps"] == 2, template
    straight = wait_done(client, client.predict(ref, "blob poster", "Straight Blobs", run, api_name="/train"), ok=True)
    a, b = lora_of(app, resumed["template_id"]), lora_of(app, straight["template_id"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
