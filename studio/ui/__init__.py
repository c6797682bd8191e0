"""The studio's web UI: one module per tab (wiring only), the public API endpoints, and
:func:`build_demo`, which puts them together and wires the events that cross tabs."""

from __future__ import annotations

import gradio as gr

from studio.api import StudioAPI
from studio.ui import endpoints, gallery_tab, generate_tab, present, served, train_tab
from studio.ui.common import demo_notice


def build_demo(api: StudioAPI) -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (launch it with CSS/theme from :mod:`studio.ui.common`)."""
    with gr.Blocks(title="Style Template Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Style Template Studio\nTeach a model your style from a few images, then make pictures, "
                    "comics and memes with it.", elem_id="app-title")
        notice = demo_notice(api.backbone or "")
        if notice:
            gr.Markdown(notice, elem_id="demo-notice")
        endpoints.build(api)  # first: the public API names are never taken by a tab's private event
        with gr.Tabs(selected="train") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(api)
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery"):
                gallery = gallery_tab.build(api)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = generate_tab.build(api)

        def choices(selected=None):
            templates = api.template_list()
            ids = {t["id"] for t in templates}
            if selected in ids:
                return gr.Dropdown(choices=present.template_choices(templates), value=selected)
            return gr.Dropdown(choices=present.template_choices(templates))

        def go_generate(template_id, prompt, old_style):
            """Switch to the Generate tab with this template picked and the prompt in its style."""
            t = api.template(template_id) if template_id else None
            style = t["style_prompt"] if t else ""
            return (gr.Tabs(selected="generate"), choices(template_id),
                    present.rewrap_prompt(prompt, old_style, style), style)

        go_outputs = [tabs, generate.template, generate.prompt, generate.style]
        gallery.use.click(go_generate, [gallery.selected, generate.prompt, generate.style], go_outputs,
                          api_visibility="private")
        train.use.click(go_generate, [train.finished, generate.prompt, generate.style], go_outputs,
                        api_visibility="private")
        # "You may already have this style": generate with the existing template instead of training.
        train.similar_use.click(go_generate, [train.similar_pick, generate.prompt, generate.style], go_outputs,
                                api_visibility="private")

        # A round 2 queued in the Gallery's Refine section is a training: the Train tab follows it too.
        def follow(job_id):
            return (job_id, {}, gr.Timer(active=True)) if job_id else (gr.skip(),) * 3

        gallery.refine.job.change(follow, gallery.refine.job, train.reattach[2], api_visibility="private")

        # A training finished: the gallery and the template picker show the new template.
        def after_training(template_id, query):
            return gallery.refresh[0](query, template_id or "") + (choices(),)

        train.finished.change(after_training, [train.finished, gallery.search],
                              gallery.refresh[2] + [generate.template], api_visibility="private")
        # Keep the picker in step with imports, renames and deletions in the gallery.
        gallery.ids.change(lambda: choices(), None, generate.template, api_visibility="private")

        def on_load(job_id, query, selected):
            return train.reattach[0](job_id) + gallery.refresh[0](query, selected) + (choices(),)

        demo.load(on_load, [train.job, gallery.search, gallery.selected],
                  train.reattach[2] + gallery.refresh[2] + [generate.template], api_visibility="private")
        demo.load(None, None, None, js=train_tab.TITLE_WATCH_JS)  # the tab title shows the run
    # Pictures and files from the data folders reach the browser as copies in Gradio's cache; the folders
    # themselves (job records, requests, the queue, logs) are never served.
    served.serve_copies(demo, [api.jobs.runs_dir, api.store.root])
    return demo


__all__ = ["build_demo"]
