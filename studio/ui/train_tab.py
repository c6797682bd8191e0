"""Train tab: references, style prompt, presets, one Train button, then the live job panel.

Training never runs inside a Gradio event: Train only queues the job and returns its id;
a ``gr.Timer`` polls the job's state; on page load the tab re-attaches to the running job
(the id is also kept in the browser's localStorage, so a reload shows the same job).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.api import StudioAPI, preview_prompts_of, suggest_name
from studio.engine.recipe import MAX_PREVIEW_PROMPTS, PRESETS, Recipe
from studio.errors import InputError, StudioError
from studio.jobs.records import FINAL
from studio.ui import present
from studio.ui.common import keep_page
from studio.ui.references import captions_hint, tile_caption, tile_view, wire_references

PREVIEW_PROMPTS = preview_prompts_of(None)  # the paper's three, what the sample boxes start with

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
STYLE_EXAMPLES = ["watercolor painting", "flat cartoon illustration", "3d render, soft clay", "ukiyo-e woodblock print",
                  "melting golden 3d rendering", "minimal line drawing"]
PRESET_CHOICES = [("Paper default — 300 steps", "paper"), ("Quick preview — 100 steps", "quick"),
                  ("High fidelity — 1024 px", "high_fidelity")]
RESOLUTIONS = [("Model default", "auto"), ("512 px", "512"), ("768 px", "768"), ("1024 px", "1024")]
RESOLUTION_VALUES = [value for _, value in RESOLUTIONS]
# Train asks once for permission to notify (a click is the gesture browsers require); no sound.
ASK_NOTIFY_JS = """(...args) => {
  if (window.Notification && Notification.permission === "default") { Notification.requestPermission(); }
  return args;
}"""
# Past its first checkpoint a run is worth something: Cancel asks once (a "no" sends no job id: nothing happens).
CONFIRM_CANCEL_JS = """(job) => {
  const card = document.querySelector("#job-status [data-checkpoint]");
  const saved = card ? Number(card.dataset.checkpoint) : 0;
  if (!job || !saved) { return job; }
  return confirm(`Cancel this training? It is saved at step ${saved}: the Jobs tab can resume it from there ` +
                 `or keep it as a template.`) ? job : "";
}"""
# The tab title follows the status card (its data-title), whichever event redrew the card; when a run
# this page watched ends, a notification says so (if allowed). Installed once when the page loads.
TITLE_WATCH_JS = """() => {
  const watch = () => {
    const root = document.querySelector("#job-status");
    if (!root) { setTimeout(watch, 500); return; }
    const update = () => {
      const card = root.querySelector("[data-title]");
      const title = card && card.dataset.title;
      if (!title || title === document.title) { return; }
      const watched = document.title.startsWith("[") || document.title.startsWith("Cancelling");
      document.title = title;
      const ended = /^(Done|Failed|Cancelled): /.test(title);
      if (ended && watched && window.Notification && Notification.permission === "granted") {
        new Notification(title.split(" – ")[0], {silent: true});
      }
    };
    new MutationObserver(update).observe(root, {subtree: true, childList: true, attributes: true,
                                                characterData: true});
    update();
  };
  watch();
}"""


def preset_choices(backbone: str | None) -> list[tuple[str, str]]:
    """The presets; on the tiny demo model the 1024 px one says what it costs before anyone starts it (a CPU
    draws its 1024 px previews for about ten minutes before the first training step)."""
    if backbone != "tiny":
        return PRESET_CHOICES
    return [(label + " (demo: ~10 min of previews before step 1)", value) if value == "high_fidelity"
            else (label, value) for label, value in PRESET_CHOICES]


def sigma_value(text: str | None) -> float | None:
    """The sigma field: empty means the backbone family's paper default (None); anything else must be a number
    (the recipe checks its range)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"sigma must be a number like 3 or 2.5, or empty for the model's default (got {text[:20]!r})"
                         ) from None


def _preset_values(preset: str) -> tuple[int, int, str]:
    recipe = Recipe.from_preset(preset if preset in PRESETS else "paper")
    return recipe.steps, recipe.preview_every, str(recipe.resolution) if recipe.resolution else "auto"


def build(api: StudioAPI) -> SimpleNamespace:
    """Lay out the Train tab and wire its own events; returns its components."""
    ui = SimpleNamespace()
    steps0, every0, res0 = _preset_values("paper")
    with gr.Row(equal_height=False, elem_id="train-row"):  # on a phone the status comes first while a job runs
        with gr.Column(scale=5, min_width=320):
            gr.Markdown("### 1 · Reference images")
            ui.refs = gr.File(label="Drop 1–20 images of the style here (PNG, JPEG, WebP…, or a dataset .zip with "
                                    ".txt captions)", file_count="multiple", file_types=["image", ".zip"],
                              elem_id="ref-images", height=150)
            ui.tiles = gr.State([])  # one dict per dropped picture (reference_tile + key, crop, auto caption)
            ui.typed = gr.State({})  # tile key -> the caption the user typed (always wins)
            ui.caption_job = gr.State({})  # {"id": caption job, "keys": [tile keys in its order], "shown": n}
            with gr.Row(elem_id="ref-thumbs", elem_classes="ref-grid"):
                @gr.render(inputs=[ui.tiles, ui.typed], triggers=[ui.tiles.change])
                def grid(tiles, typed):
                    for tile in tiles or []:
                        tile_view(ui, tile, typed or {})
            captioner = api.captioner_status()
            with gr.Row(elem_id="caption-bar", equal_height=True):
                ui.auto_caption = gr.Button("Auto-caption the empty boxes", elem_id="auto-caption", size="sm",
                                            interactive=captioner["available"], scale=0, min_width=220)
                ui.caption_stop = gr.Button("Stop captioning", elem_id="caption-stop", size="sm", visible=False,
                                            variant="stop", scale=0, min_width=140)
            # under the buttons, full width: beside them a long note made a thin column with the button adrift
            ui.caption_note = gr.Markdown(captions_hint(captioner), elem_id="caption-note")
            with gr.Group(visible=False, elem_id="crop-panel") as ui.crop_panel:
                ui.crop_key = gr.State("")
                ui.crop_title = gr.Markdown(elem_id="crop-title", padding=True)
                with gr.Row():
                    ui.crop_left = gr.Slider(0, 95, value=0, step=1, label="Left edge %", elem_id="crop-left")
                    ui.crop_right = gr.Slider(5, 100, value=100, step=1, label="Right edge %", elem_id="crop-right")
                with gr.Row():
                    ui.crop_top = gr.Slider(0, 95, value=0, step=1, label="Top edge %", elem_id="crop-top")
                    ui.crop_bottom = gr.Slider(5, 100, value=100, step=1, label="Bottom edge %", elem_id="crop-bottom")
                with gr.Row():
                    ui.crop_apply = gr.Button("Apply crop", variant="primary", size="sm", elem_id="crop-apply")
                    ui.crop_reset = gr.Button("Whole picture", size="sm", elem_id="crop-reset")
                    ui.crop_close = gr.Button("Close", size="sm", elem_id="crop-close")
            ui.caption_timer = gr.Timer(1.0, active=False)
            # "You may already have this style": templates that look like the references (studio.styles.retrieval)
            with gr.Group(visible=False, elem_id="similar-box") as ui.similar_box:
                ui.similar_note = gr.Markdown(elem_id="similar-note", padding=True)
                # container=False: inside a Group, Gradio 6 draws a thick dark frame around a Gallery block
                ui.similar = gr.Gallery(show_label=False, columns=4, height=150, object_fit="cover", fit_columns=False,
                                        allow_preview=False, elem_id="similar-templates", buttons=[], container=False)
                ui.similar_use = gr.Button("Use it instead →", variant="secondary", elem_id="similar-use")
            gr.Markdown("### 2 · Describe the style")
            ui.style = gr.Textbox(label="Style prompt", placeholder="e.g. watercolor painting",
                                  info="Describe the style, not the subject — e.g. “watercolor painting”. "
                                       "It becomes the template's trigger: “… in watercolor painting style”.",
                                  elem_id="style-prompt", max_lines=2)
            gr.Examples([[s] for s in STYLE_EXAMPLES], inputs=[ui.style], label="Style prompt examples",
                        examples_per_page=len(STYLE_EXAMPLES))
            ui.name = gr.Textbox(label="Template name", placeholder="suggested from the style prompt",
                                 info="Leave it empty to use the suggestion shown.",
                                 elem_id="template-name", max_lines=1)
            ui.preset = gr.Radio(preset_choices(api.backbone), value="paper", label="Preset", elem_id="preset",
                                 info="Paper default is the recipe from the Style-friendly SNR paper.")
            with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                ui.sampler = gr.Radio([("Style-friendly (recommended)", "style_friendly"), ("SD3 (baseline)", "sd3")],
                                      value="style_friendly", label="Noise-level sampler",
                                      info="Style-friendly trains mostly at high noise, where style is decided.")
                with gr.Row():
                    ui.mu = gr.Number(-6.0, label="mu (log-SNR mean)", step=0.5)
                    # A Textbox: a Number field shows "0" when empty, and 0 is not the default
                    ui.sigma = gr.Textbox("", label="sigma (log-SNR spread)", placeholder="empty: 3 FLUX, 2 SD3.5",
                                          max_lines=1, elem_id="sigma")
                with gr.Row():
                    ui.steps = gr.Number(steps0, label="Steps", precision=0, minimum=1, elem_id="steps")
                    ui.lr = gr.Number(1e-4, label="Learning rate", step=1e-5)
                    ui.rank = gr.Slider(4, 128, value=32, step=4, label="LoRA rank")
                with gr.Row():
                    ui.resolution = gr.Dropdown(RESOLUTIONS, value=res0, label="Resolution", elem_id="resolution")
                    ui.seed = gr.Number(0, label="Seed", precision=0)
                    ui.offset = gr.Slider(0.0, 0.1, value=0.0, step=0.01, label="Offset noise")
                ui.every = gr.Number(every0, label="Preview every N steps (0: off)", precision=0, minimum=0,
                                     elem_id="preview-every")
                ui.noise_prior = gr.Checkbox(
                    False, label="Style noise prior", elem_id="train-noise-prior",
                    info="Also learn the references' average colours and layout as the starting noise of a picture. "
                         "Tick “Start from the style's noise prior” on the Generate tab to use it. Helps styles "
                         "with a strong palette; off in the paper's recipe.")
            with gr.Accordion("Sample prompts — what the previews draw", open=False, elem_id="sample-prompts"):
                gr.Markdown("Up to four subjects drawn in your style at fixed seeds while it trains, and kept with "
                            "the template (a Refine or a re-train draws them again). Empty boxes are skipped.",
                            elem_classes="hint")
                ui.samples = [gr.Textbox(value=PREVIEW_PROMPTS[i] if i < len(PREVIEW_PROMPTS) else "",
                                         label=f"Sample {i + 1}", max_lines=1, elem_id=f"sample-prompt-{i}",
                                         placeholder="e.g. a lighthouse at dusk") for i in range(MAX_PREVIEW_PROMPTS)]
                ui.preview_prompt = ui.samples[-1]  # the fourth box: a job's extra preview prompt goes here
            ui.train = gr.Button("Train", variant="primary", size="lg", elem_id="train-button")
        with gr.Column(scale=7, min_width=320):
            gr.Markdown("### Training")
            ui.status = gr.HTML(present.status_html(None), elem_id="job-status")
            with gr.Row():
                ui.cancel = gr.Button("Cancel training", variant="stop", visible=False, elem_id="cancel-button")
                ui.use = gr.Button("Generate with it →", variant="primary", visible=False, elem_id="use-template")
            with gr.Row(equal_height=True):
                ui.loss = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss",
                                      color_map={"raw": "#93c5fd", "smoothed": "#1d4ed8"}, height=230,
                                      elem_id="loss-plot", min_width=260)
                ui.tplot = gr.LinePlot(present.t_frame([], None, api.backbone), x="t (noise level)", y="density",
                                       color="sampler", title="Noise levels t sampled",
                                       color_map=present.T_COLORS,
                                       height=230, x_lim=[0, 1], elem_id="t-plot", min_width=260)
            ui.previews = gr.Gallery(label="Previews at fixed seeds — newest first; step 0 is the base model",
                                     columns=4, height=330, object_fit="contain", elem_id="previews",
                                     allow_preview=True, buttons=["download", "fullscreen"])
    ui.job = gr.BrowserState("", storage_key="studio-train-job")
    ui.shown = gr.State({})  # what the panel shows now, to send only what changed
    ui.finished = gr.State("")  # id of the template the last finished job made (app wiring listens)
    ui.timer = gr.Timer(1.0, active=False)

    wire_references(api, ui)

    ui.similar_found = gr.State([])  # [[id, name], ...] of the tiles in ui.similar
    ui.similar_pick = gr.State("")  # the template "Use it instead" opens (app wiring listens)

    def use_label(name: str) -> gr.Button:
        return gr.Button(value=f"Use “{name}” instead →")

    def find_similar(tiles):
        """After an upload: the templates that already look like these references; none: the box hides."""
        found: dict = {"results": []}
        paths = [t["file"] for t in tiles or [] if t["ok"]]
        if paths:
            try:
                found = api.similar_templates(paths)
            except StudioError:  # a file that is not an image: pressing Train says what is wrong with it
                pass
        shown = [[t["id"], t["name"]] for t in found["results"]]
        return (gr.Group(visible=bool(shown)), present.similar_markdown(found),
                present.search_items(found) or None, shown,
                shown[0][0] if shown else "", use_label(shown[0][1]) if shown else gr.skip())

    ui.tiles.change(find_similar, ui.tiles, [ui.similar_box, ui.similar_note, ui.similar, ui.similar_found,
                                           ui.similar_pick, ui.similar_use],
                   api_visibility="private", trigger_mode="always_last")

    def pick_similar(found, evt: gr.SelectData):
        if evt.index is None or evt.index >= len(found):
            return gr.skip(), gr.skip()
        return found[evt.index][0], use_label(found[evt.index][1])

    ui.similar.select(pick_similar, ui.similar_found, [ui.similar_pick, ui.similar_use], api_visibility="private",
                      queue=False)

    def suggest(style):
        """The suggestion is only a placeholder: it can never replace a name the user typed, however
        late it arrives; an empty name is given the same suggestion when the job is submitted."""
        if not (style or "").strip():
            return gr.Textbox(placeholder="suggested from the style prompt")
        return gr.Textbox(placeholder=suggest_name(style, {t["name"] for t in api.template_list()}))

    ui.style.blur(suggest, ui.style, ui.name, api_visibility="private")
    ui.preset.change(_preset_values, ui.preset, [ui.steps, ui.every, ui.resolution], api_visibility="private",
                     queue=False)

    @keep_page(9, title="Training not started")
    def start(tiles, typed, caption_job, style, name, preset, sampler, mu, sigma, steps, lr, rank, resolution, seed,
              offset, every, noise_prior, *samples):
        options = {"preset": preset, "sampler": sampler, "mu": mu, "sigma": sigma_value(sigma), "steps": steps,
                   "lr": lr, "rank": rank, "resolution": None if resolution in (None, "auto") else int(resolution),
                   "seed": seed, "offset_noise": offset, "preview_every": every, "noise_prior": bool(noise_prior)}
        options = {k: (int(v) if k in ("steps", "rank", "seed", "preview_every") and v is not None else v)
                   for k, v in options.items() if v is not None}
        prompts = [" ".join((p or "").split()) for p in samples]
        if [p for p in prompts if p] != list(PREVIEW_PROMPTS):
            options["preview_prompts"] = [p for p in prompts if p] or None
        good = [t for t in tiles or [] if t["ok"]]
        options["captions"] = [tile_caption(t, typed or {}) for t in good]
        options["crops"] = [t.get("crop") for t in good]
        # Captions still being written: the training captions the empty ones itself, before it starts.
        if caption_job.get("id") and any(not c for c in options["captions"]):
            try:
                options["auto_caption"] = api.caption_status(caption_job["id"])["state"] in ("queued", "running")
            except StudioError:
                pass
        job_id = api.train([t["file"] for t in good], style, name, options)
        status = api.job_status(job_id)
        return (job_id, present.status_html(status), gr.Button(visible=True), gr.Button(visible=False),
                None, present.t_frame([], status.get("request", {}).get("recipe"), status.get("backbone")),
                [], {"job": job_id}, gr.Timer(active=True))

    panel = [ui.status, ui.cancel, ui.use, ui.loss, ui.tplot, ui.previews, ui.shown, ui.timer]
    ui.train.click(start, [ui.tiles, ui.typed, ui.caption_job, ui.style, ui.name, ui.preset, ui.sampler, ui.mu,
                           ui.sigma, ui.steps, ui.lr, ui.rank, ui.resolution, ui.seed, ui.offset, ui.every,
                           ui.noise_prior, *ui.samples],
                   [ui.job] + panel, api_visibility="private", concurrency_limit=4, js=ASK_NOTIFY_JS)

    def render(job_id, shown):
        """One poll: only what changed goes to the browser."""
        try:
            status = api.job_status(job_id) if job_id else None
        except Exception:  # noqa: BLE001 - the job folder vanished: stop polling quietly
            status = None
        if status is None:
            return (present.status_html(None), gr.Button(visible=False), gr.Button(visible=False), gr.skip(),
                    gr.skip(), gr.skip(), {}, gr.Timer(active=False), gr.skip())
        shown = dict(shown or {})
        fresh = shown.get("job") != job_id
        state = status["state"]
        n_loss, n_prev = len(status["losses"]), sum(len(p["files"]) for p in status["previews"])
        recipe = (status.get("request") or {}).get("recipe") or {}
        loss = t = prev = gr.skip()
        if fresh or n_loss != shown.get("losses"):
            loss = present.loss_frame(status["losses"])
            t = present.t_frame(status["t"], recipe, status.get("backbone"))
        if fresh or n_prev != shown.get("previews"):
            prev = present.preview_items(status["previews"], preview_prompts_of(recipe))
        finished = (status.get("template_id") or "") if state == "done" and shown.get("state") != "done" else gr.skip()
        new_shown = {"job": job_id, "losses": n_loss, "previews": n_prev, "state": state}
        return (present.status_html(status), gr.Button(visible=state not in FINAL),
                gr.Button(visible=state == "done" and bool(status.get("template_id"))), loss, t, prev, new_shown,
                gr.Timer(active=state not in FINAL), finished)

    ui.timer.tick(render, [ui.job, ui.shown], panel + [ui.finished], api_visibility="private",
                  concurrency_limit=None)

    @keep_page(1, title="Not cancelled")
    def cancel(job_id):
        if job_id:
            api.cancel(job_id)
        return present.status_html(api.job_status(job_id)) if job_id else gr.skip()

    ui.cancel.click(cancel, ui.job, ui.status, api_name="ui_cancel", api_visibility="private", js=CONFIRM_CANCEL_JS)

    def reattach(job_id):
        """Page (re)load: the running training wins, else the job this browser showed last."""
        active = api.active_training()
        if active:
            job_id = active["id"]
        if not job_id:
            return "", {}, gr.Timer(active=False)
        return job_id, {}, gr.Timer(active=True)  # the first tick draws everything

    ui.reattach = (reattach, ui.job, [ui.job, ui.shown, ui.timer])
    return ui
