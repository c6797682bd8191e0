"""Finding styles and template scores end to end on the tiny backbone: the real app and worker with the tiny
metric models, through gradio_client, the CLI and a real browser; then an app without metric models, which
must say why instead.

Set STUDIO_SHOTS=/some/folder to save screenshots (search.png: the gallery searched by a picture, with the
card's scores; similar.png: the Train tab's "you may already have this style").
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from app_helpers import start_app, wait_done
from gradio_client import Client, handle_file
from PIL import Image
from test_e2e_browser import expect

pytestmark = pytest.mark.slow  # starts the app or a worker process

FAST = {"steps": 12, "preview_every": 6, "grad_accum": 1, "rank": 4}
RED, BLUE = (215, 40, 35), (35, 50, 210)
NEW_ENDPOINTS = {"/search_templates", "/similar_templates", "/template_scores"}


def picture(path: Path, colour, seed: int, size=(96, 80)) -> str:
    """A flat colour with grain and a lighter block: that colour's "style"."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, float)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    arr[10:40, 12:50] = np.clip(arr[10:40, 12:50] + 40, 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[str]]:
    folder = tmp_path_factory.mktemp("pictures")
    return {name: [picture(folder / f"{name}_{i}.png", colour, seed + i) for i in range(2)]
            for name, colour, seed in (("red", RED, 1), ("blue", BLUE, 11), ("red_query", RED, 21),
                                       ("blue_query", BLUE, 31))}


@pytest.fixture(scope="module")
def client(app):
    c = Client(app.url, verbose=False, analytics_enabled=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def templates(client, images) -> dict[str, str]:
    """A red and a blue template, trained by the worker."""
    jobs = {"red": client.predict([handle_file(p) for p in images["red"]], "bold red poster", "Crimson poster",
                                  FAST, api_name="/train"),
            "blue": client.predict([handle_file(p) for p in images["blue"]], "blue watercolor wash", "Blue wash",
                                   FAST, api_name="/train")}
    out = {}
    for name, job in jobs.items():
        status = wait_done(client, job)
        assert status["state"] == "done", status["error"]
        out[name] = status["template_id"]
    return out



def error_of(client, *args, api_name) -> str:
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


@pytest.fixture
def cli(monkeypatch, capsys):
    """``python -m studio --store STORE templates ...`` run in this process, as a fresh one: only ``env`` names the
    metric models, and no scorer is left from an earlier call (the entry point itself: tests/test_architecture.py)."""
    from studio.cli import main
    from studio.styles.metrics import CLIP_ENV, DINO_ENV, default_scorer

    def run(store: Path, *args: str, env: dict[str, str] | None = None) -> SimpleNamespace:
        for key in (DINO_ENV, CLIP_ENV):
            if env and key in env:
                monkeypatch.setenv(key, env[key])
            else:
                monkeypatch.delenv(key, raising=False)
        default_scorer.cache_clear()
        capsys.readouterr()
        code = main(["--store", str(store), "templates", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    yield run
    default_scorer.cache_clear()


# -- API -------------------------------------------------------------------------------------------


def test_endpoints_are_named(client):
    assert NEW_ENDPOINTS <= set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])


def test_search_by_image_and_text(client, templates, images):
    for colour in ("red", "blue"):
        found = client.predict("", handle_file(images[f"{colour}_query"][0]), 5, api_name="/search_templates")
        assert found["mode"] == "image" and found["results"][0]["id"] == templates[colour]
        assert found["results"][0]["similarity"] > found["results"][1]["similarity"]
        assert found["results"][0]["thumbnail"] and "like your image" in found["note"]
    found = client.predict("watercolor", None, None, api_name="/search_templates")
    assert found["mode"] == "text" and found["results"][0]["id"] == templates["blue"]
    assert [t["matched"] for t in found["results"]] == ["name", "look"]
    assert "give a text or an image" in error_of(client, "", None, None, api_name="/search_templates")


def test_similar_templates_for_new_references(client, templates, images):
    found = client.predict([handle_file(p) for p in images["red_query"]], None, None, api_name="/similar_templates")
    assert [t["id"] for t in found["results"]][:1] == [templates["red"]]
    assert all(t["similarity"] >= 0.8 for t in found["results"])
    everything = client.predict([handle_file(images["red_query"][0])], 5, 0, api_name="/similar_templates")
    assert {t["id"] for t in everything["results"]} == set(templates.values())


def test_template_scores(client, templates):
    scores = client.predict(templates["red"], api_name="/template_scores")
    assert scores["available"] is True and scores["step"] == FAST["steps"] and scores["n_images"] >= 2
    for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
        assert -1 <= scores[key] <= 1
    assert client.predict(templates["red"], api_name="/template_scores") == scores  # cached: the same numbers
    assert "no template" in error_of(client, "nope", api_name="/template_scores")


def test_a_template_that_goes_leaves_the_index(client, templates, images):
    zipped = client.predict(templates["red"], "zip", api_name="/export_template")
    copy = client.predict(handle_file(zipped), "Red copy", api_name="/import_template")
    found = client.predict("", handle_file(images["red_query"][0]), 5, api_name="/search_templates")
    assert {t["id"] for t in found["results"][:2]} == {templates["red"], copy["id"]}
    client.predict(copy["id"], api_name="/delete_template")
    found = client.predict("", handle_file(images["red_query"][0]), 5, api_name="/search_templates")
    assert copy["id"] not in {t["id"] for t in found["results"]}


# -- CLI (against the app's store) -----------------------------------------------------------------


def test_cli_search_and_scores(app, templates, images, metric_env, cli):
    store = app.root / "templates_store"
    out = cli(store, "search", "--image", images["blue_query"][0], "-k", "2", env=metric_env)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [row[1] for row in lines] == [templates["blue"], templates["red"]] and float(lines[0][0]) > 0.9
    out = cli(store, "search", "crimson", env=metric_env)
    assert out.returncode == 0 and out.stdout.splitlines()[0].split("\t")[1] == templates["red"]
    out = cli(store, "scores", templates["red"], env=metric_env)
    assert out.returncode == 0, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == ["dino", "clip_i", "clip_t", "clip_t_full"]
    # without the metric models: names still work, the rest says why
    out = cli(store, "search", "crimson")
    assert out.returncode == 0 and templates["red"] in out.stdout and "Searched names" in out.stderr
    out = cli(store, "scores", templates["red"])
    assert out.returncode == 2 and "scores unavailable" in out.stderr and "STUDIO_DINO_MODEL" in out.stderr
    out = cli(store, "search", "--image", images["red"][0])
    assert out.returncode == 2 and "needs the metric models" in out.stderr


# -- browser ---------------------------------------------------------------------------------------


def shoot(page, name: str) -> None:
    folder = os.environ.get("STUDIO_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(800)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def images_loaded(page, selector: str) -> None:
    page.wait_for_function(f"() => [...document.querySelectorAll('{selector} img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")


def test_browser_search_scores_and_similar(browser, app, templates, images):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.goto(app.url, wait_until="domcontentloaded")

    # -- the gallery, searched by a dropped picture: the red template first, selected, with its scores
    page.get_by_role("tab", name="Gallery").click()
    expect(page.locator("#gallery img")).to_have_count(2)
    page.locator("#search-image input[type=file]").set_input_files(images["red_query"][0])
    expect(page.locator("#gallery")).to_contain_text("Most like your picture, best first")
    expect(page.locator("#gallery").get_by_label("Thumbnail 1 of 2")).to_contain_text("Crimson poster")
    expect(page.locator("#template-card")).to_contain_text("Crimson poster")
    expect(page.locator("#template-scores")).to_contain_text("Style (DINO)")
    expect(page.locator("#template-scores")).to_contain_text("Prompt (CLIP-T)")
    expect(page.locator(".hint").filter(has_text="Most like your picture: Crimson poster").first).to_contain_text(
        "% alike")
    images_loaded(page, "#gallery")
    shoot(page, "search")

    # -- a text search: names first
    page.locator("#search-image").get_by_role("button", name="Remove Image").click()
    page.locator("#template-search input, #template-search textarea").first.fill("watercolor")
    expect(page.locator("#template-card")).to_contain_text("Blue wash")
    expect(page.locator("#template-scores")).to_contain_text("Style (CLIP)")

    # -- the Train tab: new red references -> "you may already have this style" -> use it instead
    page.get_by_role("tab", name="Train").click()
    page.locator("#ref-images input[type=file]").set_input_files(images["red_query"])
    expect(page.locator("#similar-note")).to_contain_text("You may already have this style")
    expect(page.locator("#similar-note")).to_contain_text("Crimson poster (100 % alike)")
    expect(page.locator("#similar-templates")).to_contain_text("Crimson poster")
    expect(page.locator("#similar-use")).to_contain_text("Use “Crimson poster” instead")
    images_loaded(page, "#similar-templates")
    shoot(page, "similar")
    page.locator("#similar-use").click()
    expect(page.locator("#gen-prompt textarea")).to_have_value("a cozy wood cabin in the snow in bold red poster style")
    ctx.close()


# -- an app without the metric models ----------------------------------------------------------------


def test_without_metric_models_the_studio_says_why(tmp_path_factory, tiny_folder, templates, images, client,
                                                   browser):
    zipped = client.predict(templates["blue"], "zip", api_name="/export_template")
    bare = start_app(tmp_path_factory.mktemp("no-metrics"),
                     env={"STUDIO_DINO_MODEL": "/nonexistent/dino", "STUDIO_CLIP_MODEL": "/nonexistent/clip"},
                     worker=False)  # import, scores and search run in the web process
    try:
        c = Client(bare.url, verbose=False, analytics_enabled=False)
        tid = c.predict(handle_file(zipped), api_name="/import_template")["id"]
        scores = c.predict(tid, api_name="/template_scores")
        assert scores["available"] is False and "STUDIO_DINO_MODEL" in scores["reason"]
        found = c.predict("wash", None, None, api_name="/search_templates")
        assert found["mode"] == "names" and found["results"][0]["id"] == tid and "metric models" in found["note"]
        assert "needs the metric models" in error_of(c, "", handle_file(images["red"][0]), None,
                                                     api_name="/search_templates")
        quiet = c.predict([handle_file(images["red"][0])], None, None, api_name="/similar_templates")
        assert quiet["results"] == [] and quiet["mode"] == "unavailable"
        c.close()

        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.goto(bare.url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Gallery").click()
        expect(page.locator("#template-card")).to_contain_text("Blue wash")
        expect(page.locator("#template-scores")).to_contain_text("Scores unavailable")
        expect(page.locator("#template-scores")).to_contain_text("STUDIO_DINO_MODEL")
        ctx.close()
    finally:
        bare.kill()
