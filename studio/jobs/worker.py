"""The GPU worker process (``python -m studio.jobs.worker``, one per GPU).

A worker is a Huey consumer with one worker thread. It loads a backbone once and keeps it warm
for every later job, runs trainings and generations, writes progress into the job folders,
beats a heartbeat into the record of the job it runs, and between training steps serves
queued generations for the same backbone (so a generation never waits for a whole training).

Add workers on other GPUs / hosts by pointing them at the same data folder and Redis::

    STUDIO_DATA=/shared/studio CUDA_VISIBLE_DEVICES=1 python -m studio.jobs.worker --redis redis://host:6379/0

The app starts and restarts the worker on its own host through :class:`studio.jobs.supervisor.Supervisor`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from studio.diskspace import DiskFullError
from studio.engine.backbones import clean
from studio.engine.training import (
    ADAPTER,
    Observer,
    StepReport,
    publish_run,
    result_from_checkpoint,
    train,
    training_paused,
    write_json,
)
from studio.errors import CancelledError, NotFoundError, StudioError
from studio.jobs import records as J
from studio.jobs.jobs import Jobs
from studio.jobs.queue import Settings
from studio.jobs.records import now_iso
from studio.jobs.warm_models import WarmBackbones, download_message, is_oom, oom_message, release_memory
from studio.media.images import slugify

log = logging.getLogger("studio.jobs.worker")

HEARTBEAT_S = float(os.environ.get("STUDIO_HEARTBEAT_S", "2"))
RECONCILE_S = 30.0  # each worker also heals records left by dead workers on other hosts
INLINE_CHECK_S = 0.5  # how often a training looks for generations to serve between its steps
STAGING_MAX_AGE_S = 3600.0  # at start: staging folders untouched this long were left by a killed import/publish
_WORKER: Worker | None = None  # the worker of this process; the Huey task hands messages to it


def handle_message(job_id: str, token: str) -> None:
    """Entry point of the Huey task: run the job if this message is still current."""
    if _WORKER is None:
        raise RuntimeError("no studio worker in this process; start one with `python -m studio.worker`")
    _WORKER.handle(job_id, token)


class StopJob(Exception):
    """A running job has to stop: ``reason`` is "cancel", "shutdown" or "lost" (someone else owns it)."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def _test_oom_hook() -> tuple[str, int] | None:
    """TEST ONLY: ``STUDIO_TEST_OOM="<job name>:<step>"`` makes that training step raise OutOfMemoryError."""
    value = os.environ.get("STUDIO_TEST_OOM")
    if not value or ":" not in value:
        return None
    name, step = value.rsplit(":", 1)
    return name, int(step)


class JobObserver(Observer):
    """Training progress -> progress.json; cancel / shutdown checks; generations between steps."""

    def __init__(self, worker: Worker, record: dict, token: str, backbone, started: float):
        self.worker, self.record, self.token, self.backbone = worker, record, token, backbone
        self.job_id = record["id"]
        self.folder = worker.jobs.job_dir(self.job_id)
        self.started = started
        self.progress: dict = {"step": 0, "total": (record["request"].get("recipe") or {}).get("steps")}
        self.stop_reason: str | None = None
        self.first_step = True
        self.oom_at = _test_oom_hook()

    def on_step(self, report: StepReport) -> None:
        if self.first_step:
            self.first_step = False
            self.worker._note(self.job_id, self.token, first_step_s=round(time.perf_counter() - self.started, 3),
                              resumed_from=report.step - 1)
        if self.oom_at and self.oom_at == (self.record["name"], report.step):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected by STUDIO_TEST_OOM)")
        self.progress.update(step=report.step, total=report.total, loss=report.loss, eta_s=report.eta_s,
                             sec_per_step=report.sec_per_step, peak_mem=report.peak_mem, updated=time.time())
        self._write()
        self.worker.serve_generations(self.backbone, self.job_id)

    def on_preview(self, step: int, files: list[Path]) -> None:
        self.progress.update(preview_step=step, previews=[str(f) for f in files])
        self._write()

    def on_checkpoint(self, step: int) -> None:
        self.progress["checkpoint_step"] = step
        self._write()

    def should_stop(self) -> bool:
        if (self.folder / J.CANCEL_FILE).exists():
            self.stop_reason = "cancel"
        elif self.worker.stop_flag.is_set():
            self.stop_reason = "shutdown"
        elif self.job_id in self.worker.lost:
            self.stop_reason = "lost"
        return self.stop_reason is not None

    def _write(self) -> None:
        write_json(self.folder / J.PROGRESS_FILE, self.progress)


class Worker:
    """One GPU worker process: the warm model, the job runners and the heartbeat."""

    def __init__(self, settings: Settings, parent_pid: int | None = None):
        import psutil

        self.jobs = Jobs(settings=settings)
        self.store = self.jobs.store
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.pid_started = psutil.Process().create_time()
        self.id = f"{self.host}-{self.pid}-{secrets.token_hex(2)}"
        self.started = time.time()
        self.backbones = WarmBackbones()
        self.captioner = None  # studio.engine.captioner.Captioner, loaded by the first caption job
        self.stop_flag = threading.Event()  # replaced by the consumer's: set on graceful shutdown
        self.active: dict[str, str] = {}  # job_id -> token of the jobs running in this process
        self.lost: set[str] = set()  # jobs whose record says someone else owns them now
        self.parent_pid = parent_pid
        self.state = "starting"
        self._closing = threading.Event()
        self._last_inline = 0.0
        self._status_path = self.jobs.runs_dir / J.WORKERS_DIR / f"{self.id}.json"

    # -- the process ---------------------------------------------------------------------------

    def run(self, preload: str | None = None) -> None:
        """Serve the queue until SIGTERM (graceful) or SIGINT (immediate)."""
        global _WORKER
        _WORKER = self
        gpu_lock = _lock_gpu()  # noqa: F841 (held until the process exits)
        self.jobs.reconcile()  # jobs left running by a worker that died on this host resume now
        self.clean_store()
        consumer = self.jobs.queue.consumer(handle_message)
        self.stop_flag = consumer.stop_flag
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        try:
            if preload:
                self.state = "loading"
                self._write_status()
                self.backbones.get(preload)
            self.state = "ready"
            self._write_status()
            log.info("worker %s ready on %s (%s)", self.id, self.jobs.queue.describe(), self.jobs.runs_dir)
            consumer.run()
        finally:
            self._closing.set()
            for job_id, token in list(self.active.items()):  # stopped at once (SIGINT): hand the job back now
                self.jobs.requeue(job_id, "the worker was interrupted; the job resumes from its last checkpoint",
                                  expect_token=token)
            self._status_path.unlink(missing_ok=True)
            log.info("worker %s stopped", self.id)

    def handle(self, job_id: str, token: str) -> None:
        """Run a job from a queue message, unless the message is stale or someone else took the job."""
        try:
            record = self.jobs.read(job_id, fresh=True)
        except NotFoundError:
            log.warning("skipping a message for unknown job %s", job_id)
            return
        if record["state"] != J.QUEUED or record["token"] != token:
            log.info("skipping job %s: %s (message is stale)", job_id, record["state"])
            return
        if not self.jobs.queue.claim(job_id, token, self.id):
            log.info("skipping job %s: already taken", job_id)
            return
        self.run_claimed(job_id, token)

    def run_claimed(self, job_id: str, token: str, backbone=None, inline_of: str | None = None) -> None:
        """Run a job whose token this worker claimed. ``backbone`` and ``inline_of`` are set for a
        generation served between the steps of training ``inline_of``. Never raises for a job's own failure."""
        started = time.perf_counter()
        record = self.jobs.update(job_id, lambda r: self._start(r, token, inline_of))
        if record is None:  # changed since we read it (cancelled, re-queued): not ours any more
            return
        self.lost.discard(job_id)
        self.active[job_id] = token
        self.state = "busy"
        observer_step: list[int] = []
        ok = False
        try:
            self._write_status()
            if (self.jobs.job_dir(job_id) / J.CANCEL_FILE).exists():
                raise StopJob("cancel", "cancelled before it started")
            if record["kind"] == "train":
                self._run_train(record, token, started, observer_step)
            elif record["kind"] == "generate":
                self._run_generate(record, token, started, backbone)
            elif record["kind"] == "caption":
                self._run_caption(record, token)
            else:
                raise StudioError(f"this worker cannot run {record['kind']!r} jobs")
            ok = True
        except StopJob as stop:
            self._stopped(job_id, token, stop)
        except Exception as exc:
            if is_oom(exc):
                message = oom_message(record, observer_step[-1] if observer_step else None)
            elif isinstance(exc, StudioError):
                message = str(exc)
            else:
                log.exception("job %s failed", job_id)
                message = f"internal error: {type(exc).__name__}: {exc}"
            log.warning("job %s failed: %s", job_id, message)
            self._finish(job_id, token, J.FAILED, error=message, message=message)
        finally:
            if not ok or record["kind"] == "train":
                self.restore_models(inline=backbone)
            self.active.pop(job_id, None)
            self.lost.discard(job_id)
            release_memory()
            if backbone is None:
                self.state = "ready"
            self._write_status()

    # -- runners -------------------------------------------------------------------------------

    def _run_train(self, record: dict, token: str, started: float, observer_step: list[int]) -> None:
        job_id = record["id"]
        run_dir = self.jobs.job_dir(job_id)
        recipe = record["request"].get("recipe") or {}
        if record["request"].get("auto_caption"):  # captions first: the captioner is gone before the model loads
            self._caption_training(record, token)
        # Memory tier first: a run that cannot fit is refused here, before any model is loaded.
        from studio.engine.memory import plan_training

        plan = plan_training(record["backbone"], recipe)
        self._note(job_id, token, memory_tier=plan.tier.name, expected_peak_bytes=plan.peak_bytes,
                   message=f"{plan.describe()}; loading the model")
        backbone, load_s = self.backbones.get(record["backbone"], recipe.get("precision") or "auto", plan,
                                              on_download=self._download_note(job_id, token, f"{plan.describe()}; "))
        attempt = int(record.get("attempts", 1))
        self._note(job_id, token, load_s=round(load_s, 3), backbone_loads=self.backbones.loads,
                   message=(f"{plan.describe()}; " if plan.on_gpu else "") +
                   ("preparing the training" if attempt == 1 else
                    f"resuming from the last checkpoint (attempt {attempt})"))
        result = run_dir / "result"
        if record.get("finish_at_checkpoint") and not (result / "template.json").exists():
            # "Save the last checkpoint as a template" (studio.jobs.run_actions): no further training
            self._note(job_id, token, message="saving the last checkpoint as a template")
            result_from_checkpoint(backbone, run_dir)
        if not (result / "template.json").exists():  # a finished training is never run twice
            if not (run_dir / "request.json").exists():  # automatic refinement: CLIP picks the images first
                self._pick_for_refine(record, token, backbone)
            observer = JobObserver(self, record, token, backbone, started)
            try:
                train(backbone, run_dir, observer, micro_batch=plan.micro_batch)
            except CancelledError as exc:
                raise StopJob(observer.stop_reason or "cancel", str(exc)) from None
            except Exception:
                observer_step.append((observer.progress.get("step") or 0) + 1)  # the step that failed
                raise
        info = self._publish(job_id, result, record["name"])
        steps = json.loads((result / "template.json").read_text()).get("steps_done")
        total = (record["request"].get("recipe") or {}).get("steps")
        at = f" (the checkpoint of step {steps} of {total})" if record.get("finish_at_checkpoint") else ""
        self._finish(job_id, token, J.DONE, template_id=info.id, message=f"saved as template {info.name!r}{at}")

    # -- auto-captioning (studio.engine.captioner) ----------------------------------------------

    def _captioner(self, job_id: str, token: str):
        """The warm captioner (loaded, and downloaded on first use, with the progress in the job's message)."""
        from studio.engine.captioner import Captioner

        if self.captioner is None:
            captioner = Captioner()
            self._note(job_id, token, message=f"loading the captioning model {captioner.source}")
            captioner.load(on_download=self._download_note(job_id, token, "captioning model: "))
            self.captioner = captioner
        return self.captioner

    def drop_captioner(self) -> None:
        """Free the captioner's memory (before a training loads its backbone)."""
        if self.captioner is not None:
            self.captioner.close()
            self.captioner = None
            release_memory()

    def _stop_check(self, job_id: str, what: str):
        folder = self.jobs.job_dir(job_id)

        def check() -> None:
            if (folder / J.CANCEL_FILE).exists():
                raise StopJob("cancel", f"cancelled while {what}")
            if self.stop_flag.is_set():
                raise StopJob("shutdown")
            if job_id in self.lost:
                raise StopJob("lost")
        return check

    def _run_caption(self, record: dict, token: str) -> None:
        """A caption job: one content caption per picture into ``captions.json``; cancel works between pictures."""
        from studio.jobs.caption_jobs import run_caption_job

        job_id = record["id"]
        folder = self.jobs.job_dir(job_id)
        total = len(record["request"]["references"])
        check = self._stop_check(job_id, "captioning")
        check()
        captioner = self._captioner(job_id, token)

        def progress(done: int, total: int) -> None:
            write_json(folder / J.PROGRESS_FILE, {"step": done, "total": total, "updated": time.time()})
            self._note(job_id, token, message=f"captioned {done} of {total} picture(s)")

        captions = run_caption_job(folder, record.get("style_prompt") or "", captioner, check, progress)
        self._finish(job_id, token, J.DONE, message=f"{sum(1 for c in captions if c)} of {total} picture(s) captioned")

    def _caption_training(self, record: dict, token: str) -> None:
        """A training asked to auto-caption: caption its uncaptioned references first (typed captions win).
        Without a captioning model the training goes on with the typed and default captions, saying so."""
        from studio.jobs.caption_jobs import caption_training_references

        job_id = record["id"]
        say = lambda message: self._note(job_id, token, message=message)  # noqa: E731
        try:
            captions = caption_training_references(self.jobs.job_dir(job_id), lambda: self._captioner(job_id, token),
                                                   self._stop_check(job_id, "captioning the references"), say)
        except StudioError as exc:  # no weights, a failed download: train with what there is
            log.warning("job %s: auto-captioning skipped: %s", job_id, exc)
            say(f"auto-captioning skipped ({exc}); training with the typed and default captions")
            captions = None
        finally:
            self.drop_captioner()
        if captions is not None:
            self.jobs.update(job_id, lambda r: {**r, "request": {**r["request"], "captions": captions}}
                             if r.get("token") == token and r["state"] == J.RUNNING else None)

    def restore_models(self, inline=None) -> None:
        """After a failed or stopped job (and after every training): put the warm model back as loaded.

        Every LoRA adapter and all peft state go, and the model is checked against the clean state
        recorded when it was loaded; a model that cannot be vouched for is dropped, so the next job
        loads it again instead of failing on what this one left. ``inline`` is the backbone of a
        training that a generation ran inside: only the generation's adapters go, the training's stay.
        """
        if inline is not None:
            try:
                clean.remove_adapters(inline, keep=(ADAPTER,))
            except Exception:  # the training notices at its next step, fails, and restores the model
                log.exception("could not remove the adapters of a failed generation")
            return
        for backbone in self.backbones.models():
            clean.restore(backbone)
            try:
                state = getattr(backbone, "clean_state", None)
                found = clean.problems(backbone, state) if state else ["its clean state was never recorded"]
            except Exception as exc:
                found = [f"the check failed: {type(exc).__name__}: {exc}"]
            if found:
                log.warning("dropping the warm %s backbone; the next job loads it again (%s)",
                            backbone.backbone_id, "; ".join(found[:3]))
                self.backbones.drop(backbone)

    def clean_store(self) -> None:
        """At start: remove what killed processes left in the store (staging folders, temp files)."""
        try:
            removed = self.store.clean_staging(max_age_s=STAGING_MAX_AGE_S)
        except OSError as exc:
            log.warning("could not clean the template store's staging folder: %s", exc)
            return
        if removed:
            log.info("removed %d leftover(s) of interrupted imports / exports from the template store", removed)

    def _pick_for_refine(self, record: dict, token: str, backbone) -> None:
        """Automatic feedback (studio.styles.refine): generate candidates with the parent template, score them
        with CLIP and write the round-2 training request. Cancel and shutdown work between candidates."""
        from studio.styles.metrics import StyleScorer
        from studio.styles.refine import PLAN_FILE, check_scorer, prepare_automatic

        job_id = record["id"]
        run_dir = self.jobs.job_dir(job_id)
        if not (run_dir / PLAN_FILE).exists():
            raise StudioError("this training job has no request (its folder is incomplete)")

        def check() -> None:
            if (run_dir / J.CANCEL_FILE).exists():
                raise StopJob("cancel", "cancelled while making candidates")
            if self.stop_flag.is_set():
                raise StopJob("shutdown")
            if job_id in self.lost:
                raise StopJob("lost")

        # A scorer of its own, dropped afterwards: the metric models must not sit on the GPU while it trains.
        scorer = StyleScorer(download=False)
        check_scorer(scorer)
        try:
            prepare_automatic(backbone, run_dir, self.store, scorer,
                              say=lambda message: self._note(job_id, token, message=message), check=check)
        finally:
            del scorer
            release_memory()

    def _run_generate(self, record: dict, token: str, started: float, backbone=None) -> None:
        from studio.engine.generation import GenerateOptions, generate
        from studio.engine.mixing import resolve_mix

        job_id = record["id"]
        folder = self.jobs.job_dir(job_id)
        options = GenerateOptions(**record["request"]["options"])
        template_id = record["request"].get("template_id")
        template = None
        if template_id:
            info = self.store.get(template_id)
            template = (info.path, info.meta)
        # Mixed-in templates are store ids (checked at submit); resolved once here, before any model work,
        # so a template deleted since then fails the job with a message instead of mid-way.
        mix = resolve_mix(self.store, options.mix)
        if backbone is None:
            backbone, load_s = self.backbones.get(record["backbone"], on_download=self._download_note(job_id, token))
            self._note(job_id, token, load_s=round(load_s, 3), backbone_loads=self.backbones.loads)
        names: list[str] = []
        # Files are named after the template as it is called now (a renamed template keeps its id)
        stem = slugify(template[1].get("name") or template_id) if template else "base"
        for k in range(options.num_images):  # one image at a time: cancel works between images
            if (folder / J.CANCEL_FILE).exists():
                raise StopJob("cancel", f"cancelled after {k} of {options.num_images} images")
            one = replace(options, seed=options.seed + k, num_images=1)
            try:
                files = generate(backbone, one, folder / "outputs", template, stem=stem, mix=mix,
                                 should_stop=lambda: (folder / J.CANCEL_FILE).exists())
            except CancelledError:
                raise StopJob("cancel", f"cancelled while drawing image {k + 1} of {options.num_images}") from None
            names += [f.name for f in files]
            write_json(folder / J.PROGRESS_FILE, {"step": k + 1, "total": options.num_images, "updated": time.time()})
            timing = {"first_image_s": round(time.perf_counter() - started, 3)} if k == 0 else {}
            self._note(job_id, token, outputs=names, **timing)
        self._finish(job_id, token, J.DONE, message=f"{len(names)} image(s) generated")

    def serve_generations(self, backbone, training_job: str) -> None:
        """Between training steps: run the queued generations for this backbone right away."""
        now = time.monotonic()
        if now - self._last_inline < INLINE_CHECK_S or self.stop_flag.is_set():
            return
        self._last_inline = now
        for record in self.jobs.queued(kind="generate", backbone=backbone.backbone_id):
            if not self.jobs.queue.claim(record["id"], record["token"], self.id):
                continue
            log.info("serving generation %s between steps of %s", record["id"], training_job)
            with training_paused(backbone):
                self.run_claimed(record["id"], record["token"], backbone=backbone, inline_of=training_job)

    # -- publishing and record changes ---------------------------------------------------------

    def _publish(self, job_id: str, result: Path, name: str):
        """Copy the run's result into the store, once: a retry finds the template it made before.

        If the store cannot take it (full disk, read-only folder) the job fails with a message
        saying where the result is kept and how to publish it later (``Jobs.publish_result``).
        """
        record = self.jobs.read(job_id, fresh=True)
        if record.get("template_id"):
            try:
                return self.store.get(record["template_id"])
            except NotFoundError:
                pass
        try:
            return publish_run(self.store, result, name, job_id)
        except (OSError, DiskFullError) as exc:
            reason = str(exc) if isinstance(exc, DiskFullError) else (exc.strerror or str(exc))
            raise StudioError(f"the training finished but its template could not be saved ({reason}); the result "
                              f"is kept in {result}: make room, then run `python -m studio jobs publish {job_id}`"
                              ) from exc

    def _start(self, record: dict, token: str, inline_of: str | None) -> dict | None:
        if record["state"] != J.QUEUED or record.get("token") != token:
            return None
        attempt = int(record.get("attempts", 0)) + 1
        worker = {"id": self.id, "host": self.host, "pid": self.pid, "pid_started": self.pid_started,
                  "heartbeat": time.time()}
        history = list(record.get("history") or [])
        history.append({"attempt": attempt, "worker": self.id, "started": now_iso(), "ended": None})
        timing = {**record.get("timing", {}), "queued_s": round(time.time() - record["queued_ts"], 3)}
        if inline_of:
            timing["served_during"] = inline_of  # a generation run between the steps of this training
        return {**record, "state": J.RUNNING, "started": record.get("started") or now_iso(), "attempts": attempt,
                "worker": worker, "history": history, "error": None,
                "message": "starting" if attempt == 1 else f"resuming (attempt {attempt})", "timing": timing}

    def _finish(self, job_id: str, token: str, state: str, **fields) -> None:
        def change(r: dict) -> dict | None:
            if r.get("token") != token or r["state"] in J.FINAL:
                return None
            J.end_attempt(r, state)
            return {**r, **fields, "state": state, "finished": now_iso(), "worker": None}

        self.jobs.update(job_id, change)
        self.jobs.queue.release(job_id, token)
        log.info("job %s %s%s", job_id, state, f": {fields['error']}" if fields.get("error") else "")

    def _stopped(self, job_id: str, token: str, stop: StopJob) -> None:
        if stop.reason == "cancel":
            self._finish(job_id, token, J.CANCELLED, message=str(stop))
        elif stop.reason == "shutdown":
            self.jobs.requeue(job_id, "the worker was stopped; the job resumes from its last checkpoint",
                              expect_token=token)
        else:
            log.warning("job %s: stopped, another worker owns it now", job_id)

    def _download_note(self, job_id: str, token: str, prefix: str = ""):
        """A callback that shows a first model download in the job's message (throttled by the downloader)."""
        def say(progress) -> None:
            self._note(job_id, token, message=prefix + download_message(progress))
        return say

    def _note(self, job_id: str, token: str, message: str | None = None, outputs: list[str] | None = None,
              **timing) -> None:
        """Add timings / a message / outputs to the record of a job this worker still owns."""
        def change(r: dict) -> dict | None:
            if r.get("token") != token or r["state"] != J.RUNNING:
                return None
            new = {**r, "timing": {**r.get("timing", {}), **timing}}
            if outputs is not None:
                new["outputs"] = list(outputs)
            return {**new, "message": message} if message else new

        self.jobs.update(job_id, change)

    # -- heartbeat -----------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        last_reconcile = time.monotonic()
        while not self._closing.wait(HEARTBEAT_S):
            try:
                self._beat()
                if self.parent_pid and os.getppid() != self.parent_pid:
                    log.warning("the app that started this worker is gone; stopping")
                    self.parent_pid = None
                    os.kill(self.pid, signal.SIGTERM)  # graceful: the running job is re-queued
                if time.monotonic() - last_reconcile > RECONCILE_S:
                    last_reconcile = time.monotonic()
                    self.jobs.reconcile()
            except Exception:  # the heartbeat must outlive a hiccup of the shared folder or Redis
                log.exception("heartbeat failed")

    def _beat(self) -> None:
        for job_id, token in list(self.active.items()):
            def touch(r: dict, token: str = token) -> dict | None:
                mine = (r["state"] == J.RUNNING and r.get("token") == token
                        and (r.get("worker") or {}).get("id") == self.id)
                return {**r, "worker": {**r["worker"], "heartbeat": time.time()}} if mine else None

            if self.jobs.update(job_id, touch) is None and self.active.get(job_id) == token:
                # Re-queued or failed by a reconciler that took this worker for dead: stop, do not fight.
                self.lost.add(job_id)
        self._write_status()

    def _write_status(self) -> None:
        """``<runs>/.workers/<id>.json``: lets web processes show who is online (best effort)."""
        try:
            self._status_path.parent.mkdir(parents=True, exist_ok=True)
            J.write_record(self._status_path, {
                "id": self.id, "host": self.host, "pid": self.pid, "started": self.started,
                "heartbeat": time.time(), "state": self.state, "backbones": self.backbones.ids(),
                "loads": self.backbones.loads, "jobs": list(self.active), "queue": self.jobs.settings.backend,
            })
        except OSError as exc:
            log.warning("could not write the worker status file: %s", exc)


def _lock_gpu():
    """Hold a host-wide lock on this process's GPU(s): never two copies of a base model on one GPU
    (e.g. a new worker while the previous one is still shutting down). No lock on the CPU."""
    import fcntl

    import torch

    if not torch.cuda.is_available():
        return None
    key = (os.environ.get("CUDA_VISIBLE_DEVICES") or "all").replace(",", "_")
    handle = open(Path(tempfile.gettempdir()) / f"studio-gpu-{key}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("another studio worker holds GPU %s; waiting for it to stop", key)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def main(argv: list[str] | None = None) -> int:
    """``python -m studio.jobs.worker``: serve the configured queue until stopped."""
    parser = argparse.ArgumentParser(prog="python -m studio.jobs.worker",
                                     description="Style Template Studio GPU worker (one per GPU)")
    parser.add_argument("--backbone", help="load this backbone at start (default: when the first job needs it)")
    parser.add_argument("--redis", help="Redis URL of the shared queue (env STUDIO_REDIS_URL; "
                                        "default: the SQLite queue in the data folder)")
    parser.add_argument("--data", help="data folder shared with the web app (env STUDIO_DATA, default .)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=os.environ.get("STUDIO_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(args.data, args.redis)
    try:
        if args.backbone:
            from studio.engine.backbones import resolve

            args.backbone = resolve(args.backbone).backbone_id
        Worker(settings, parent_pid=args.parent_pid).run(preload=args.backbone)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["Worker", "WarmBackbones", "handle_message", "main"]

if __name__ == "__main__":
    # Run the importable module's main, so the Huey task (which imports studio.jobs.worker) finds this worker.
    from studio.jobs.worker import main as _main

    sys.exit(_main())
