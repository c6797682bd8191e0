"""Gallery tab: the saved style templates, their details and every action on them."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..api import StudioAPI
from . import present
from .common import guard

EXPORTS = [("Template (.zip)", "zip"), ("LoRA for diffusers (.safetensors)", "safetensors"),
           ("LoRA for ComfyUI (.safetensors)", "comfy")]


def build(api: StudioAPI) -> SimpleNamespace:
    """Lay out the Gallery tab and wire its own events; returns its components."""
    ui = SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column(scale=6, min_width=320):
            ui.search = gr.Textbox(placeholder="Search templates by name or style prompt", show_label=False,
                                   elem_id="template-search", max_lines=1)
            ui.gallery = gr.Gallery(label="Your style templates — click one", columns=4, height=340,
                                    object_fit="cover", allow_preview=False, elem_id="gallery", buttons=[],
                                    fit_columns=False)
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
            ui.strip = gr.Gallery(label="Its previews after training", rows=1, columns=4, height=150,
                                  object_fit="contain", elem_id="template-previews", buttons=["fullscreen"])
            ui.use = gr.Button("Generate with it →", variant="primary", elem_id="gallery-generate", interactive=False)
            with gr.Group():
                ui.fmt = gr.Radio(EXPORTS, value="zip", label="Download as", elem_id="export-format")
                ui.export = gr.Button("Download", elem_id="export-button", interactive=False)
                ui.export_file = gr.File(label="Your file", visible=False, elem_id="export-file", interactive=False)
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

    def refresh(query, selected):
        """Reload the list; keep the selection if it still exists, else select the newest."""
        templates = api.templates(query)
        ids = [t["id"] for t in templates]
        selected = selected if selected in ids else (ids[0] if ids else "")
        if templates:
            empty = ""
        elif query:
            empty = f"No template matches “{query}”."
        else:
            empty = "No templates yet — train one in the **Train** tab, or import one below."
        return (present.gallery_items(templates), ids, selected, empty) + details(selected)

    def details(template_id):
        t = api.template(template_id) if template_id else None
        has = t is not None
        strip = [(p, None) for p in (present.final_previews(t["previews"]) if has else [])] or None
        return (present.template_card(t), strip, gr.Button(interactive=has), gr.Button(interactive=has),
                t["name"] if has else "", gr.File(visible=False, value=None), gr.Row(visible=False),
                (t["id"] if has else ""), "")

    detail_outputs = [ui.card, ui.strip, ui.use, ui.export, ui.new_name, ui.export_file, ui.confirm_row,
                      ui.repo, ui.share_result]
    ui.refresh = (refresh, [ui.search, ui.selected], [ui.gallery, ui.ids, ui.selected, ui.empty] + detail_outputs)
    ui.search.change(*ui.refresh, api_visibility="private", trigger_mode="always_last")

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
    def rename(template_id, name, query):
        api.rename(template_id, name)
        gr.Info(f"Renamed to “{name.strip()}”.")
        return refresh(query, template_id)

    ui.rename.click(rename, [ui.selected, ui.new_name, ui.search], ui.refresh[2], api_visibility="private")

    def ask_delete(template_id):
        t = api.template(template_id) if template_id else None
        if t is None:
            return gr.Row(visible=False), ""
        return gr.Row(visible=True), f"Delete **{t['name']}** for good? This cannot be undone."

    ui.delete.click(ask_delete, ui.selected, [ui.confirm_row, ui.confirm_text], api_visibility="private")
    ui.keep.click(lambda: gr.Row(visible=False), None, ui.confirm_row, api_visibility="private", queue=False)

    @guard
    def delete(template_id, query):
        name = api.template(template_id)["name"]
        api.delete(template_id)
        gr.Info(f"Deleted “{name}”.")
        return refresh(query, "")

    ui.confirm.click(delete, [ui.selected, ui.search], ui.refresh[2], api_visibility="private")

    @guard
    def do_import(file, repo, token, query):
        if file:
            t = api.import_file(file)
        elif (repo or "").strip():
            t = api.import_hub(repo, token)
        else:
            raise gr.Error("Choose a .zip / .safetensors file, or type a Hugging Face repo id.")
        gr.Info(f"Imported “{t['name']}”.")
        return refresh(query, t["id"]) + (None, "", "")

    ui.import_btn.click(do_import, [ui.import_file, ui.hub_repo, ui.hub_read_token, ui.search],
                        ui.refresh[2] + [ui.import_file, ui.hub_repo, ui.hub_read_token], api_visibility="private")

    @guard
    def share(template_id, repo, token, private):
        if not template_id:
            raise gr.Error("Select a template first.")
        url = api.share(template_id, repo, token, private)["url"]
        return f"Shared: [{url}]({url})", ""  # the token field is cleared

    ui.share.click(share, [ui.selected, ui.repo, ui.token, ui.private], [ui.share_result, ui.token],
                   api_visibility="private")
    return ui
