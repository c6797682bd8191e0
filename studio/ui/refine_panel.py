"""The Gallery's "Refine" section: StyleDrop's second round with feedback (wiring only).

The studio draws test pictures of other subjects with the selected template; the artist ticks
favourites (or lets CLIP choose) and a second training learns from the references plus those
picks. Logic lives in :mod:`studio.styles.refine` and :class:`studio.api.StudioAPI`; the round is an
ordinary training job, so a reload never stops it and the Train tab can show its loss curve.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.api import StudioAPI
from studio.jobs.records import FINAL
from studio.styles.refine import DEFAULT_CANDIDATES, DEFAULT_TOP_K, MAX_CANDIDATES, read_candidate_prompt
from studio.ui import present
from studio.ui.common import guard

INTRO = ("**Does the style leak the reference's subject into every picture?** Train a *round 2*: the studio "
         "draws test pictures of other subjects with this template; keep the ones that have the style **and** "
         "show the right subject, and a second training learns from your references plus those picks. "
         "It becomes a new template; this one stays as it is.")


def build() -> SimpleNamespace:
    """Lay out the Refine section where it is called (the template card's column); returns its components.

    Call :func:`wire` once the State holding the selected template id exists. ``finished`` holds the
    id of the template the last round made (the gallery selects it), ``job`` the round's job id.
    """
    ui = SimpleNamespace()
    with gr.Accordion("Refine this style (round 2)", open=False, elem_id="refine-box") as ui.box:
        ui.learned = gr.Gallery(label="This round learned from its references plus these test pictures",
                                visible=False, rows=1, columns=6, height=120, object_fit="contain",
                                allow_preview=True, buttons=["fullscreen"], elem_id="refine-learned")
        gr.Markdown(INTRO, elem_classes="hint")
        ui.n = gr.Slider(4, MAX_CANDIDATES, value=DEFAULT_CANDIDATES, step=1, label="How many test pictures",
                         elem_id="refine-n")
        ui.make = gr.Button("1 · Make test pictures", elem_id="refine-make", interactive=False)
        ui.candidates = gr.Gallery(label="Test pictures — click the ones you like (click again to un-pick)",
                                   columns=4, height=300, object_fit="contain", allow_preview=False, buttons=[],
                                   visible=False, elem_id="refine-candidates")
        ui.picks = gr.CheckboxGroup([], label="Your favourites", visible=False, elem_id="refine-picks")
        ui.train_mine = gr.Button("2 · Train round 2 with my favourites", variant="primary", interactive=False,
                                  elem_id="refine-train")
        gr.Markdown("**…or let CLIP choose.** It draws the test pictures itself and keeps those whose style is "
                    "closest to your references *and* that best show their subject (style × prompt score).",
                    elem_classes="hint")
        ui.top_k = gr.Slider(1, 8, value=DEFAULT_TOP_K, step=1, label="How many CLIP keeps", elem_id="refine-top-k")
        ui.auto = gr.Button("Let CLIP choose", elem_id="refine-auto", interactive=False)
        ui.auto_note = gr.Markdown("", elem_id="refine-auto-note", elem_classes="hint")  # why it is off
        ui.status = gr.HTML("", elem_id="refine-status")
    ui.files = gr.State([])  # the test pictures shown (server side: ticks are checked against it)
    ui.labels = gr.State([])  # their captions ("3 · A moose")
    ui.batch = gr.State(0)  # each "Make test pictures" shows new subjects and seeds
    ui.job = gr.State("")
    ui.finished = gr.State("")
    ui.timer = gr.Timer(1.0, active=False)
    return ui


def wire(api: StudioAPI, ui: SimpleNamespace, selected: gr.State) -> None:
    """Wire the Refine section's events for the template id in ``selected``."""

    def show(template_id):
        """Another template was selected: what it learned from (if refined), and fresh test pictures."""
        t = api.template(template_id) if template_id else None
        lineage = t.get("lineage") if t else None
        learned = present.picked_items(lineage)
        next_round = (t.get("round") or 1) + 1 if t else 2
        auto = api.automatic_feedback()
        return (gr.Accordion(label=f"Refine this style (round {next_round})"),
                gr.Gallery(value=learned or None, visible=bool(learned)), [], [], 0,
                gr.Gallery(value=None, visible=False), gr.CheckboxGroup(choices=[], value=[], visible=False),
                gr.Button(f"2 · Train round {next_round} with my favourites", interactive=False),
                gr.Button(interactive=t is not None), gr.Button(interactive=t is not None and auto["available"]),
                "" if auto["available"] else f"⚠️ Not available here: {auto['reason']}")

    selected.change(show, selected, [ui.box, ui.learned, ui.files, ui.labels, ui.batch, ui.candidates, ui.picks,
                                     ui.train_mine, ui.make, ui.auto, ui.auto_note], api_visibility="private")

    @guard
    def make(template_id, n, batch, progress=gr.Progress()):
        if not template_id:
            raise gr.Error("Select a template first.")
        n = int(n)
        progress(0.05, desc="queued")
        files = api.refine_candidates(template_id, n, {"seed": batch * n, "offset": batch * n},
                                      progress=lambda msg: progress(0.5, desc=msg))
        paths = [str(f) for f in files]
        labels = [present.candidate_label(i, read_candidate_prompt(f)) for i, f in enumerate(paths)]
        rows = -(-len(paths) // 4)  # as tall as the rows of four it has, no empty band below
        return (gr.Gallery(value=list(zip(paths, labels, strict=True)), visible=True, height=50 + 115 * rows),
                paths, labels, batch + 1,
                gr.CheckboxGroup(choices=list(zip(labels, paths, strict=True)), value=[], visible=True),
                gr.Button(interactive=False))

    ui.make.click(make, [selected, ui.n, ui.batch],
                  [ui.candidates, ui.files, ui.labels, ui.batch, ui.picks, ui.train_mine],
                  api_visibility="private", concurrency_limit=2)

    def toggle(files, picks, evt: gr.SelectData):
        """A click on a test picture ticks or un-ticks it."""
        if evt.index is None or evt.index >= len(files):
            return gr.skip()
        path = files[evt.index]
        picks = list(picks or [])
        return [p for p in picks if p != path] if path in picks else picks + [path]

    ui.candidates.select(toggle, [ui.files, ui.picks], ui.picks, api_visibility="private")

    def marked(picks, files, labels):
        """Favourites get a tick on their picture too, and the train button wakes up."""
        if not files:
            return gr.skip(), gr.Button(interactive=False)
        items = [(f, ("✓ " if f in (picks or []) else "") + label) for f, label in zip(files, labels, strict=True)]
        return items, gr.Button(interactive=bool(picks))

    ui.picks.change(marked, [ui.picks, ui.files, ui.labels], [ui.candidates, ui.train_mine],
                    api_visibility="private")

    def started(job_id):
        return job_id, present.status_html(api.job_status(job_id)), gr.Timer(active=True)

    @guard
    def train_mine(template_id, picks, files):
        chosen = [p for p in picks or [] if p in (files or [])]  # only pictures this page made
        if not chosen:
            raise gr.Error("Click at least one test picture you like, or let CLIP choose.")
        return started(api.refine(template_id, chosen, "human"))

    @guard
    def auto(template_id, n, top_k):
        if not template_id:
            raise gr.Error("Select a template first.")
        n, top_k = int(n), int(top_k)
        if top_k > n:
            raise gr.Error(f"CLIP can keep at most the {n} test pictures it makes.")
        return started(api.refine(template_id, None, "auto", {"candidates": n, "top_k": top_k}))

    job_outputs = [ui.job, ui.status, ui.timer]
    ui.train_mine.click(train_mine, [selected, ui.picks, ui.files], job_outputs, api_visibility="private")
    ui.auto.click(auto, [selected, ui.n, ui.top_k], job_outputs, api_visibility="private")

    def tick(job_id, finished):
        try:
            status = api.job_status(job_id) if job_id else None
        except Exception:  # noqa: BLE001 - the job folder vanished: stop polling quietly
            status = None
        if status is None:
            return "", gr.Timer(active=False), gr.skip()
        done = status["state"] in FINAL
        new = status.get("template_id") or ""
        if done and new and new != finished:
            gr.Info(f"Your refined template is ready: “{status['name']}”.")
        return present.status_html(status), gr.Timer(active=not done), new if done and new else gr.skip()

    ui.timer.tick(tick, [ui.job, ui.finished], [ui.status, ui.timer, ui.finished], api_visibility="private",
                  concurrency_limit=None)
