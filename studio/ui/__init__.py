"""The studio's web UI: one module per tab (wiring only), the public API endpoints, and
:func:`build_demo`, which puts them together and wires the events that cross tabs."""

from __future__ import annotations

import gradio as gr

from studio.api import StudioAPI
from studio.errors import StudioError
from studio.ui import endpoints, gallery_tab, generate_tab, jobs_tab, present, present_jobs, served, train_tab
from studio.ui.common import demo_notice, keep_page


def train_form(train) -> dict[str, gr.components.Component]:
    """The Train form's fields that a job's settings fill (by settings key)."""
    return {"tiles": train.tiles, "typed": train.typed, "references": train.refs, "style_prompt": train.style,
            "name": train.name, "sampler": train.sampler,
            "mu": train.mu, "sigma": train.sigma, "steps": train.steps, "lr": train.lr, "rank": train.rank,
            "resolution": train.resolution, "seed": train.seed, "offset_noise": train.offset,
            "preview_every": train.every, "preview_prompt": train.preview_prompt, "noise_prior": train.noise_prior}


def build_demo(api: StudioAPI) -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (launch it with CSS/theme from :mod:`studio.ui.common`)."""
    with gr.Blocks(title="Style Template Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Style Template Studio\nTeach a model your style from a few images, then make pictures, "
                    "comics and memes with it.", elem_id="app-title")
        notice = demo_notice(api.backbone or "")
        if notice:
            gr.HTML(notice, elem_id="demo-notice")
        endpoints.build(api)  # first: the public API names are never taken by a tab's private event
        with gr.Tabs(selected="train") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(api)
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery"):
                gallery = gallery_tab.build(api)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = generate_tab.build(api)
            with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs") as jobs_page:
                jobs = jobs_tab.build(api)

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

        # The Jobs tab lists jobs while it is open (its timer runs only then, and only while one is unfinished).
        jobs_page.select(jobs.show, [jobs.kind, jobs.pick], jobs.shown, api_visibility="private")

        def jobs_tab_left(evt: gr.SelectData):
            return gr.Timer(active=False) if evt.value != "Jobs" else gr.skip()

        tabs.select(jobs_tab_left, None, jobs.timer, api_visibility="private", queue=False)

        def follow_resumed(job_id):
            """The Train tab shows a resumed training (if it is under way: a refused resume changes nothing)."""
            try:
                running = bool(job_id) and api.job_status(job_id)["state"] in ("queued", "running")
            except StudioError:
                running = False
            return (job_id, {}, gr.Timer(active=True)) if running else (gr.skip(),) * 3

        jobs.resumed.then(follow_resumed, jobs.pick, train.reattach[2], api_visibility="private")
        form = train_form(train)

        @keep_page(len(form) + 1, title="Settings not copied")
        def clone(job_id):
            """Copy a training's settings (references included) into the Train form and open it."""
            if not job_id:
                return (gr.skip(),) * (len(form) + 1)
            return (gr.Tabs(selected="train"),
                    *present_jobs.form_values(api.job_settings(job_id), list(form), train_tab.RESOLUTION_VALUES))

        jobs.clone.click(clone, jobs.pick, [tabs, *form.values()], api_visibility="private")

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
