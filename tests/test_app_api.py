"""The app's public API through gradio_client, against the real app and worker on the tiny backbone."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
from app_helpers import SHARED_MAX_UPLOAD_MB, wait_done
from gradio_client import Client, handle_file
from PIL import Image

pytestmark = pytest.mark.slow  # starts the app or a worker process

ENDPOINTS = {"/train", "/job_status", "/cancel", "/templates", "/template", "/generate", "/export_template",
             "/import_template", "/import_hub", "/rename_template", "/delete_template", "/share_template",
             "/search_templates", "/similar_templates", "/template_scores", "/refine_candidates", "/refine",
             "/jobs", "/resume_job", "/save_checkpoint", "/retry_job", "/delete_job", "/job_settings",
             "/generation_history", "/inspect_references", "/auto_caption", "/caption_status", "/captioner_status"}

FAST = {"steps": 12, "preview_every": 6, "grad_accum": 1, "rank": 4}
MAX_UPLOAD_MB = SHARED_MAX_UPLOAD_MB  # the shared app's --max-upload-mb


@pytest.fixture(scope="module")
def client(app):
    c = Client(app.url, verbose=False, analytics_enabled=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("refs") / "ref.png"
    img = Image.new("RGB", (96, 64), (230, 120, 40))
    img.paste((40, 90, 200), (0, 0, 48, 32))
    img.save(path)
    return str(path)


@pytest.fixture(scope="module")
def template(client, ref) -> dict:
    job = client.predict([handle_file(ref)], "flat poster", "", FAST, api_name="/train")
    status = wait_done(client, job)
    assert status["state"] == "done", status["error"]
    return status


def png_params(path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["studio"])


def error_of(client, *args, api_name) -> str:
    with pytest.raises(Exception) as info:  # gradio_client's AppError, or an upload refusal
        client.predict(*args, api_name=api_name)
    return str(info.value)


def test_every_endpoint_is_named(client):
    """The stable API: every name the README documents, and no public endpoint it does not."""
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert named == ENDPOINTS


def test_train_reports_progress_and_makes_a_template(client, template):
    assert template["total_steps"] == FAST["steps"] and len(template["losses"]) == FAST["steps"]
    assert [p["step"] for p in template["previews"]] == [0, 6, 12]  # step 0 = the base model
    assert template["template_id"] and template["queue_position"] is None and template["error"] is None
    listed = client.predict(api_name="/templates")["templates"]
    mine = next(t for t in listed if t["id"] == template["template_id"])
    assert mine["name"] == "Flat poster"  # suggested from the style prompt
    assert mine["style_prompt"] == "flat poster" and mine["backbone"] == "tiny" and mine["thumbnail"]
    assert client.predict(mine["id"], api_name="/template")["previews"]
    assert client.predict("poster", api_name="/templates")["total"] >= 1
    assert client.predict("zebra", api_name="/templates") == {"templates": [], "total": 0, "offset": 0, "limit": 48}


def test_generate_text_to_image_comic_and_meme(client, template):
    tid = template["template_id"]
    files = client.predict(tid, "a wood cabin", "text-to-image", {"num_images": 2, "seed": 7, "steps": 4},
                           api_name="/generate")
    assert len(files) == 2
    params = png_params(files[0])
    assert params["final_prompt"] == "a wood cabin in flat poster style" and params["seed"] == 7

    panels = ["a cat wakes up | Monday.", "a cat eats", "a cat sleeps | The end", "a cat dreams"]
    page, = client.predict(tid, "", "multi-panel", {"panels": panels, "layout": "2x2", "steps": 4, "gutter": 8,
                                                    "border": 2}, api_name="/generate")
    with Image.open(page) as img:
        assert img.width > 2 * 64 and img.height > 2 * 64
    params = png_params(page)
    assert params["mode"] == "multi-panel" and len(params["panels"]) == 4 and params["layout"] == "2x2"

    meme, = client.predict(tid, "a grumpy cat", "meme", {"top": "one does not simply", "bottom": "train a lora",
                                                          "steps": 4}, api_name="/generate")
    assert png_params(meme)["top"] == "one does not simply"
    shot, = client.predict(tid, "a comic page", "multi-panel", {"single_shot": True, "steps": 2},
                           api_name="/generate")
    with Image.open(shot) as img:  # the reference was 3:2
        assert img.width > img.height

    # The history keeps all of it, newest first, a comic page as the page (not its four panels).
    history = client.predict(tid, 20, api_name="/generation_history")
    asked = ["a comic page", "a grumpy cat", "a cat wakes up", "a wood cabin", "a wood cabin"]
    assert len(history) == 5 and all(h["prompt"].startswith(a) for h, a in zip(history, asked, strict=True)), history
    assert history[2]["prompt"].count(" | ") == 3  # the page's four panels
    assert Path(history[2]["image"]).name.startswith("comic_") and all(h["template_id"] == tid for h in history)
    assert png_params(history[0]["image"])["seed"] == png_params(shot)["seed"]  # the settings travel in the PNG
    assert len(client.predict(tid, 1, api_name="/generation_history")) == 1
    rows = client.predict("generate", 100, api_name="/jobs")
    assert {r["kind"] for r in rows} == {"generate"} and all(r["state"] == "done" for r in rows)
    assert "kind must be train or generate" in error_of(client, "painting", 5, api_name="/jobs")


def test_export_import_rename_delete(client, template, tmp_path):
    tid = template["template_id"]
    zipped = client.predict(tid, "zip", api_name="/export_template")
    assert Path(zipped).suffix == ".zip" and "template.json" in zipfile.ZipFile(zipped).namelist()
    for fmt, suffix in (("safetensors", ".safetensors"), ("comfy", "_comfy.safetensors")):
        assert client.predict(tid, fmt, api_name="/export_template").endswith(suffix)
    imported = client.predict(handle_file(zipped), api_name="/import_template")
    assert imported["id"] != tid and imported["style_prompt"] == "flat poster"
    renamed = client.predict(imported["id"], "My copy", api_name="/rename_template")
    assert renamed["name"] == "My copy"
    assert client.predict(imported["id"], api_name="/delete_template") == {"deleted": imported["id"]}
    assert imported["id"] not in {t["id"] for t in client.predict(api_name="/templates")["templates"]}
    assert "no template" in error_of(client, imported["id"], api_name="/delete_template")


def test_cancel_a_running_training(client, ref):
    job = client.predict([handle_file(ref)], "slow style", "slow", {**FAST, "steps": 5000}, api_name="/train")
    deadline = time.monotonic() + 60
    while client.predict(job, api_name="/job_status")["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    client.predict(job, api_name="/cancel")
    assert wait_done(client, job, 60)["state"] == "cancelled"


def test_bad_inputs_get_clear_errors_and_the_app_keeps_serving(client, ref, tmp_path, template):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert "not a supported image" in error_of(client, [handle_file(str(text))], "style", "", FAST,
                                               api_name="/train")
    truncated = tmp_path / "broken.png"
    truncated.write_bytes(Path(ref).read_bytes()[:120])
    assert "truncated or corrupt" in error_of(client, [handle_file(str(truncated))], "style", "", FAST,
                                              api_name="/train")
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 10))
    message = error_of(client, [handle_file(str(huge))], "style", "", FAST, api_name="/train")
    assert "large" in message.lower() or "size" in message.lower()
    assert "style prompt is empty" in error_of(client, [handle_file(ref)], "  ", "", FAST, api_name="/train")
    assert "Add at least one reference image" in error_of(client, [], "style", "", FAST, api_name="/train")
    assert "unknown recipe setting" in error_of(client, [handle_file(ref)], "style", "", {"stepz": 3},
                                                api_name="/train")
    assert "prompt is empty" in error_of(client, template["template_id"], " ", "text-to-image", {},
                                         api_name="/generate")
    assert "unknown mode" in error_of(client, "", "a cat", "video", {}, api_name="/generate")
    assert "2 to 6 panel prompts" in error_of(client, "", "", "multi-panel", {"panels": ["one"]},
                                              api_name="/generate")
    assert "no job" in error_of(client, "20990101-000000-train-deadbeef", api_name="/job_status")
    assert "unsupported file type" in error_of(client, handle_file(str(text)), api_name="/import_template")
    assert "offline" in error_of(client, template["template_id"], "me/style", "hf_token", True,
                                 api_name="/share_template")
    # ...and it still serves
    assert client.predict(api_name="/templates")["templates"]


def test_a_poisoned_import_cannot_break_the_listing(client, template, tmp_path):
    """An imported template.json with gradio file objects in its lineage (gradio_client downloads any
    {"path", "meta": {"_type": "gradio.FileData"}} it gets, and the server refuses such a path) must not
    make /templates and /search_templates fail for everyone: imports keep only the schema's fields."""
    zipped = client.predict(template["template_id"], "zip", api_name="/export_template")
    members = {n: zipfile.ZipFile(zipped).read(n) for n in zipfile.ZipFile(zipped).namelist()}
    meta = json.loads(members["template.json"])
    poison = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}, "orig_name": "hostname"}
    meta.update(name="Poisoned poster", parent=template["template_id"], round=2, extra=poison,
                previews=meta["previews"] + [poison],
                refine={"mode": "human", "parent_name": "Flat poster",
                        "synthetic": [poison, {**poison, "prompt": "a cat", "file": meta["references"][0]}]})
    members["template.json"] = json.dumps(meta).encode()
    bad = tmp_path / "poisoned.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    imported = client.predict(handle_file(str(bad)), api_name="/import_template")
    assert imported["lineage"]["synthetic"] == [{"prompt": "a cat", "file": meta["references"][0],
                                                  "image": imported["references"][0]}]
    assert imported["id"] in {t["id"] for t in client.predict(api_name="/templates")["templates"]}
    found = client.predict("poisoned", None, None, api_name="/search_templates")
    assert found["results"][0]["id"] == imported["id"]
    assert client.predict(imported["id"], api_name="/template")["round"] == 2
    client.predict(imported["id"], api_name="/delete_template")


def test_templates_come_in_pages(client, template):
    everything = client.predict("", 0, 200, api_name="/templates")
    assert everything["total"] == len(everything["templates"]) >= 1 and everything["limit"] == 200
    one = client.predict("", everything["total"] - 1, 1, api_name="/templates")
    assert one["templates"] == everything["templates"][-1:] and one["total"] == everything["total"]
    assert "whole number" in error_of(client, "", -1, None, api_name="/templates")


def test_train_refuses_a_backbone_the_operator_did_not_allow(client, ref, tiny_folder):
    for backbone in ("someone/any-model", str(tiny_folder)):
        message = error_of(client, [handle_file(ref)], "style", "", {**FAST, "backbone": backbone}, api_name="/train")
        assert "is not allowed here" in message


def test_bad_values_are_refused_at_the_door(client, ref):
    """Options that are not an object are refused, not ignored (that ran the defaults); a bool is not a
    number; sizes and seeds out of range never reach the worker (tests/test_validation.py has the full table)."""
    for options in (["steps", 2], "steps=2"):
        assert "options must be a JSON object" in error_of(client, "", "a cat", "text-to-image", options,
                                                           api_name="/generate")
        assert "options must be a JSON object" in error_of(client, [handle_file(ref)], "style", "", options,
                                                           api_name="/train")
    assert "LoRA rank must be a whole number" in error_of(client, [handle_file(ref)], "style", "",
                                                          {**FAST, "rank": True}, api_name="/train")
    assert "width must be a multiple of 16 from 32 to 2048" in error_of(
        client, "", "a cat", "text-to-image", {"width": 33, "steps": 1}, api_name="/generate")
    assert "seed must be a whole number" in error_of(client, "", "a cat", "text-to-image",
                                                     {"seed": 2**70, "steps": 1}, api_name="/generate")
    assert "gutter (px) must be a whole number" in error_of(
        client, "", "", "multi-panel", {"panels": ["a cat", "a dog"], "gutter": 10**9, "steps": 1},
        api_name="/generate")
    assert "top caption is too long" in error_of(client, "", "a cat", "meme", {"top": "x" * 400, "steps": 1},
                                                 api_name="/generate")
    assert client.predict(api_name="/templates") is not None  # still serving


# -- the pure helpers behind the page (no server needed) ------------------------------------------


def test_page_helpers():
    from studio.api import suggest_name
    from studio.ui import present

    assert suggest_name("watercolor painting, soft edges!") == "Watercolor painting soft edges"
    assert suggest_name("ink", {"Ink", "ink 2"}) == "Ink 3"
    assert present.rewrap_prompt("a cat in ink style", "ink", "watercolor") == "a cat in watercolor style"
    assert present.rewrap_prompt("a cat", None, "ink") == "a cat in ink style"
    assert present.rewrap_prompt("a cat in ink style", "ink", "") == "a cat"
    frame = present.loss_frame([1.0, 0.5, None, 0.25])
    assert set(frame["series"]) == {"raw", "smoothed"} and len(frame) == 6 and present.loss_frame([]) is None
    t = present.t_frame([0.95, 0.97, 0.5], {"sampler": "style_friendly"}, "tiny")
    assert set(t["sampler"]) == {"this run", "style-friendly", "SD3 baseline"}
    sf = t[t["sampler"] == "style-friendly"]
    assert sf["density"].iloc[-1] > sf["density"].iloc[len(sf) // 2]  # mass at high noise
    html = present.status_html({"state": "running", "step": 5, "total_steps": 20, "sec_per_step": 0.5,
                                "eta_s": 7.5, "name": "<b>x</b>", "message": "training"})
    assert "step 5 / 20" in html and "2.00 it/s" in html and "ETA 0:08" in html and "&lt;b&gt;" in html
    assert 'width:25.0%' in html
    queued = present.status_html({"state": "queued", "queue_position": 2, "name": "x", "message": ""})
    assert "position 2 in the queue" in queued
    items = present.preview_items([{"step": 0, "files": ["a", "b"]}, {"step": 10, "files": ["c", "d"]}],
                                  ["a robot", "a penguin"])
    assert items[0] == ("c", "step 10 · a robot") and items[-1] == ("b", "step 0 · base model · a penguin")
    assert present.final_previews(["p/step_0000_p0.png", "p/step_0020_p0.png", "p/step_0020_p1.png"]) == \
        ["p/step_0020_p0.png", "p/step_0020_p1.png"]


def test_a_template_without_pictures_still_gets_a_tile():
    """A LoRA imported without previews is shown as a card with its name, not left out of the gallery
    (which would also shift every later tile's selection onto the wrong template)."""
    from studio.ui import present

    bare = {"id": "ink", "name": "Ink wash", "thumbnail": None, "previews": [], "references": []}
    pictured = {"id": "red", "name": "Red", "thumbnail": None, "previews": ["a.png", "b.png"], "references": []}
    items = present.gallery_items([bare, pictured])
    assert [name for _, name in items] == ["Ink wash", "Red"] and items[1][0] == "b.png"
    with Image.open(items[0][0]) as card:
        assert card.size == (384, 384) and len(set(card.convert("L").getdata())) > 2  # text was drawn
    assert present.tile_image(bare) == items[0][0]  # made once, reused


def test_the_gallery_shows_a_page_at_a_time(tmp_path):
    """A big store is shown a page of tiles at a time, with newer / older buttons (no browser needed)."""
    import gradio as gr
    from test_templates import write_templates

    from studio.api import StudioAPI
    from studio.jobs.jobs import Jobs
    from studio.ui import gallery_tab

    jobs = Jobs(tmp_path / "data")
    write_templates(jobs.store, 60)
    with gr.Blocks():
        ui = gallery_tab.build(StudioAPI(jobs))
    refresh, _, outputs = ui.refresh

    def shown(offset):
        out = dict(zip(outputs, refresh("", "", None, offset), strict=True))
        return (out[ui.ids], out[ui.offset], out[ui.pager].visible, out[ui.prev_page].interactive,
                out[ui.next_page].interactive, out[ui.page_label])

    size = gallery_tab.PAGE_SIZE
    ids, offset, visible, newer, older, label = shown(0)
    assert ids == [f"t{i:03d}" for i in range(59, 59 - size, -1)] and offset == 0
    assert visible and not newer and older and label == f"1–{size} of 60"
    ids, offset, _, newer, older, label = shown(2 * size)
    assert ids[-1] == "t000" and offset == 2 * size and newer and not older and label.endswith("of 60")
    assert shown(1000)[1] == 2 * size  # past the end (templates were deleted): the last page
    jobs.queue.close()


@pytest.mark.stops_shared_app
def test_ctrl_c_stops_the_app_and_its_worker(app):
    """Last of all (it stops the shared app): Ctrl-C ends the web process, which stops its worker."""
    import os

    status = next((app.root / "runs" / ".workers").glob("*.json"))
    worker_pid = json.loads(status.read_text())["pid"]
    deadline = time.monotonic() + 120  # idle first: a busy worker finishes its step (tests/test_worker.py)
    while json.loads(status.read_text())["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.3)
    started = time.monotonic()
    app.stop()
    assert app.proc.returncode == 0 and time.monotonic() - started < 40, app.tail()
    with pytest.raises(ProcessLookupError):  # the worker is gone too (it is not a child of the test)
        os.kill(worker_pid, 0)
    assert not status.exists()  # it said goodbye: its status file is removed on a clean exit
