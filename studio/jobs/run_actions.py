"""What the Jobs view (and ``python -m studio jobs``) can do with a job that ended: resume it from its last
checkpoint, save that checkpoint as a template, retry it with the same settings, hand its settings to
the Train form, delete its folder.

Nothing here runs a model: resuming and saving put the job back in the queue (the worker resumes from
``checkpoint/``, or writes the template from it: ``finish_at_checkpoint``), and a retry is a new job
whose folder starts with the old one's request and references.
"""

from __future__ import annotations

import shutil
import time

from studio import diskspace
from studio.engine.checkpoints import checkpoint_step
from studio.errors import InputError, NotFoundError
from studio.jobs.jobs import Jobs
from studio.jobs.records import CANCEL_FILE, CANCELLED, FAILED, FINAL, JOB_FILE, QUEUED, new_token

# A retry starts from these files of the old run (the request, its references, a refinement's plan);
# everything a run produced (checkpoints, metrics, previews, the result, outputs) stays behind.
_PRODUCED = {JOB_FILE, "progress.json", CANCEL_FILE, "metrics.jsonl", "previews", "checkpoint", "checkpoint.old",
             "checkpoint.tmp", "result", "result.tmp", "outputs"}


def _ended_training(jobs: Jobs, job_id: str, action: str) -> dict:
    record = jobs.read(job_id, fresh=True)
    if record["kind"] != "train":
        raise InputError(f"job {job_id} is a {record['kind']} job; only a training can be {action}")
    if record["state"] not in (CANCELLED, FAILED):
        raise InputError(f"job {job_id} is {record['state']}; only a cancelled or failed training can be {action}")
    return record


def _back_in_queue(jobs: Jobs, job_id: str, before: dict, message: str, **fields) -> dict:
    """The ended job queued again under a new token (its old messages stay stale)."""
    token = new_token()

    def change(r: dict) -> dict | None:
        if r["state"] != before["state"] or r.get("token") != before.get("token"):
            return None  # changed meanwhile (resumed from another page)
        return {**r, **fields, "state": QUEUED, "token": token, "queued_ts": time.time(), "worker": None,
                "finished": None, "error": None, "message": message}

    (jobs.job_dir(job_id) / CANCEL_FILE).unlink(missing_ok=True)
    if jobs.update(job_id, change) is None:
        raise InputError(f"job {job_id} changed meanwhile; look again")
    jobs.queue.enqueue(job_id, token, "train")
    return jobs.status(job_id)


def resume(jobs: Jobs, job_id: str) -> dict:
    """Queue a cancelled or failed training again; it goes on from its last checkpoint (the same
    template an uninterrupted run makes: every random draw is seeded by step). Returns its status."""
    record = _ended_training(jobs, job_id, "resumed")
    step = checkpoint_step(jobs.job_dir(job_id))
    where = f"from the checkpoint of step {step}" if step else "from the start (it had no checkpoint yet)"
    return _back_in_queue(jobs, job_id, record, f"resuming {where}", finish_at_checkpoint=False)


def save_checkpoint(jobs: Jobs, job_id: str) -> dict:
    """Queue the writing of a cancelled or failed training's last checkpoint as a template (no more
    training; the template records the step it holds). Returns the job's status."""
    record = _ended_training(jobs, job_id, "saved from its checkpoint")
    step = checkpoint_step(jobs.job_dir(job_id))
    if not step:
        every = ((record.get("request") or {}).get("recipe") or {}).get("checkpoint_every")
        raise InputError(f"job {job_id} has no checkpoint yet (one is written every {every} steps); "
                         "resume or retry it instead")
    return _back_in_queue(jobs, job_id, record, f"saving the checkpoint of step {step} as a template",
                          finish_at_checkpoint=True)


def retry(jobs: Jobs, job_id: str) -> str:
    """A new job with the same settings (a training: the same request and references; a generation: the
    same template and options). The old job is left as it is. Returns the new job's id."""
    record = jobs.read(job_id, fresh=True)
    if record["state"] not in FINAL:
        raise InputError(f"job {job_id} is still {record['state']}; cancel it first, or wait for it")
    if record["kind"] == "generate":
        request = record.get("request") or {}
        return jobs.submit_generate(request.get("template_id"), dict(request.get("options") or {}),
                                    backbone=record.get("backbone"))
    old = jobs.job_dir(job_id)
    sources = [p for p in old.iterdir() if p.name not in _PRODUCED and not p.name.startswith(".")]
    if not any(p.suffix == ".json" for p in sources):  # request.json, or an automatic refinement's plan
        raise NotFoundError(f"job {job_id} has no request left to train again")
    kind = "refine" if "-refine-" in job_id else "train"
    new_id = jobs._new_id(kind)
    new = jobs.job_dir(new_id)
    needed = sum(diskspace.folder_bytes(p) if p.is_dir() else p.stat().st_size for p in sources)
    diskspace.require_free(jobs.runs_dir, needed, "copy the run's references")
    try:
        new.mkdir(parents=True)
        for item in sources:
            if item.is_dir():
                shutil.copytree(item, new / item.name)
            else:
                shutil.copy2(item, new / item.name)
        fresh = jobs._new_record(new_id, "train", record["backbone"], name=record["name"],
                                 style_prompt=record.get("style_prompt") or "", request=record.get("request") or {})
        fresh["message"] = f"waiting for a worker (a retry of {job_id})"
        fresh["retry_of"] = job_id
        return jobs._enqueue_new(fresh)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def delete(jobs: Jobs, job_id: str) -> dict:
    """Delete an ended job's folder (its checkpoint, previews, references, outputs). A template it made
    stays in the store. Returns what went: {"deleted": id, "name", "kind", "freed_bytes"}."""
    record = jobs.read(job_id, fresh=True)
    if record["state"] not in FINAL:
        raise InputError(f"job {job_id} is still {record['state']}; cancel it first")
    folder = jobs.job_dir(job_id)
    freed = diskspace.folder_bytes(folder)
    trash = folder.with_name(f".deleting-{job_id}")  # one rename: listings never see half a folder
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    return {"deleted": job_id, "name": record.get("name"), "kind": record["kind"], "freed_bytes": freed}


def settings(jobs: Jobs, job_id: str) -> dict:
    """A training's settings for the Train form: name, style_prompt, backbone, recipe, captions and the
    reference files (paths in its folder)."""
    record = jobs.read(job_id)
    if record["kind"] != "train":
        raise InputError(f"job {job_id} is a {record['kind']} job; only a training's settings go to the Train form")
    request = record.get("request") or {}
    folder = jobs.job_dir(job_id) / "references"
    refs = [str(folder / n) for n in request.get("references") or [] if (folder / n).is_file()]
    return {"id": job_id, "name": record.get("name"), "style_prompt": record.get("style_prompt") or "",
            "backbone": record.get("backbone"), "recipe": dict(request.get("recipe") or {}),
            "captions": list(request.get("captions") or []), "references": refs}
