"""Jobs: submit, watch and cancel training / generation jobs run by the GPU worker(s).

The web UI and the CLI talk to :class:`Jobs` only. Each job has a folder ``<runs>/<job_id>/``
on the shared data folder holding its record ``job.json`` (the source of truth: any web process
on any host reads it, and it survives restarts), the training's ``request.json``,
``references/``, ``metrics.jsonl``, ``previews/``, ``checkpoint/``, ``result/``, a small
``progress.json`` and, for generations, ``outputs/``. The queue (studio.jobs.queue) only
carries "run job X" messages.

A record's states, its files and the helpers every process shares are in :mod:`studio.jobs.records`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from studio.checks import boolean, json_object, text
from studio.engine.backbones import default_backbone, resolve_allowed
from studio.engine.generation import GenerateOptions, check_request, output_size
from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, prepare_run
from studio.errors import InputError, NotFoundError, StudioError
from studio.jobs.caption_jobs import apply_crops, mark_auto_caption, prepare_caption_run
from studio.jobs.queue import PRIORITY, Queue, Settings
from studio.jobs.records import (
    CANCEL_FILE,
    CANCELLED,
    DONE,
    FAILED,
    FINAL,
    JOB_FILE,
    MAX_ATTEMPTS,
    QUEUED,
    RUNNING,
    STALE_S,
    WORKERS_DIR,
    RecordCache,
    end_attempt,
    new_token,
    now_iso,
    worker_dead,
    write_record,
)
from studio.jobs.status import job_status
from studio.media.captions import check_caption
from studio.media.images import load_reference_images, validate_name, validate_prompt
from studio.store.templates import TemplateStore

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_record_lock = threading.Lock()  # read-modify-write of records inside one process


class Jobs:
    """Job records on the data folder plus the queue their workers pull from.

    ``Jobs()`` uses the configuration (``STUDIO_DATA`` / ``STUDIO_RUNS`` / ``STUDIO_STORE`` /
    ``STUDIO_REDIS_URL``); ``Jobs(data_dir, redis_url)`` or ``Jobs(settings=...)`` set it explicitly.
    """

    def __init__(self, data_dir: str | Path | None = None, redis_url: str | None = None, *,
                 settings: Settings | None = None):
        self.settings = settings or Settings.from_env(data_dir, redis_url)
        self.runs_dir = self.settings.runs_dir
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.store = TemplateStore(self.settings.store_dir)
        self.queue = Queue(self.settings)
        self._cache = RecordCache()
        if self.queue.rebuilt:
            self._refill_queue()

    def _refill_queue(self) -> None:
        """The queue file was damaged and replaced by an empty one: the job folders are the truth, so send
        every queued job again and re-queue the running ones whose worker is gone (:meth:`reconcile`)."""
        try:
            done = self.reconcile()
        except Exception:  # the supervisor and the workers reconcile again shortly
            log.exception("could not refill the job queue from the job records")
            return
        log.warning("refilled the job queue from the job records: %d sent again, %d re-queued, %d failed",
                    len(done["resent"]), len(done["requeued"]), len(done["failed"]))

    # -- submitting ---------------------------------------------------------------------------

    def submit_train(self, images: list[str | Path], style_prompt: str, name: str, recipe: dict | None = None,
                     backbone: str | None = None, captions: list[str | None] | None = None,
                     crops: list | None = None, auto_caption: bool = False) -> str:
        """Validate a training request, copy its references into a new job folder, enqueue it.

        Everything is checked before anything is written (InputError with a readable message),
        and the normalised references are stored in the job folder, so the uploaded files may
        vanish afterwards. ``crops``: one region per image (:func:`studio.media.captions.check_crop`)
        or None. ``auto_caption``: the worker captions the images without a caption before training
        (:mod:`studio.engine.captioner`). Returns the job id.
        """
        style = validate_prompt(text(style_prompt, "style prompt", optional=True))
        name = validate_name(text(name, "template name", optional=True) or style[:60])
        recipe_obj = parse_recipe(recipe)
        spec = resolve_allowed(text(backbone, "backbone", optional=True, max_chars=1000) or default_backbone())
        loaded = load_reference_images(list(images or []))
        captions = parse_captions(captions, len(loaded))
        loaded = apply_crops(loaded, crops)
        auto_caption = boolean(auto_caption, "auto_caption")

        job_id = self._new_id("train")
        run_dir = self.job_dir(job_id)
        try:
            prepare_run(TrainRequest(loaded, style, name, recipe_obj, captions), run_dir, spec.backbone_id,
                        spec.family, spec.default_resolution)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if auto_caption:
            mark_auto_caption(run_dir)
        request = json.loads((run_dir / "request.json").read_text())
        record = self._new_record(job_id, "train", spec.backbone_id, name=name, style_prompt=style,
                                  request={"recipe": request["recipe"], "references": request["references"],
                                           "captions": request["captions"],
                                           **({"auto_caption": True} if auto_caption else {})})
        return self._enqueue_new(record)

    def submit_caption(self, images: list[str | Path], style_prompt: str | None = None,
                       crops: list | None = None) -> str:
        """Queue an auto-captioning job (kind "caption"): the worker writes one content caption per image
        (style words removed) into the job's ``captions.json`` as it goes. Returns the job id."""
        style = text(style_prompt, "style prompt", optional=True, max_chars=500) or ""
        loaded = apply_crops(load_reference_images(list(images or [])), crops)
        job_id = self._new_id("caption")
        run_dir = self.job_dir(job_id)
        try:
            names = prepare_caption_run(loaded, run_dir)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        record = self._new_record(job_id, "caption", "captioner", name=f"captions of {len(names)} image(s)",
                                  style_prompt=style.strip(), request={"references": names})
        return self._enqueue_new(record)

    def submit_refine(self, template_id: str, images: list[str | Path] | None = None,
                      captions: list[str | None] | None = None, auto: dict | None = None,
                      name: str | None = None, recipe: dict | None = None) -> str:
        """Queue round 2 of a template (StyleDrop's training with feedback, :mod:`studio.styles.refine`).

        Human feedback: ``images`` are the chosen candidates (``captions`` optional). Automatic
        feedback: ``auto`` (dict, may be empty) holds the candidate options; the worker generates,
        lets CLIP pick and then trains. Either way it is a training job on the parent's backbone
        and recipe (``recipe``: the few changes :data:`studio.styles.refine.RECIPE_OVERRIDES` allows).
        Everything is checked first (no metric models for automatic feedback: InputError saying
        so). Returns the job id.
        """
        from studio.styles import refine

        plan = refine.plan_refinement(self.store, template_id, images=images, captions=captions, auto=auto,
                                      name=name, recipe=recipe)
        spec = resolve_allowed(plan.parent.backbone or default_backbone())
        job_id = self._new_id("refine")
        run_dir = self.job_dir(job_id)
        try:
            if plan.request is not None:
                prepare_run(plan.request, run_dir, spec.backbone_id, spec.family, spec.default_resolution)
            else:  # the worker makes the candidates, scores them and writes the training request
                refine.write_plan(run_dir, plan.plan)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        request: dict = {"recipe": plan.recipe.to_dict(), "refine": plan.summary()}
        if plan.request is not None:
            written = json.loads((run_dir / "request.json").read_text())
            request.update(recipe=written["recipe"], references=written["references"], captions=written["captions"])
        record = self._new_record(job_id, "train", spec.backbone_id, name=plan.name,
                                  style_prompt=plan.parent.style_prompt, request=request)
        record["message"] = ("waiting for a worker" if plan.request is not None else
                             f"waiting for a worker to draw {plan.plan['candidates']} test pictures for CLIP")
        return self._enqueue_new(record)

    def submit_generate(self, template_id: str | None, options: dict, backbone: str | None = None) -> str:
        """Validate a text-to-image request (``options``: GenerateOptions fields) and enqueue it.

        ``template_id`` None generates with the bare base model; ``backbone`` defaults to the
        template's, else the configured default. ``options["mix"]`` names further templates by
        id; they, the style schedule, the fusion weight and the noise prior are checked here
        (unknown template, wrong model family, no stored prior...), so a bad request fails at
        once with a message instead of in the worker. Returns the job id.
        """
        opts = parse_generate_options(options)
        template = self.store.get(text(template_id, "template id")) if template_id else None
        backbone = text(backbone, "backbone", optional=True, max_chars=1000)
        spec = resolve_allowed(backbone or (template.backbone if template and template.backbone else None)
                       or default_backbone())
        if template is not None and template.family and template.family != spec.family:
            raise InputError(f"template {template.name!r} was trained for {template.family.upper()}; "
                             f"backbone {spec.backbone_id!r} is {spec.family.upper()}")
        mix = []
        for entry in opts.mix:  # store ids only: a web request never names a folder on the server
            try:
                info = self.store.get(entry["template"])
            except NotFoundError as exc:
                raise InputError(f"cannot mix in {entry['template']!r}: {exc}") from None
            mix.append((info.path, info.meta, entry["scale"]))
        check_request(opts, (template.path, template.meta) if template else None, mix, spec.family)
        output_size(opts, spec.default_resolution, template.meta if template else None)  # size and pixel budget
        job_id = self._new_id("generate")
        self.job_dir(job_id).mkdir(parents=True)
        record = self._new_record(job_id, "generate", spec.backbone_id,
                                  name=template.name if template else "base model",
                                  style_prompt=template.style_prompt if template else "",
                                  request={"template_id": template.id if template else None,
                                           "options": asdict(opts)})
        record["template_id"] = template.id if template else None
        return self._enqueue_new(record)

    # -- watching ------------------------------------------------------------------------------

    def status(self, job_id: str) -> dict:
        """Everything a page needs to show one job (JSON-friendly); NotFoundError if unknown.

        Keys: id, kind, state, name, style_prompt, backbone, template_id, created, started,
        finished, step, total_steps, losses, t, previews ([{step, files}]), queue_position
        (1 = next; None unless queued), eta_s, sec_per_step, peak_mem, outputs, error, message,
        attempts, cancel_requested, worker, timing, request.
        """
        record = self.read(job_id)
        order = self._queue_order() if record["state"] == QUEUED else []
        return self._status(record, order, online=bool(self.workers()) if record["state"] == QUEUED else True)

    def list_jobs(self, kind: str | None = None, states: str | Iterable[str] | None = None,
                  limit: int = 50, brief: bool = False) -> list[dict]:
        """Newest first: the status dicts of the jobs of this kind / in these states (``brief``: without the
        loss curves and previews, for lists that are polled)."""
        wanted = {states} if isinstance(states, str) else set(states) if states else None
        records = [r for r in self._records() if (kind is None or r["kind"] == kind)
                   and (wanted is None or r["state"] in wanted)]
        records.sort(key=lambda r: r.get("created_ts", 0), reverse=True)
        order, online = self._queue_order(), bool(self.workers())
        return [self._status(r, order, online, brief) for r in records[: max(0, int(limit))]]

    def active_job(self, kind: str = "train") -> dict | None:
        """The running job of this kind, else the most recently queued one, else None.

        A reloaded page calls this to re-attach to the job it was showing.
        """
        records = [r for r in self._records() if r["kind"] == kind and r["state"] in (RUNNING, QUEUED)]
        if not records:
            return None
        records.sort(key=lambda r: (r["state"] == RUNNING, r.get("created_ts", 0)), reverse=True)
        return self._status(records[0], self._queue_order(), bool(self.workers()))

    def workers(self) -> list[dict]:
        """Workers that beat recently: id, host, pid, state, backbones (warm), jobs (running), heartbeat."""
        folder = self.runs_dir / WORKERS_DIR
        found = []
        for path in folder.glob("*.json") if folder.is_dir() else []:
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            age = time.time() - float(info.get("heartbeat") or 0)
            if age <= STALE_S:
                found.append(info)
            elif age > 3600:  # left by a worker that was killed: nobody else removes it
                path.unlink(missing_ok=True)
        return sorted(found, key=lambda w: w.get("started", 0))

    # -- cancelling ----------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict:
        """Cancel a job: a queued one at once, a running one within one training step.

        Returns the job's status; cancelling a finished job changes nothing.
        """
        record = self.read(job_id)
        if record["state"] in FINAL:
            return self.status(job_id)
        (self.job_dir(job_id) / CANCEL_FILE).touch()  # a worker claiming it right now sees this
        if record["state"] == QUEUED and self.queue.claim(job_id, record["token"], owner="cancel"):
            self.update(job_id, lambda r: _cancelled(r, "cancelled before it started")
                        if r["state"] == QUEUED and r["token"] == record["token"] else None)
            self.queue.release(job_id, record["token"])
        return self.status(job_id)

    def publish_result(self, job_id: str) -> dict:
        """Save a finished training's kept result (``<runs>/<id>/result``) as a template, later.

        For a training whose last step, saving the template, failed (a full disk, a read-only
        store): the job failed saying its result is kept. Once there is room, this publishes it
        (once: a template already made from this job is found, not copied again) and marks the
        job done. Returns the job's status; InputError / NotFoundError when there is nothing to publish.
        """
        from studio.engine.training import publish_run

        record = self.read(job_id, fresh=True)
        if record["kind"] != "train":
            raise InputError(f"job {job_id} is a {record['kind']} job; only trainings have a template to save")
        if record["state"] == DONE:
            return self.status(job_id)
        if record["state"] != FAILED:
            raise InputError(f"job {job_id} is {record['state']}; only a training that failed while saving "
                             "its template can be published this way")
        result = self.job_dir(job_id) / "result"
        if not (result / "template.json").is_file():
            raise NotFoundError(f"job {job_id} has no finished result to save (it failed before its training "
                                "finished); train again instead")
        info = publish_run(self.store, result, record["name"], job_id)

        def published(r: dict) -> dict | None:
            if r["state"] != FAILED:
                return None
            return {**r, "state": DONE, "template_id": info.id, "error": None,
                    "message": f"saved as template {info.name!r} (published after the job)"}

        self.update(job_id, published)
        log.info("job %s: kept result published as template %s", job_id, info.id)
        return self.status(job_id)

    # -- recovery ------------------------------------------------------------------------------

    def reconcile(self, max_attempts: int = MAX_ATTEMPTS, stale_s: float = STALE_S) -> dict[str, list[str]]:
        """Make records and queue agree after crashes; safe to run from any process at any time.

        - running, but its worker is dead (pid gone on this host, or no heartbeat for ``stale_s``):
          re-queued with a new token (training resumes from its checkpoint), or failed with the
          reason once the worker died ``max_attempts`` times on it;
        - queued, but its message is gone (queue flushed, Redis restarted without persistence):
          enqueued again; queued but claimed by a process that died before starting it: re-queued.

        Returns the job ids acted on: {"requeued": [...], "failed": [...], "resent": [...]}.
        """
        done: dict[str, list[str]] = {"requeued": [], "failed": [], "resent": []}
        records = self._records()
        pending: set[tuple[str, str]] | None = None
        for record in records:
            job_id = record["id"]
            if record["state"] == RUNNING and worker_dead(record.get("worker"), stale_s):
                if self._recover_dead(record, max_attempts):
                    done["requeued"].append(job_id)
                else:
                    done["failed"].append(job_id)
            elif record["state"] == QUEUED:
                if pending is None:
                    pending = set(self.queue.pending())
                if (job_id, record["token"]) in pending:
                    continue
                claim = self.queue.claim_info(job_id, record["token"])
                if claim is None:
                    self.queue.enqueue(job_id, record["token"], record["kind"])
                    done["resent"].append(job_id)
                elif time.time() - float(claim.get("time") or 0) > stale_s:
                    if claim.get("owner") == "cancel" or (self.job_dir(job_id) / CANCEL_FILE).exists():
                        self.update(job_id, lambda r: _cancelled(r, "cancelled before it started")
                                    if r["state"] == QUEUED else None)
                    else:
                        self.requeue(job_id, "the worker that took this job stopped before starting it")
                        done["requeued"].append(job_id)
        return done

    def _recover_dead(self, record: dict, max_attempts: int) -> bool:
        worker = record.get("worker") or {}
        crashes = int(record.get("crashes", 0)) + 1
        where = f"worker {worker.get('id', '?')}"
        if crashes >= max_attempts:
            reason = (f"the worker process stopped {crashes} times while running this job "
                      f"(last: {where}); giving up")

            def fail(r: dict) -> dict | None:
                if r["state"] != RUNNING or r.get("token") != record["token"]:
                    return None
                end_attempt(r, "worker died")
                return {**r, "state": FAILED, "crashes": crashes, "error": reason, "message": reason,
                        "finished": now_iso(), "worker": None}

            self.update(record["id"], fail)
            self.queue.release(record["id"], record["token"])
            log.warning("job %s failed: %s", record["id"], reason)
            return False
        self.requeue(record["id"], f"the {where} stopped; resuming from the last checkpoint",
                     expect_token=record["token"], crashed=True)
        log.warning("job %s re-queued: its %s is gone", record["id"], where)
        return True

    def requeue(self, job_id: str, reason: str, expect_token: str | None = None, crashed: bool = False) -> None:
        """Put a job back in the queue with a new token (its old messages become stale)."""
        token, before = new_token(), {}

        def change(r: dict) -> dict | None:
            if r["state"] in FINAL or (expect_token and r.get("token") != expect_token):
                return None
            if r["state"] == RUNNING:
                end_attempt(r, reason)
            before.update(r)
            return {**r, "state": QUEUED, "token": token, "queued_ts": time.time(), "worker": None,
                    "message": reason, "crashes": int(r.get("crashes", 0)) + (1 if crashed else 0)}

        if self.update(job_id, change) is not None:
            self.queue.release(job_id, before["token"])
            self.queue.enqueue(job_id, token, before["kind"])

    # -- records (also used by the worker) -----------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _ID_RE.match(job_id) or ".." in job_id:
            raise NotFoundError(f"{str(job_id)[:80]!r} is not a job id")
        return self.runs_dir / job_id

    def read(self, job_id: str, fresh: bool = False) -> dict:
        """The job's record (a copy); NotFoundError if there is none. ``fresh`` bypasses the cache."""
        return copy.deepcopy(self._load(job_id, fresh))

    def _load(self, job_id: str, fresh: bool = False) -> dict:
        """The record as cached: shared, never to be mutated (listing reads every record per poll)."""
        path = self.job_dir(job_id) / JOB_FILE
        try:
            stat = path.stat()
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(job_id)
            # Trust the cache only for files not touched in the last second: file times are coarse.
            if not fresh and cached and cached[0] == key and time.time() - stat.st_mtime > 1.0:
                return cached[1]
            record = json.loads(path.read_text())
        except FileNotFoundError:
            self._cache.discard(job_id)
            raise NotFoundError(f"no job {job_id!r}") from None
        except (OSError, ValueError) as exc:
            self._cache.discard(job_id)
            raise NotFoundError(f"job {job_id!r} has an unreadable record: {exc}") from None
        self._cache.put(job_id, key, record)
        return record

    def update(self, job_id: str, change: Callable[[dict], dict | None] | dict[str, Any]) -> dict | None:
        """Read-modify-write a record atomically (per process; one writer per state by design).

        ``change`` is a dict of fields to set, or a function returning the new record (or None
        to leave it alone). Returns the new record, or None if nothing was written.
        """
        with _record_lock:
            record = self.read(job_id, fresh=True)
            new = {**record, **change} if isinstance(change, dict) else change(record)
            if new is None:
                return None
            write_record(self.job_dir(job_id) / JOB_FILE, new)
            return new

    def _records(self) -> list[dict]:
        out = []
        try:
            entries = list(os.scandir(self.runs_dir))
        except FileNotFoundError:
            return out
        names = {entry.name for entry in entries}
        self._cache.retain(names)  # deleted job folders: their records leave the cache too
        for entry in entries:
            if entry.name.startswith(".") or not _ID_RE.match(entry.name):
                continue
            try:
                out.append(self._load(entry.name))
            except NotFoundError:
                continue  # a CLI run folder, or a job being created
        return out

    def queued(self, kind: str | None = None, backbone: str | None = None) -> list[dict]:
        """Queued records (of this kind / for this backbone) in the order workers take them."""
        queued = [r for r in self._records() if r["state"] == QUEUED and (kind is None or r["kind"] == kind)
                  and (backbone is None or r.get("backbone") == backbone)]
        queued.sort(key=lambda r: (-PRIORITY.get(r["kind"], 0), r.get("queued_ts", 0)))
        return queued

    def _queue_order(self) -> list[str]:
        return [r["id"] for r in self.queued()]

    def _new_id(self, kind: str) -> str:
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(4)}"

    def _new_record(self, job_id: str, kind: str, backbone: str, *, name: str, style_prompt: str,
                    request: dict) -> dict:
        now = time.time()
        return {
            "id": job_id, "kind": kind, "state": QUEUED, "name": name, "style_prompt": style_prompt,
            "backbone": backbone, "template_id": None, "request": request,
            "created": now_iso(), "created_ts": now, "queued_ts": now, "started": None, "finished": None,
            "token": new_token(), "attempts": 0, "crashes": 0, "history": [], "worker": None,
            "error": None, "message": "waiting for a worker", "outputs": [], "timing": {},
        }

    def _enqueue_new(self, record: dict) -> str:
        job_id = record["id"]
        write_record(self.job_dir(job_id) / JOB_FILE, record)
        try:
            self.queue.enqueue(job_id, record["token"], record["kind"])
        except StudioError as exc:
            self.update(job_id, {"state": FAILED, "error": str(exc), "message": str(exc), "finished": now_iso()})
            raise
        log.info("job %s (%s) queued", job_id, record["kind"])
        return job_id

    # -- the status dict -----------------------------------------------------------------------

    def _status(self, record: dict, queue_order: list[str], online: bool, brief: bool = False) -> dict:
        return job_status(self, record, queue_order, online, brief)


# -- helpers ---------------------------------------------------------------------------------


def parse_recipe(recipe: dict | None) -> Recipe:
    """A validated Recipe from a UI/CLI dict (Recipe fields, plus an optional ``preset``).

    Anything but a dict (a list, a string) is refused: ignoring it would silently train the defaults.
    """
    data = json_object(recipe, "the training options (recipe)", '{"preset": "quick", "steps": 100}')
    preset = data.pop("preset", None)
    preset = "paper" if preset is None or preset == "" else preset
    unknown = sorted(str(k) for k in set(data) - {f.name for f in fields(Recipe)})
    if unknown:
        raise InputError(f"unknown recipe setting(s): {', '.join(unknown)}")
    try:
        return Recipe.from_preset(preset, **data).validate()
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid recipe: {exc}") from None


def parse_captions(captions: list[str | None] | None, n_images: int) -> list[str | None] | None:
    """One optional content caption per image (blank means none; at most
    :data:`studio.media.captions.MAX_CAPTION_CHARS` characters on one line), or None."""
    if captions is None or (isinstance(captions, list | tuple) and not captions):
        return None
    if not isinstance(captions, list | tuple) or not all(isinstance(c, str | None) for c in captions):
        raise InputError("captions must be a list of texts, one per image (blank for none)")
    if len(captions) != n_images:
        raise InputError(f"give one caption per image ({n_images}), or none")
    out = [check_caption(c, f"caption of image {i + 1}") for i, c in enumerate(captions)]
    return out if any(out) else None


def parse_generate_options(options: dict) -> GenerateOptions:
    """Validated GenerateOptions from a dict of its fields (anything but a dict is refused)."""
    data = json_object(options, "generation options", '{"prompt": "a cat", "seed": 1}')
    unknown = sorted(str(k) for k in set(data) - {f.name for f in fields(GenerateOptions)})
    if unknown:
        raise InputError(f"unknown generation option(s): {', '.join(unknown)}")
    data.setdefault("prompt", "")  # a missing prompt gets the "prompt is empty" message
    try:
        return GenerateOptions(**data).validate()
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid generation options: {exc}") from None


def _cancelled(record: dict, message: str) -> dict:
    if record["state"] == RUNNING:
        end_attempt(record, "cancelled")
    return {**record, "state": CANCELLED, "finished": now_iso(), "message": message, "worker": None}
