"""The status of a job as a page shows it: state, progress, the loss curve and the sampled noise levels, the
previews, the queue position, how long it ran, its last checkpoint, and what a waiting generation waits for.
Read from the job's folder (record, ``progress.json``, ``metrics.jsonl``, ``previews/``) by :class:`Jobs`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from studio.engine.checkpoints import checkpoint_step
from studio.jobs.records import CANCEL_FILE, PROGRESS_FILE, QUEUED, RUNNING

if TYPE_CHECKING:
    from studio.jobs.jobs import Jobs

_PREVIEW_RE = re.compile(r"^step_(\d+)_p(\d+)\.png$")


def job_status(jobs: Jobs, record: dict, queue_order: list[str], online: bool, brief: bool = False) -> dict:
    """Everything a page shows of one job (see :meth:`studio.jobs.jobs.Jobs.status` for the keys).

    ``brief`` (lists of many jobs, polled): the same keys, but the loss curve, the sampled ``t`` and the
    previews are left empty instead of read from the job's folder."""
    job_id = record["id"]
    folder = jobs.job_dir(job_id)
    progress = _read_json(folder / PROGRESS_FILE) or {}
    request = record.get("request") or {}
    reads_curves = record["kind"] == "train" and not brief
    losses, ts = _read_metrics(folder / "metrics.jsonl") if reads_curves else ([], [])
    if record["kind"] == "train":
        total = int(progress.get("total") or (request.get("recipe") or {}).get("steps") or 0)
    else:
        total = int((request.get("options") or {}).get("num_images") or 1)
    position = queue_order.index(job_id) + 1 if record["state"] == QUEUED and job_id in queue_order else None
    status = {
        "id": job_id, "kind": record["kind"], "state": record["state"],
        "name": record.get("name"), "style_prompt": record.get("style_prompt"),
        "backbone": record.get("backbone"), "template_id": record.get("template_id"),
        "created": record.get("created"), "started": record.get("started"), "finished": record.get("finished"),
        "step": int(progress.get("step") or (len(losses) if losses else 0)), "total_steps": total,
        "losses": losses, "t": ts, "previews": [] if brief else _read_previews(folder / "previews"),
        "queue_position": position, "eta_s": progress.get("eta_s") if record["state"] == RUNNING else None,
        "sec_per_step": progress.get("sec_per_step"), "peak_mem": progress.get("peak_mem"),
        "outputs": [str(folder / "outputs" / n) for n in record.get("outputs") or []],
        "error": record.get("error"), "message": record.get("message") or "",
        "attempts": int(record.get("attempts", 0)), "cancel_requested": (folder / CANCEL_FILE).exists(),
        "worker": (record.get("worker") or {}).get("id"), "timing": dict(record.get("timing") or {}),
        "request": copy.deepcopy(request),
        "checkpoint_step": checkpoint_step(folder) if record["kind"] == "train" else 0,
        "duration_s": _duration(record),
    }
    if record["state"] == QUEUED:
        ahead = (position or 1) - 1
        status["message"] = (f"queued: {'next' if not ahead else f'{ahead} job(s) ahead'}"
                             + ("" if online else "; no worker is running"))
        if record.get("attempts") or "finish_at_checkpoint" in record:  # re-queued, or resumed from the Jobs view
            status["message"] += f" ({record.get('message')})"
        if record["kind"] == "generate" and online:
            status["message"] += waiting_for(jobs, record)
    elif record["state"] == RUNNING and record["kind"] == "train":
        status["message"] = (f"training: step {status['step']} of {total}" if status["step"]
                             else record.get("message") or "starting")
    return status


def waiting_for(jobs: Jobs, record: dict) -> str:
    """Why a queued generation waits, when a training holds the worker: it is drawn between that
    training's steps, so the wait is about one step (or the training's set-up and first previews)."""
    running = [r for r in jobs._records() if r["state"] == RUNNING and r["kind"] == "train"
               and r.get("backbone") == record.get("backbone")]
    if not running:
        return ""
    training = running[0]
    progress = _read_json(jobs.job_dir(training["id"]) / PROGRESS_FILE) or {}
    name = training.get("name") or "a template"
    if (jobs.job_dir(training["id"]) / CANCEL_FILE).exists():
        return f": the training {name!r} is being cancelled; your pictures come right after"
    if not progress.get("step"):
        return (f": the training {name!r} is setting up and drawing its first previews; your pictures are "
                "drawn between its steps once it starts")
    sps = progress.get("sec_per_step")
    each = f" (about {sps:.0f} s each)" if isinstance(sps, int | float) and sps >= 1 else ""
    return f": drawn between the steps of the training {name!r}{each}"


def _duration(record: dict) -> float | None:
    """Seconds the job's attempts ran (None before it started); a running attempt counts up to now."""
    total, seen = 0.0, False
    for attempt in record.get("history") or []:
        start, end = _timestamp(attempt.get("started")), _timestamp(attempt.get("ended"))
        if start is None:
            continue
        seen = True
        total += max(0.0, (end if end is not None else time.time()) - start)
    return round(total, 1) if seen else None


def _timestamp(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except (TypeError, ValueError):
        return None


def _read_metrics(path: Path) -> tuple[list[float], list[float]]:
    losses: list[float] = []
    ts: list[float] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return losses, ts
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        losses.append(row.get("loss"))
        ts.extend(row.get("t") or [])
    return losses, ts


def _read_previews(folder: Path) -> list[dict]:
    by_step: dict[int, list[tuple[int, str]]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        m = _PREVIEW_RE.match(name)
        if m:
            by_step.setdefault(int(m.group(1)), []).append((int(m.group(2)), str(folder / name)))
    return [{"step": step, "files": [f for _, f in sorted(files)]} for step, files in sorted(by_step.items())]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
