"""Gallery tab: the saved style templates, their details and every action on them."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.api import StudioAPI
from studio.errors import StudioError
from studio.ui import present, refine_panel
from studio.ui.common import guard

EXPORTS = [("Template (.zip)", "zip"), ("LoRA for diffusers (.safetensors)", "safetensors"),
           ("LoRA for ComfyUI (.safetensors)", "comfy")]
SEARCH_K = 24  # search results shown in the gallery
PAGE_SIZE = 24  # tiles per gallery page (a big store is shown a page at a time)


def build(api: StudioAPI) -> SimpleNamespace:
    """Lay out the Gallery tab and wire its own events; returns its components."""
    ui = SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column(scale=6, min_width=320):
            with gr.Row(equal_height=True, elem_id="search-row"):
                ui.search = gr.Textbox(label="Find a style", placeholder="type a name or words like “watercolor”",
                                       elem_id="template-search", max_lines=1, scale=3,
                                       info="Matches names and style prompts first, then how the templates look.")
                ui.search_image = gr.Image(type="filepath", label="…or drop a picture", sources=["upload", "clipboard"],
                                           height=120, elem_id="search-image", scale=2, min_width=160,
                                           buttons=[])
            ui.gallery = gr.Gallery(label="Your style templates — click one", columns=4, height=340,
                                    object_fit="cover", allow_preview=False, elem_id="gallery", buttons=[],
                                    fit_columns=False)
            with gr.Row(equal_height=True, elem_id="gallery-pager", visible=False) as ui.pager:
                ui.prev_page = gr.Button("← Newer", size="sm", interactive=False, elem_id="gallery-prev", scale=1)
                ui.page_label = gr.Markdown("", elem_id="gallery-page")
                ui.next_page = gr.Button("Older →", size="sm", interactive=False, elem_id="gallery-next", scale=1)
            ui.empty = gr.Markdown("", elem_classes="hint")
            with gr.Accordion("Import a template", open=False, elem_id="import-box"):
                ui.import_file = gr.File(label="A template .zip or a LoRA .safetensors",
                                         file_types=[".zip", ".safetensors"], elem_id="import-file", height=110)
                ui.hub_repo = gr.Textbox(label="…or a Hugging Face model repo", placeholder="user/my-style-lora",
                                         max_lines=1, elem_id="import-repo")
                ui.hub_read_token = gr.Textbox(label="Hugging Face token (only for private repos; never stored)",
                                               type="password", max_lines=1)
                ui.import_btn = gr.Button("Import", elem_id="import-button")
        with gr.Column(scale=5, min_width=320):
            ui.card = gr.Markdown(present.template_card(None), elem_id="template-card")
            ui.scores = gr.Markdown("", elem_id="template-scores")
            ui.strip = gr.Gallery(label="Its previews after training", rows=1, columns=4, height=150,
                                  object_fit="contain", elem_id="template-previews", buttons=["fullscreen"])
            ui.use = gr.Button("Generate with it →", variant="primary", elem_id="gallery-generate", interactive=False)
            with gr.Group():
                ui.fmt = gr.Radio(EXPORTS, value="zip", label="Download as", elem_id="export-format")
                ui.export = gr.Button("Download", elem_id="export-button", interactive=False)
                ui.export_file = gr.File(label="Your file", visible=False, elem_id="export-file", interactive=False)
            ui.refine = refine_panel.build()  # StyleDrop's round 2 (studio.styles.refine); wired below
            with gr.Accordion("Rename or delete", open=False, elem_id="manage-box"):
                with gr.Row():
                    ui.new_name = gr.Textbox(label="New name", max_lines=1, scale=3, elem_id="rename-box")
                    ui.rename = gr.Button("Rename", scale=1, elem_id="rename-button")
                ui.delete = gr.Button("Delete this template…", variant="stop", elem_id="delete-button")
                with gr.Row(visible=False) as ui.confirm_row:
                    ui.confirm_text = gr.Markdown()
                    ui.confirm = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete")
                    ui.keep = gr.Button("Keep it")
            with gr.Accordion("Share on the Hugging Face Hub", open=False, elem_id="share-box"):
                gr.Markdown("Uploads the LoRA, its previews and a model card (base model, trigger words, a "
                            "diffusers snippet) to a model repository.", elem_classes="hint")
                ui.repo = gr.Textbox(label="Repository name", placeholder="my-watercolor-style or user/my-style",
                                     max_lines=1, elem_id="share-repo")
                ui.token = gr.Textbox(label="Hugging Face token with write access (used once, never stored)",
                                      type="password", max_lines=1, elem_id="share-token")
                ui.private = gr.Checkbox(True, label="Private repository")
                ui.share = gr.Button("Share", elem_id="share-button")
                ui.share_result = gr.Markdown()
    ui.ids = gr.State([])
    ui.selected = gr.State("")
    ui.offset = gr.State(0)  # the first tile's position in the listing (browsing, not searching)
    refine_panel.wire(api, ui.refine, ui.selected)

    def listing(offset):
        """One page of the listing from ``offset`` (the last page when the store shrank below it)."""
        page = api.templates(None, offset, PAGE_SIZE)
        if not page["templates"] and page["total"] and offset:
            page = api.templates(None, (page["total"] - 1) // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE)
        return page

    def pager(page):
        """The page controls: the offset, newer / older buttons and "25–48 of 574" (hidden when all fit)."""
        if page is None:  # search results: no paging
            return 0, gr.Row(visible=False), gr.Button(interactive=False), gr.Button(interactive=False), ""
        shown, total, first = len(page["templates"]), page["total"], page["offset"]
        label = f"{first + 1}–{first + shown} of {total}" if shown else ""
        return (first, gr.Row(visible=total > PAGE_SIZE), gr.Button(interactive=first > 0),
                gr.Button(interactive=first + shown < total), label)

    def refresh(query, selected, image=None, offset=0):
        """Reload the page of the list at ``offset`` (or the search results for a text / a dropped picture);
        keep the selection if it is still shown, else select the first tile (the newest, or the best match)."""
        note, found, page = "", None, None
        if image or (query or "").strip():
            try:
                found = api.search_templates(query, image, SEARCH_K)
                templates, items, note = found["results"], present.search_items(found), present.search_note(found)
            except StudioError as exc:  # e.g. a picture that is not an image: say so, keep showing everything
                page, note = listing(0), f"⚠️ {exc}"
                templates = page["templates"]
                items = present.gallery_items(templates)
        else:
            page = listing(offset or 0)
            templates = page["templates"]
            items = present.gallery_items(templates)
        ids = [t["id"] for t in templates]  # one tile per template, in order
        gallery = gr.Gallery(value=items, label=present.gallery_label(found))
        selected = selected if selected in ids else (ids[0] if ids else "")
        if templates:
            empty = note
        elif query or image:
            empty = " ".join(x for x in ("" if image else f"No template matches “{query}”.", note) if x)
        else:
            empty = "No templates yet — train one in the **Train** tab, or import one below."
        return (gallery, ids, selected, empty) + details(selected) + pager(page)

    def details(template_id):
        t = api.template(template_id) if template_id else None
        has = t is not None
        strip = [(p, None) for p in (present.final_previews(t["previews"]) if has else [])] or None
        return (present.template_card(t), strip, gr.Button(interactive=has), gr.Button(interactive=has),
                t["name"] if has else "", gr.File(visible=False, value=None), gr.Row(visible=False),
                (t["id"] if has else ""), "")

    detail_outputs = [ui.card, ui.strip, ui.use, ui.export, ui.new_name, ui.export_file, ui.confirm_row,
                      ui.repo, ui.share_result]
    pager_outputs = [ui.offset, ui.pager, ui.prev_page, ui.next_page, ui.page_label]
    ui.refresh = (refresh, [ui.search, ui.selected, ui.search_image],
                  [ui.gallery, ui.ids, ui.selected, ui.empty] + detail_outputs + pager_outputs)

    def newer(query, selected, image, offset):
        return refresh(query, selected, image, max(0, (offset or 0) - PAGE_SIZE))

    def older(query, selected, image, offset):
        return refresh(query, selected, image, (offset or 0) + PAGE_SIZE)

    paging_inputs = [ui.search, ui.selected, ui.search_image, ui.offset]
    ui.prev_page.click(newer, paging_inputs, ui.refresh[2], api_visibility="private")
    ui.next_page.click(older, paging_inputs, ui.refresh[2], api_visibility="private")

    def search(query, selected, image):
        """A new search: show the best match (or, with the search cleared, the newest)."""
        return refresh(query, "", image)

    ui.search.change(search, *ui.refresh[1:], api_visibility="private", trigger_mode="always_last")
    ui.search_image.change(search, *ui.refresh[1:], api_visibility="private", trigger_mode="always_last")

    def scores(template_id):
        """The selected template's scores: computed on its first view (then cached), so after the card."""
        try:
            return present.scores_markdown(api.template_scores(template_id)) if template_id else ""
        except StudioError:  # deleted meanwhile
            return ""

    ui.selected.change(scores, ui.selected, ui.scores, api_visibility="private", trigger_mode="always_last")

    def select(ids, evt: gr.SelectData):
        template_id = ids[evt.index] if evt.index is not None and evt.index < len(ids) else ""
        return (template_id,) + details(template_id)

    ui.gallery.select(select, ui.ids, [ui.selected] + detail_outputs, api_visibility="private")

    @guard
    def export(template_id, fmt):
        path = api.export(template_id, fmt)
        return gr.File(value=str(path), visible=True)

    # The file appears below; the JS step clicks its link so the download starts at once.
    ui.export.click(export, [ui.selected, ui.fmt], ui.export_file, api_visibility="private").success(
        None, js="() => { setTimeout(() => document.querySelector('#export-file a')?.click(), 300); }")

    @guard
    def rename(template_id, name, query, image=None, offset=0):
        api.rename(template_id, name)
        gr.Info(f"Renamed to “{name.strip()}”.")
        return refresh(query, template_id, image, offset)

    ui.rename.click(rename, [ui.selected, ui.new_name, ui.search, ui.search_image, ui.offset], ui.refresh[2],
                    api_visibility="private")

    def ask_delete(template_id):
        t = api.template(template_id) if template_id else None
        if t is None:
            return gr.Row(visible=False), ""
        return gr.Row(visible=True), f"Delete **{t['name']}** for good? This cannot be undone."

    ui.delete.click(ask_delete, ui.selected, [ui.confirm_row, ui.confirm_text], api_visibility="private")
    ui.keep.click(lambda: gr.Row(visible=False), None, ui.confirm_row, api_visibility="private", queue=False)

    @guard
    def delete(template_id, query, image=None, offset=0):
        name = api.template(template_id)["name"]
        api.delete(template_id)
        gr.Info(f"Deleted “{name}”.")
        return refresh(query, "", image, offset)

    ui.confirm.click(delete, [ui.selected, ui.search, ui.search_image, ui.offset], ui.refresh[2],
                     api_visibility="private")

    @guard
    def do_import(file, repo, token, query, image=None):
        if file:
            t = api.import_file(file)
        elif (repo or "").strip():
            t = api.import_hub(repo, token)
        else:
            raise gr.Error("Choose a .zip / .safetensors file, or type a Hugging Face repo id.",
                           print_exception=False)  # a plain input error: nothing for the server log
        gr.Info(f"Imported “{t['name']}”.")
        return refresh(query, t["id"], image) + (None, "", "")

    ui.import_btn.click(do_import, [ui.import_file, ui.hub_repo, ui.hub_read_token, ui.search, ui.search_image],
                        ui.refresh[2] + [ui.import_file, ui.hub_repo, ui.hub_read_token], api_visibility="private")

    @guard
    def share(template_id, repo, token, private):
        if not template_id:
            raise gr.Error("Select a template first.", print_exception=False)
        url = api.share(template_id, repo, token, private)["url"]
        return f"Shared: [{url}]({url})", ""  # the token field is cleared

    ui.share.click(share, [ui.selected, ui.repo, ui.token, ui.private], [ui.share_result, ui.token],
                   api_visibility="private")
    # A round 2 finished (Refine section): select the new template and show it.
    ui.refine.finished.change(lambda template_id: template_id, ui.refine.finished, ui.selected,
                              api_visibility="private").then(*ui.refresh, api_visibility="private")
    return ui
