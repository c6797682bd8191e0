"""Template mixing, style schedule, fusion and the style noise prior through the studio's front doors:
StudioAPI (what the UI calls) and gradio_client's /generate, run by the real worker on the tiny backbone.

One app (``python app.py`` with its worker) serves the module; an in-process StudioAPI shares its
data folder and queue, so both paths reach the same worker and templates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from studio.api import StudioAPI
from studio.errors import StudioError
from studio.jobs.jobs import Jobs
from studio.jobs.queue import Settings
from studio.ui import gen_options

pytestmark = pytest.mark.slow  # starts the app or a worker process

RECIPE = {"steps": 30, "lr": 5e-3, "preview_every": 0, "checkpoint_every": 0}
PLAIN = {"steps": 6, "seed": 4}


@pytest.fixture(scope="module")
def api(app) -> StudioAPI:
    root = app.root
    settings = Settings(runs_dir=root / "runs", store_dir=root / "templates_store",
                        queue_file=root / "runs" / ".queue.sqlite3")
    return StudioAPI(Jobs(settings=settings), backbone="tiny")


@pytest.fixture(scope="module")
def client(app):
    c = Client(app.url, verbose=False, analytics_enabled=False)
    yield c
    c.close()


def reference(path: Path, color, stripe: int) -> str:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:] = color
    arr[stripe: stripe + 16] = (250, 220, 60)
    Image.fromarray(arr).save(path)
    return str(path)


def trained(api: StudioAPI, images: list[str], style: str, name: str, **recipe) -> str:
    job = api.train(images, style, name, {**RECIPE, **recipe})
    deadline = time.monotonic() + 300
    while (status := api.job_status(job))["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"training {name} did not finish"
        time.sleep(0.3)
    assert status["state"] == "done", status["error"]
    return status["template_id"]


@pytest.fixture(scope="module")
def templates(api, tmp_path_factory) -> dict:
    """"red": trained with the style noise prior (4 references); "blue": without, another colour."""
    folder = tmp_path_factory.mktemp("refs")
    reds = [reference(folder / f"red{i}.png", (200 + 10 * i, 40, 30), 8 + 12 * i) for i in range(4)]
    blue = [reference(folder / "blue.png", (30, 90, 230), 24)]
    return {"red": trained(api, reds, "flat poster", "Red poster", noise_prior=True),
            "blue": trained(api, blue, "flat poster", "Blue poster")}



def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def params(path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["studio"])


def job_count(api: StudioAPI) -> int:
    return len(api.jobs.list_jobs(limit=10_000))


def test_each_option_changes_the_picture(api, templates):
    red, blue = templates["red"], templates["blue"]
    plain, = api.generate(red, "a house", options=PLAIN)
    again, = api.generate(red, "a house", options=PLAIN)
    assert np.array_equal(pixels(plain), pixels(again))  # deterministic: any difference below is the option
    variants = {
        "mix": {"mix": [{"template": blue, "scale": 0.8}]},
        "style_schedule": {"style_schedule": 0.3},
        "fusion_weight": {"fusion_weight": 0.4},
        "noise_prior": {"noise_prior": True},
    }
    for key, extra in variants.items():
        out, = api.generate(red, "a house", options={**PLAIN, **extra})
        difference = float(np.abs(pixels(out) - pixels(plain)).mean())
        assert difference > 0.5, (key, difference)
        recorded = params(out)
        assert recorded[key] == extra[key] and recorded["template"] == red
    assert params(plain)["mix"] == [] and params(plain)["style_schedule"] is None


def test_the_options_also_reach_comic_panels(api, templates):
    red, blue = templates["red"], templates["blue"]
    page, = api.generate(red, "", "multi-panel", {**PLAIN, "panels": ["a cat", "a dog"], "layout": "1x2",
                                                  "mix": [{"template": blue, "scale": 0.5}], "style_schedule": 0.5})
    panels = params(page)["panels"]
    assert len(panels) == 2 and all(p["mix"] == [{"template": blue, "scale": 0.5}] for p in panels)
    assert all(p["style_schedule"] == 0.5 for p in panels)


@pytest.mark.parametrize(("template", "options", "message"), [
    ("red", {"mix": [{"template": "no-such-style", "scale": 0.5}]}, "cannot mix in 'no-such-style'"),
    ("red", {"mix": [{"template": "../red", "scale": 0.5}]}, "cannot mix in '../red'"),
    ("red", {"mix": [{"template": "blue", "scale": 9}]}, "must be a number between -4 and 4"),
    ("red", {"mix": [{"template": "blue", "weight": 0.5}]}, "a mix entry takes 'template'"),
    ("red", {"mix": "blue"}, "mix must be a list"),
    ("red", {"mix": [{"template": "red", "scale": 0.5}]}, "cannot be mixed into itself"),
    ("red", {"style_schedule": 0}, "style schedule must be more than 0 and at most 1"),
    ("red", {"style_schedule": 1.5}, "style schedule must be more than 0 and at most 1"),
    ("red", {"style_schedule": "half"}, "style schedule must be more than 0 and at most 1"),
    ("red", {"fusion_weight": 3}, "fusion weight must be between 0 and 2"),
    ("red", {"fusion_weight": None}, "fusion weight must be between 0 and 2"),
    ("red", {"noise_prior": "yes"}, "noise_prior must be true or false"),
    ("blue", {"noise_prior": True}, "has no style noise prior"),
    ("", {"style_schedule": 0.5}, "need a template"),
    ("", {"mix": [{"template": "blue", "scale": 0.5}]}, "mixing needs a main template"),
])
def test_bad_values_get_a_clear_message_and_queue_nothing(api, templates, template, options, message):
    options = {k: ([{**e, "template": templates.get(e["template"], e["template"])} for e in v]
                   if k == "mix" and isinstance(v, list) else v) for k, v in options.items()}
    before = job_count(api)
    with pytest.raises(StudioError) as info:
        api.generate(templates.get(template, template), "a house", options={**PLAIN, **options})
    text = str(info.value)
    assert message in text and "\n" not in text and "Traceback" not in text
    assert job_count(api) == before  # refused before anything was queued


def test_gradio_client_generate_with_every_option(client, templates):
    red, blue = templates["red"], templates["blue"]
    options = {**PLAIN, "mix": [{"template": blue, "scale": 0.6}], "style_schedule": 0.5, "fusion_weight": 0.8,
               "noise_prior": True}
    files = client.predict(red, "a wood cabin", "text-to-image", options, api_name="/generate")
    recorded = params(files[0])
    assert recorded["mix"] == [{"template": blue, "scale": 0.6}]
    assert recorded["style_schedule"] == 0.5 and recorded["fusion_weight"] == 0.8 and recorded["noise_prior"] is True
    listed = {tid: client.predict(tid, api_name="/template") for tid in (red, blue)}
    assert listed[red]["noise_prior"] is True and listed[blue]["noise_prior"] is False
    with pytest.raises(Exception) as info:  # gradio_client's AppError carries the message
        client.predict(blue, "a cabin", "text-to-image", {"noise_prior": True}, api_name="/generate")
    assert "has no style noise prior" in str(info.value)


# -- the Advanced accordion's mapping (no server) -----------------------------------------------------


def test_advanced_controls_map_to_options():
    assert gen_options.advanced_options("", 0.5, 100, 0, False) == {}  # every control at "off"
    assert gen_options.advanced_options(None, 0.5, 100, 0, False) == {}
    assert gen_options.advanced_options("ink", 0.35, 30, 25, True) == {
        "mix": [{"template": "ink", "scale": 0.35}], "style_schedule": 0.3, "fusion_weight": 0.75,
        "noise_prior": True}
    assert gen_options.advanced_options("", 1, 5, 100, False) == {"style_schedule": 0.05, "fusion_weight": 0.0}
    templates = [{"id": "a", "name": "A", "style_prompt": "ink"}, {"id": "b", "name": "B", "style_prompt": "oil"}]
    assert gen_options.mix_choices(templates, "a") == [("Don't mix", ""), ("B — oil", "b")]
    assert [v for _, v in gen_options.mix_choices(templates, "")] == ["", "a", "b"]
    assert gen_options.prior_state(None) == (False, gen_options.PRIOR_NO_TEMPLATE)
    assert gen_options.prior_state({"noise_prior": False}) == (False, gen_options.PRIOR_MISSING)
    assert gen_options.prior_state({"noise_prior": True}) == (True, gen_options.PRIOR_ON)


# -- the Generate tab's Advanced accordion in a real browser ----------------------------------------


def test_advanced_accordion_in_the_browser(browser, app, api, templates):
    """Pick a template, open Advanced, mix in a second one, shorten the style schedule, generate:
    the worker gets exactly those options. A template without a prior says why the box is off.

    STUDIO_SHOTS=folder also saves the screenshot docs/screenshots/generate-advanced.png is made from.
    """
    import os

    from test_e2e_browser import expect, set_slider

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(20_000)
    page.goto(app.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Generate").click()

    def pick(elem_id: str, label: str) -> None:
        page.locator(f"#{elem_id} input").click()
        page.get_by_role("option", name=label).click()

    pick("template-picker", "Red poster — flat poster")
    page.locator("#gen-advanced").get_by_text(gen_options.ACCORDION, exact=True).click()
    prior = page.locator("#noise-prior input[type=checkbox]")
    expect(prior).to_be_enabled()
    expect(page.locator("#noise-prior")).to_contain_text("average colours")
    expect(page.locator("#mix-scale")).to_be_hidden()
    pick("mix-template", "Blue poster — flat poster")
    expect(page.locator("#mix-scale")).to_contain_text("Strength of “Blue poster” (mixed in)")
    expect(page.locator("#mix-main-scale")).to_contain_text("Strength of “Red poster” (main template)")
    for elem_id, value in (("mix-scale", "0.7"), ("mix-main-scale", "0.8"), ("style-schedule", "50")):
        page.locator(f"#{elem_id} input[type=number]").fill(value)
        page.locator(f"#{elem_id} input[type=number]").press("Tab")
    prior.check()
    shots = os.environ.get("STUDIO_SHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(500)
        page.screenshot(path=str(Path(shots) / "generate-advanced.png"), full_page=True)
    page.locator("#gen-settings").get_by_text("Size, seed, strength and steps").click()
    set_slider(page, "Denoising steps", 4)
    page.locator("#generate-button").click()
    expect(page.locator("#generated-files")).to_contain_text(".png", timeout=90_000)
    job = api.jobs.list_jobs(kind="generate", limit=1)[0]
    options = job["request"]["options"]
    assert job["template_id"] == templates["red"] and job["state"] == "done"
    assert options["mix"] == [{"template": templates["blue"], "scale": 0.7}]
    assert options["style_schedule"] == 0.5 and options["noise_prior"] is True
    assert options["fusion_weight"] == 1.0 and options["steps"] == 4  # blend left at 0 % = off
    assert options["lora_scale"] == 0.8  # the main template's slider in the mix moved "Style strength"

    pick("template-picker", "Blue poster — flat poster")
    expect(prior).to_be_disabled()
    expect(prior).not_to_be_checked()
    expect(page.locator("#noise-prior")).to_contain_text("trained without it")
    expect(page.locator("#mix-scale")).to_be_hidden()  # Blue can no longer be mixed into itself
    if shots:
        page.wait_for_timeout(500)
        page.screenshot(path=str(Path(shots) / "generate-advanced-no-prior.png"), full_page=True)
    page.close()
