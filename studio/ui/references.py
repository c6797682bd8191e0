"""The Train tab's reference grid: one tile per dropped picture, its caption box, crop and remove.

Files are checked as they are dropped (``StudioAPI.inspect_references``): a good one shows its
thumbnail as it will be trained, a bad one its own tile with the one-line reason, and is left out.
Captions: what the user typed always wins (``ui.typed``; a redraw is not typing), then a ``.txt``
caption that came with the picture, then the auto caption (a caption job on the worker, polled
here and written into the tiles as the pictures are done). Wiring only: the work is in the API.
"""

from __future__ import annotations

import html
from types import SimpleNamespace

import gradio as gr

from studio.api import StudioAPI
from studio.errors import StudioError
from studio.jobs.records import FINAL
from studio.media.images import MAX_REFERENCE_IMAGES

CAPTION_PLACEHOLDER = "what it shows, e.g. a fox in the snow"


def tile_caption(tile: dict, typed: dict) -> str:
    """The caption a tile trains with: typed (even cleared) > its .txt caption > the auto caption."""
    key = str(tile["key"])
    if key in typed:
        return typed[key] or ""
    return tile.get("caption") or tile.get("auto") or ""


def captions_hint(status: dict) -> str:
    """The line under the grid: what a caption is for, and what auto-captioning needs."""
    base = ("Each box says **what its picture shows** (“a fox in the snow”), not the style: it is trained as "
            "“a fox in the snow in *your style* style”. Empty boxes train as “an image”.")
    if status["available"]:
        extra = f" ({status['note']})" if status.get("note") else ""
        return (f"{base} Auto-caption fills the empty boxes with {status['model'].rsplit('/', 1)[-1]} "
                f"({status['size']}){extra}; your own words always win.")
    return f"{base} <span class='hint'>Auto-captioning is off: {html.escape(status['note'])}.</span>"


def tile_view(ui: SimpleNamespace, tile: dict, typed: dict) -> None:
    """One tile of the grid (inside ``gr.render``): thumbnail or reason, caption box, Crop, Remove."""
    key = str(tile["key"])
    name = html.escape(tile["name"])
    with gr.Column(min_width=160, key=f"tile-{key}", elem_classes=["ref-tile"] + ([] if tile["ok"] else ["bad"])):
        if tile["ok"]:
            gr.Image(tile["thumbnail"], show_label=False, interactive=False, height=140, buttons=[],
                     container=False, key=f"img-{key}-{tile.get('version', 0)}", elem_classes="tile-img")
            size = f"{tile['width']}×{tile['height']} px" + (" · cropped" if tile.get("crop") else "")
            gr.HTML(f"<div class='tile-meta' title='{name}'><b>{name}</b><span>{size} as trained</span></div>",
                    padding=False)
            box = gr.Textbox(tile_caption(tile, typed), show_label=False, placeholder=CAPTION_PLACEHOLDER,
                             max_lines=3, lines=2, container=False, key=f"cap-{key}", preserved_by_key=None,
                             elem_classes="tile-caption")

            def typed_now(value: str, typed: dict, tiles: list):
                """A box changed: what the user typed is kept (a redraw showing a .txt / auto caption is not typing)."""
                typed = typed or {}
                shown = next((t.get("caption") or t.get("auto") or "" for t in tiles or [] if str(t["key"]) == key), "")
                if key not in typed and (value or "") == shown:
                    return gr.skip()
                return {**typed, key: value or ""}

            box.change(typed_now, [box, ui.typed, ui.tiles], ui.typed, api_visibility="private",
                       trigger_mode="always_last")
        else:
            gr.HTML(f"<div class='tile-bad' role='alert'><b>{name}</b><span>{html.escape(tile['error'] or '')}</span>"
                    "<em>left out of the training</em></div>", padding=False)
        with gr.Row(elem_classes="tile-actions"):
            if tile["ok"]:
                crop = gr.Button("Crop", size="sm", key=f"crop-{key}", elem_classes="tile-crop")
                crop.click(lambda tiles: _open_crop(tiles, key), ui.tiles,
                           [ui.crop_panel, ui.crop_key, ui.crop_title, ui.crop_left, ui.crop_top, ui.crop_right,
                            ui.crop_bottom], api_visibility="private", queue=False)
            remove = gr.Button("Remove", size="sm", variant="stop", key=f"remove-{key}", elem_classes="tile-remove")
            remove.click(lambda tiles: [t for t in tiles or [] if str(t["key"]) != key], ui.tiles, ui.tiles,
                         api_visibility="private", queue=False)


def _open_crop(tiles: list, key: str):
    tile = next((t for t in tiles or [] if str(t["key"]) == key), None)
    if tile is None:
        return (gr.skip(),) * 7
    left, top, right, bottom = tile.get("crop") or (0.0, 0.0, 1.0, 1.0)
    title = (f"**Crop {html.escape(tile['name'])}**: keep only the part that shows the style (a picture inside "
             f"a scan or a screenshot). The edges are percentages of the picture.")
    return (gr.Group(visible=True), key, title, round(left * 100), round(top * 100), round(right * 100),
            round(bottom * 100))


def _resolution(value) -> int | None:
    return None if value in (None, "", "auto") else int(value)


def wire_references(api: StudioAPI, ui: SimpleNamespace) -> None:
    """Dropping files, auto-captioning and cropping (the tiles' own buttons are wired in :func:`tile_view`)."""

    def add_files(files, tiles, resolution):
        """Check the dropped files and add a tile for each; the drop zone empties for the next drop."""
        paths = [str(f) for f in files or []]
        if not paths:
            return gr.skip(), gr.skip()
        try:
            found = api.inspect_references(paths, {"resolution": _resolution(resolution)})
        except StudioError as exc:
            gr.Warning(str(exc))
            return gr.skip(), None
        tiles = list(tiles or [])
        next_key = max((int(t["key"]) for t in tiles), default=-1) + 1
        good = sum(1 for t in tiles if t["ok"])
        for tile in found:
            tile["key"] = next_key
            next_key += 1
            if tile["ok"]:
                good += 1
                if good > MAX_REFERENCE_IMAGES:
                    tile.update(ok=False, error=f"over the limit of {MAX_REFERENCE_IMAGES} reference images")
            tiles.append(tile)
        return tiles, None

    ui.refs.change(add_files, [ui.refs, ui.tiles, ui.resolution], [ui.tiles, ui.refs], api_visibility="private",
                   trigger_mode="always_last")

    def start_captions(tiles, typed, style):
        """Auto-caption the pictures whose box is empty, on the worker."""
        todo = [t for t in tiles or [] if t["ok"] and not tile_caption(t, typed or {}).strip()]
        if not todo:
            gr.Info("Every picture has a caption already; empty a box to have it captioned.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            job_id = api.auto_caption([t["file"] for t in todo], style, {"crops": [t.get("crop") for t in todo]})
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
        note = f"Captioning {len(todo)} picture(s) on the worker…"
        return ({"id": job_id, "keys": [t["key"] for t in todo]}, note, gr.Timer(active=True),
                gr.Button(visible=True))

    ui.auto_caption.click(start_captions, [ui.tiles, ui.typed, ui.style],
                          [ui.caption_job, ui.caption_note, ui.caption_timer, ui.caption_stop],
                          api_visibility="private")

    def poll_captions(job, tiles):
        """One poll of the caption job: new captions go into their tiles (a typed caption still wins)."""
        if not job.get("id"):
            return gr.skip(), gr.skip(), gr.Timer(active=False), gr.Button(visible=False)
        try:
            status = api.caption_status(job["id"])
        except StudioError as exc:
            return gr.skip(), str(exc), gr.Timer(active=False), gr.Button(visible=False)
        found = dict(zip(job["keys"], status["captions"], strict=False))
        changed = False
        new_tiles = []
        for tile in tiles or []:
            caption = found.get(tile["key"])
            if caption and tile.get("auto") != caption:
                tile, changed = {**tile, "auto": caption}, True
            new_tiles.append(tile)
        ended = status["state"] in FINAL
        if not ended:
            note = f"Captioning: {status['done']} of {status['total']} done · {status['message']}"
        elif status["state"] == "done":
            note = (f"Auto-captioned {sum(1 for c in status['captions'] if c)} of {status['total']} picture(s): "
                    "read them and edit any you like; your words win.")
        else:
            note = f"Auto-captioning {status['state']}: {status['error'] or status['message']}"
        return (new_tiles if changed else gr.skip(), note, gr.Timer(active=not ended), gr.Button(visible=not ended))

    ui.caption_timer.tick(poll_captions, [ui.caption_job, ui.tiles],
                          [ui.tiles, ui.caption_note, ui.caption_timer, ui.caption_stop], api_visibility="private")

    def stop_captions(job):
        if job.get("id"):
            api.cancel(job["id"])
        return "Stopping the captioning…"

    ui.caption_stop.click(stop_captions, ui.caption_job, ui.caption_note, api_visibility="private")

    def apply_crop(key, tiles, left, top, right, bottom, resolution, whole=False):
        tile = next((t for t in tiles or [] if str(t["key"]) == key), None)
        if tile is None:
            return gr.skip(), gr.Group(visible=False)
        box = None if whole else [left / 100, top / 100, right / 100, bottom / 100]
        try:
            (fresh,) = api.inspect_references([tile["file"]], {"resolution": _resolution(resolution), "crops": [box]})
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
        if not fresh["ok"]:
            raise gr.Error(fresh["error"])
        crop = None if whole or box == [0, 0, 1, 1] else box
        updated = {**tile, "thumbnail": fresh["thumbnail"], "width": fresh["width"], "height": fresh["height"],
                   "crop": crop, "version": int(tile.get("version", 0)) + 1}
        return [updated if str(t["key"]) == key else t for t in tiles], gr.Group(visible=False)

    crop_inputs = [ui.crop_key, ui.tiles, ui.crop_left, ui.crop_top, ui.crop_right, ui.crop_bottom, ui.resolution]
    ui.crop_apply.click(apply_crop, crop_inputs, [ui.tiles, ui.crop_panel], api_visibility="private")
    ui.crop_reset.click(lambda *a: apply_crop(*a, whole=True), crop_inputs, [ui.tiles, ui.crop_panel],
                        api_visibility="private")
    ui.crop_close.click(lambda: gr.Group(visible=False), None, ui.crop_panel, api_visibility="private", queue=False)

    def redraw(tiles, resolution):
        """Another resolution: every good tile shows the picture at the new training size."""
        good = [t for t in tiles or [] if t["ok"]]
        if not good:
            return gr.skip()
        try:
            fresh = api.inspect_references([t["file"] for t in good], {"resolution": _resolution(resolution),
                                                                       "crops": [t.get("crop") for t in good]})
        except StudioError:
            return gr.skip()  # a file that vanished meanwhile: the tiles stay as they were; Train says why
        redrawn = {str(t["key"]): {**t, "thumbnail": f["thumbnail"], "width": f["width"], "height": f["height"],
                                   "version": int(t.get("version", 0)) + 1}
                   for t, f in zip(good, fresh, strict=True) if f["ok"]}
        return [redrawn.get(str(t["key"]), t) for t in tiles]

    ui.resolution.change(redraw, [ui.tiles, ui.resolution], ui.tiles, api_visibility="private",
                         trigger_mode="always_last")
