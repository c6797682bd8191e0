"""Jobs tab: every training and generation with its state, and what to do with one that ended (resume from
its last saved step, save that step as a template, retry, copy its settings to the Train form, delete its
folder). Wiring only: the actions are ``StudioAPI``'s (``studio.jobs.run_actions``), the text is
:mod:`studio.ui.present_jobs`. Copying settings crosses tabs, so ``build_demo`` wires that button.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.api import StudioAPI
from studio.ui import present_jobs as pj
from studio.ui.common import keep_page

SHOW = [("All jobs", ""), ("Trainings", "train"), ("Pictures", "generate")]
# Deleting asks once in the browser; a "no" sends an empty job id, which changes nothing.
CONFIRM_DELETE_JS = """(job, kind) => {
  if (!job) { return [job, kind]; }
  return confirm("Delete this job's folder (its saved steps, previews and references)? A template it made stays.")
    ? [job, kind] : ["", kind];
}"""


def build(api: StudioAPI) -> SimpleNamespace:
    """Lay out the Jobs tab and wire its own events; returns its components."""
    ui = SimpleNamespace()
    with gr.Row():
        ui.kind = gr.Radio(SHOW, value="", label="Show", elem_id="jobs-kind", scale=3)
        ui.refresh = gr.Button("↻ Refresh", size="sm", elem_id="jobs-refresh", scale=1, min_width=100)
    ui.table = gr.Dataframe(pj.jobs_frame([]), headers=pj.JOB_COLUMNS, interactive=False, wrap=True,
                            column_widths=pj.COLUMN_WIDTHS,
                            elem_id="jobs-table", max_height=360, label="Jobs, newest first — click one")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=300):
            ui.pick = gr.Dropdown([], value=None, label="Job", elem_id="jobs-pick", allow_custom_value=False)
            ui.details = gr.HTML(pj.job_details(None), elem_id="job-detail")
        with gr.Column(scale=4, min_width=260):
            ui.resume = gr.Button("▶ Resume from the last saved step", variant="primary", interactive=False,
                                  elem_id="job-resume")
            ui.save = gr.Button("Save the last saved step as a template", interactive=False, elem_id="job-save")
            ui.retry = gr.Button("↻ Retry with the same settings", interactive=False, elem_id="job-retry")
            ui.clone = gr.Button("Copy its settings to the Train form", interactive=False, elem_id="job-clone")
            ui.delete = gr.Button("Delete its folder", variant="stop", size="sm", interactive=False,
                                  elem_id="job-delete")
    ui.rows = gr.State([])  # the rows the table shows (to map a clicked line to its job)
    ui.timer = gr.Timer(2.0, active=False)  # on while the tab is open and a job in it is unfinished

    buttons = [ui.resume, ui.save, ui.retry, ui.clone, ui.delete]

    def buttons_for(row: dict | None) -> list[gr.Button]:
        can = pj.allowed(row)
        return [gr.Button(interactive=can[k]) for k in ("resume", "save", "retry", "clone", "delete")]

    def show(kind: str, selected: str | None):
        """Table, picker, details and buttons for the current jobs; the picked job stays picked."""
        rows = api.jobs_list(kind or None)
        ids = [r["id"] for r in rows]
        selected = selected if selected in ids else None
        row = rows[ids.index(selected)] if selected else None
        return (pj.jobs_frame(rows), gr.Dropdown(choices=pj.job_choices(rows), value=selected), rows,
                pj.job_details(row), *buttons_for(row), gr.Timer(active=pj.has_unfinished(rows)))

    ui.shown = [ui.table, ui.pick, ui.rows, ui.details, *buttons, ui.timer]
    ui.show = show
    ui.refresh.click(show, [ui.kind, ui.pick], ui.shown, api_visibility="private")
    ui.kind.change(show, [ui.kind, ui.pick], ui.shown, api_visibility="private")

    def picked(job_id, rows):
        row = next((r for r in rows or [] if r["id"] == job_id), None)
        return pj.job_details(row), *buttons_for(row)

    def tick(kind):
        """A timer refresh never touches the picked job (a click may have changed it since the tick began):
        the list and the picker's choices first, then the details of whatever is picked by then."""
        rows = api.jobs_list(kind or None)
        return (pj.jobs_frame(rows), gr.Dropdown(choices=pj.job_choices(rows)), rows,
                gr.Timer(active=pj.has_unfinished(rows)))

    ui.timer.tick(tick, ui.kind, [ui.table, ui.pick, ui.rows, ui.timer], api_visibility="private").then(
        picked, [ui.pick, ui.rows], [ui.details, *buttons], api_visibility="private", queue=False)

    ui.pick.change(picked, [ui.pick, ui.rows], [ui.details, *buttons], api_visibility="private", queue=False)

    def clicked(rows, evt: gr.SelectData):
        row_index = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if not isinstance(row_index, int) or not 0 <= row_index < len(rows or []):
            return gr.skip()
        return rows[row_index]["id"]

    ui.table.select(clicked, ui.rows, ui.pick, api_visibility="private", queue=False)

    def act(action, done_message):
        @keep_page(len(ui.shown), title="Not done")
        def run(job_id, kind):
            if not job_id:
                return tuple(gr.skip() for _ in ui.shown)
            result = action(job_id)
            gr.Info(done_message(result))
            new_pick = result if isinstance(result, str) else job_id  # a retry picks the new job
            return show(kind, None if isinstance(result, dict) and result.get("deleted") else new_pick)

        return run

    ui.resumed = ui.resume.click(act(api.resume_job, lambda s: f"{s['name']}: {s['message']}"), [ui.pick, ui.kind],
                                 ui.shown, api_visibility="private")
    ui.save.click(act(api.save_checkpoint, lambda s: f"{s['name']}: {s['message']}; it appears in the Gallery "
                                                     "when it is written"), [ui.pick, ui.kind], ui.shown,
                  api_visibility="private")
    ui.retry.click(act(api.retry_job, lambda new_id: f"queued again as job {new_id[-8:]}"), [ui.pick, ui.kind],
                   ui.shown, api_visibility="private")
    ui.delete.click(act(api.delete_job, lambda d: f"deleted the folder of “{d['name']}” ({d['kind']} job "
                                                  f"{d['deleted'][-8:]}, {d['freed_bytes'] / 1e6:.1f} MB freed)"),
                    [ui.pick, ui.kind], ui.shown, api_visibility="private", js=CONFIRM_DELETE_JS)
    return ui
