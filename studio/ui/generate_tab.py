"""Generate tab: text-to-image, comic pages and memes in a template's style."""

from __future__ import annotations

import random
from types import SimpleNamespace

import gradio as gr

from studio.api import StudioAPI, aspect_ratios
from studio.media.compose import LAYOUTS
from studio.ui import gen_options, present
from studio.ui.common import keep_page

MODES = [("Picture", "text-to-image"), ("Comic page", "multi-panel"), ("Meme", "meme")]
LAYOUT_CHOICES = [("Automatic", "auto")] + [(f"{r} row{'s' if r != '1' else ''} × {c}", v)
                                           for v in LAYOUTS[1:] for r, c in [v.split("x")]]
PANEL_EXAMPLE = ("a cat wakes up in a sunny bedroom | Monday morning.\na cat stares at an empty food bowl | "
                 "No breakfast?!\na cat knocks a cup off the table | Revenge.\na cat sleeps on a laptop | Nap time.")
DEFAULT_PROMPT = "a cozy wood cabin in the snow"


def build(api: StudioAPI) -> SimpleNamespace:
    """Lay out the Generate tab and wire its own events; returns its components."""
    ui = SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=320):
            ui.template = gr.Dropdown(present.template_choices([]), value="", label="Style template",
                                      elem_id="template-picker", filterable=True)
            ui.mode = gr.Radio(MODES, value="text-to-image", label="Make a…", elem_id="gen-mode")
            ui.prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, elem_id="gen-prompt",
                                   info="Picking a template adds its style words at the end; edit anything.")
            with gr.Group(visible=False) as ui.comic_box:
                ui.panels = gr.Textbox(label="Panels — one prompt per line (2 to 6)", lines=4, value=PANEL_EXAMPLE,
                                       info="Text after a | is printed in a caption strip under the panel. "
                                            "The template's style is added to every panel.",
                                       elem_id="panel-prompts")
                with gr.Row():
                    ui.layout = gr.Dropdown(LAYOUT_CHOICES, value="auto", label="Layout", elem_id="panel-layout")
                    ui.gutter = gr.Slider(0, 64, value=16, step=2, label="Gutter (px)")
                    ui.border = gr.Slider(0, 16, value=4, step=1, label="Border (px)")
                ui.single = gr.Checkbox(False, label="Single shot: one image at the reference's shape (for templates "
                                                     "trained on a whole comic page; uses the prompt above)",
                                        elem_id="single-shot")
            with gr.Group(visible=False) as ui.meme_box:
                with gr.Row():
                    ui.top = gr.Textbox(label="Top text", max_lines=2, elem_id="meme-top")
                    ui.bottom = gr.Textbox(label="Bottom text", max_lines=2, elem_id="meme-bottom")
                ui.meme_style = gr.Radio([("Classic captions (white, black outline)", "classic"),
                                          ("Drawn by the model (in-image typography)", "typography")],
                                         value="classic", label="Lettering", elem_id="meme-style")
            with gr.Accordion("Size, seed, strength and steps", open=False, elem_id="gen-settings"):
                ui.scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Style strength (LoRA scale)")
                ui.aspect = gr.Radio(aspect_ratios(), value="1:1", label="Aspect ratio (width:height)")
                with gr.Row():
                    ui.count = gr.Slider(1, 4, value=1, step=1, label="Images")
                    ui.seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    ui.dice = gr.Button("Random seed", size="sm")
                with gr.Row():
                    ui.steps = gr.Slider(1, 60, value=28, step=1, label="Denoising steps")
                    ui.guidance = gr.Slider(0.0, 15.0, value=7.0, step=0.5, label="Guidance")
            # Everything in here is off by default; gen_options maps the controls to GenerateOptions.
            with gr.Accordion(gen_options.ACCORDION, open=False, elem_id="gen-advanced"):
                ui.mix_with = gr.Dropdown(gen_options.mix_choices([], None), value=gen_options.NO_MIX,
                                          label="Mix with a second template", info=gen_options.MIX_INFO,
                                          elem_id="mix-template", filterable=True)
                with gr.Column(visible=False) as ui.mix_row:  # shown once a second template is picked
                    ui.mix_main = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label=gen_options.main_label(None),
                                            info=gen_options.MAIN_STRENGTH_INFO, elem_id="mix-main-scale")
                    ui.mix_scale = gr.Slider(0.0, 1.5, value=0.5, step=0.05, label=gen_options.mixed_label(None),
                                             elem_id="mix-scale")
                ui.schedule = gr.Slider(5, 100, value=100, step=5, label=gen_options.SCHEDULE_LABEL,
                                        info=gen_options.SCHEDULE_INFO, elem_id="style-schedule")
                ui.blend = gr.Slider(0, 100, value=0, step=5, label=gen_options.BLEND_LABEL,
                                     info=gen_options.BLEND_INFO, elem_id="fusion-blend")
                ui.prior = gr.Checkbox(False, label="Start from the style's noise prior", interactive=False,
                                       info=gen_options.PRIOR_NO_TEMPLATE, elem_id="noise-prior")
            ui.go = gr.Button("Generate", variant="primary", size="lg", elem_id="generate-button")
        with gr.Column(scale=7, min_width=320):
            ui.result = gr.Gallery(label="Results", columns=2, height=640, object_fit="contain", format="png",
                                   elem_id="generated", buttons=["download", "fullscreen"])
            ui.files = gr.File(label="Download as PNG (the settings are saved inside each file)",
                               file_count="multiple", interactive=False, elem_id="generated-files", visible=False)
            ui.history = gr.Gallery(label="Earlier pictures with this template — newest first (each PNG keeps its "
                                          "settings)", columns=6, height=170, object_fit="cover", format="png",
                                    allow_preview=True, elem_id="gen-history", buttons=["download", "fullscreen"],
                                    visible=False)
    ui.style = gr.State("")  # the selected template's style prompt (to swap the prompt's ending)

    def mix_dropdown(template_id, mix_with):
        """The second-template choices without the main one (which cannot be mixed into itself)."""
        choices = gen_options.mix_choices(api.template_list(), template_id)
        keep = mix_with if mix_with in {v for _, v in choices} else gen_options.NO_MIX
        return gr.Dropdown(choices=choices, value=keep)

    def on_template(template_id, prompt, old_style, mix_with):
        t = api.template(template_id) if template_id else None
        style = t["style_prompt"] if t else ""
        can_prior, prior_info = gen_options.prior_state(t)
        return (present.rewrap_prompt(prompt, old_style, style), style, mix_dropdown(template_id, mix_with),
                gr.Checkbox(value=False, interactive=can_prior, info=prior_info),
                gr.Slider(label=gen_options.main_label(t["name"] if t else None)))

    def history(template_id):
        """The template's earlier pictures (kept in their job folders: they survive a restart)."""
        items = present.history_items(api.generation_history(template_id or None))
        return gr.Gallery(value=items or None, visible=bool(items))

    ui.template.change(history, ui.template, ui.history, api_visibility="private")
    ui.template.change(on_template, [ui.template, ui.prompt, ui.style, ui.mix_with],
                       [ui.prompt, ui.style, ui.mix_with, ui.prior, ui.mix_main], api_visibility="private")
    # New templates appear in the mix list whenever it is opened.
    ui.mix_with.focus(mix_dropdown, [ui.template, ui.mix_with], ui.mix_with, api_visibility="private")

    def on_mix(mix_with):
        name = api.template(mix_with)["name"] if mix_with else None
        return gr.Column(visible=bool(mix_with)), gr.Slider(label=gen_options.mixed_label(name))

    ui.mix_with.change(on_mix, ui.mix_with, [ui.mix_row, ui.mix_scale], api_visibility="private")
    # The main template's strength shows in two places; user edits of either move the other
    # (.input, not .change: programmatic updates would bounce between the two forever).
    ui.scale.input(lambda v: v, ui.scale, ui.mix_main, api_visibility="private", queue=False)
    ui.mix_main.input(lambda v: v, ui.mix_main, ui.scale, api_visibility="private", queue=False)

    def on_mode(mode, single):
        comic = mode == "multi-panel"
        return (gr.Group(visible=comic), gr.Group(visible=mode == "meme"),
                gr.Textbox(visible=not comic or single))

    ui.mode.change(on_mode, [ui.mode, ui.single], [ui.comic_box, ui.meme_box, ui.prompt], api_visibility="private",
                   queue=False)
    ui.single.change(on_mode, [ui.mode, ui.single], [ui.comic_box, ui.meme_box, ui.prompt],
                     api_visibility="private", queue=False)
    ui.dice.click(lambda: random.randint(0, 2**31 - 1), None, ui.seed, api_visibility="private", queue=False)

    @keep_page(2, title="Not generated")  # the last pictures stay on screen
    def run(template_id, mode, prompt, panels, layout, gutter, border, single, top, bottom, meme_style, scale,
            aspect, count, seed, steps, guidance, mix_with, mix_scale, schedule, blend, prior,
            progress=gr.Progress()):
        options = {"lora_scale": float(scale), "aspect": aspect, "num_images": int(count), "seed": int(seed or 0),
                   "steps": int(steps), "guidance": float(guidance), "wrap_style": False,
                   **gen_options.advanced_options(mix_with, mix_scale, schedule, blend, prior)}
        if mode == "multi-panel":
            options.update(panels=panels, layout=layout, gutter=int(gutter), border=int(border),
                           single_shot=bool(single))
            options["wrap_style"] = True  # panel prompts are content only: add the style to each
            if not single:
                options["num_images"] = 1
        elif mode == "meme":
            options.update(top=top, bottom=bottom, meme_style=meme_style)
        progress(0.05, desc="queued")
        files = api.generate(template_id, prompt, mode, options, progress=lambda msg: progress(0.5, desc=msg))
        paths = [str(f) for f in files]
        return paths, gr.File(value=paths, visible=True)

    ui.go.click(run, [ui.template, ui.mode, ui.prompt, ui.panels, ui.layout, ui.gutter, ui.border, ui.single,
                      ui.top, ui.bottom, ui.meme_style, ui.scale, ui.aspect, ui.count, ui.seed, ui.steps,
                      ui.guidance, ui.mix_with, ui.mix_scale, ui.schedule, ui.blend, ui.prior],
                [ui.result, ui.files], api_visibility="private", concurrency_limit=4
                ).then(history, ui.template, ui.history, api_visibility="private")
    return ui
