"""What the Jobs view shows: the table of jobs, the picker's labels, one job's details and which actions
it allows. Pure functions over the rows of ``StudioAPI.jobs_list`` (no Gradio)."""

from __future__ import annotations

import html

import pandas as pd

from studio.ui.present import STATE_LABELS, fmt_date, fmt_duration

JOB_COLUMNS = ["Template", "State", "Steps", "When", "Note"]
COLUMN_WIDTHS = ["22%", "13%", "17%", "18%", "30%"]  # fits a phone's width too (the Note wraps)
KIND_LABELS = {"train": "Training", "generate": "Pictures"}
UNFINISHED = ("queued", "running")


def _state(row: dict) -> str:
    if row["state"] in UNFINISHED and row.get("cancel_requested"):
        return "Cancelling…"
    if row["state"] == "running" and row["kind"] == "generate":
        return "Drawing"
    return STATE_LABELS.get(row["state"], row["state"])


def _steps(row: dict) -> str:
    total = int(row.get("total_steps") or 0)
    if row["kind"] != "train":
        return f"{KIND_LABELS['generate']}: {total} picture{'s' if total != 1 else ''}" if total else "–"
    text = f"{int(row.get('step') or 0)} / {total}" if total else "–"
    if row.get("checkpoint_step") and row["state"] not in ("done",):
        text += f" (saved at {row['checkpoint_step']})"
    return text


def _note(row: dict) -> str:
    if row["state"] == "failed":
        return row.get("error") or row.get("message") or ""
    return row.get("message") or ""


def _when(row: dict) -> str:
    started = fmt_date(row.get("started") or row.get("created"))
    ran = row.get("duration_s")
    return f"{started} · ran {fmt_duration(ran)}" if ran is not None else started


def jobs_frame(rows: list[dict]) -> pd.DataFrame:
    """The table: one line per job, newest first."""
    data = [[r.get("name") or "", _state(r), _steps(r), _when(r), _note(r)] for r in rows]
    return pd.DataFrame(data, columns=JOB_COLUMNS)


def job_choices(rows: list[dict]) -> list[tuple[str, str]]:
    """The picker: "Blue Blobs · Cancelled · training 0c1d2e3f" -> job id."""
    return [(f"{r.get('name') or 'untitled'} · {_state(r)} · {KIND_LABELS.get(r['kind'], r['kind']).lower()} "
             f"{r['id'][-8:]}", r["id"]) for r in rows]


def job_details(row: dict | None) -> str:
    """One job in full (markdown-safe HTML): what it is, how far it got, why it stopped, what can be done."""
    if not row:
        return ('<div class="job-card idle">Pick a job in the table or the list to see it and what you can do '
                'with it. A cancelled or failed training can go on from its last saved step.</div>')
    state = row["state"]
    lines = [f'<div class="job-head"><span class="badge {html.escape(state)}">{html.escape(_state(row))}</span> '
             f'<b>{html.escape(row.get("name") or "")}</b> '
             f'<span class="job-meta">{html.escape(KIND_LABELS.get(row["kind"], row["kind"]))} · '
             f'{html.escape(row["id"])}</span></div>']
    facts = []
    if row["kind"] == "train":
        facts.append(f"steps done: {int(row.get('step') or 0)} of {int(row.get('total_steps') or 0)}")
        facts.append(f"last saved step: {row['checkpoint_step']}" if row.get("checkpoint_step")
                     else "no saved step yet")
    facts.append(f"started {fmt_date(row.get('started'))}" if row.get("started") else
                 f"queued {fmt_date(row.get('created'))}")
    if row.get("duration_s") is not None:
        facts.append(f"ran {fmt_duration(row['duration_s'])}")
    lines.append(f'<div class="job-meta">{html.escape(" · ".join(facts))}</div>')
    note = _note(row)
    if note:
        lines.append(f'<div class="job-msg">{"Why it stopped: " if state == "failed" else ""}{html.escape(note)}</div>')
    lines.append(f'<div class="hint">{html.escape(action_hint(row))}</div>')
    return f'<div class="job-card {html.escape(state)}" id="job-detail-card">' + "".join(lines) + "</div>"


def allowed(row: dict | None) -> dict[str, bool]:
    """Which buttons apply: resume, save (the checkpoint as a template), retry, clone, delete."""
    if not row:
        return dict.fromkeys(("resume", "save", "retry", "clone", "delete"), False)
    ended, train = row["state"] not in UNFINISHED, row["kind"] == "train"
    stopped = train and row["state"] in ("cancelled", "failed")
    return {"resume": stopped, "save": stopped and bool(row.get("checkpoint_step")), "retry": ended,
            "clone": train, "delete": ended}


def action_hint(row: dict) -> str:
    """One sentence on what this job allows."""
    can = allowed(row)
    if row["state"] in UNFINISHED:
        return "Still running: cancel it on the Train tab (or wait), then its actions appear here."
    if can["save"]:
        return (f"Resume goes on from step {row['checkpoint_step']} to the end; “Save as template” keeps the style "
                f"as it was at step {row['checkpoint_step']} without training further.")
    if can["resume"]:
        return "No step was saved yet, so Resume starts it again from the beginning."
    if row["state"] == "done" and row["kind"] == "train":
        return "Finished: its template is in the Gallery. Retry trains it again; the folder can go."
    return "Retry runs it again with the same settings; Delete removes its folder."


def has_unfinished(rows: list[dict]) -> bool:
    return any(r["state"] in UNFINISHED for r in rows)


def form_values(settings: dict, keys: list[str], resolutions: list[str]) -> list:
    """A training's settings (``StudioAPI.job_settings``) as the Train form's values, in ``keys`` order.

    ``resolutions``: the form's resolution choices; a run at the model's own size (stored as its number,
    e.g. 64 on the tiny model) comes back as "auto". The reference grid starts empty (``tiles``, ``typed``)
    and fills from the references."""
    recipe = settings.get("recipe") or {}
    resolution = str(recipe.get("resolution")) if str(recipe.get("resolution")) in resolutions else None
    # with captions the references come as a dataset zip: the drop zone reads the captions back from it
    refs = [settings["dataset"]] if settings.get("dataset") else settings.get("references")
    values = {"references": refs or None, "style_prompt": settings.get("style_prompt") or "",
              "name": settings.get("name") or "", "resolution": resolution or "auto",
              "preview_prompt": recipe.get("preview_prompt") or "", "noise_prior": bool(recipe.get("noise_prior")),
              "tiles": [], "typed": {}}
    for key in ("sampler", "mu", "steps", "lr", "rank", "seed", "offset_noise", "preview_every"):
        values[key] = recipe.get(key)
    values["sigma"] = "" if recipe.get("sigma") is None else f"{recipe['sigma']:g}"
    return [values[k] for k in keys]
