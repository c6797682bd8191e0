"""The studio's actions as plain, JSON-friendly functions: what the web UI and ``gradio_client`` call.

:class:`StudioAPI` wraps :class:`studio.jobs.jobs.Jobs` (training and generation run in the GPU
worker, never here) and the template store, and adds what only a front end needs: a name
suggested from the style prompt, checked reference tiles and captions, the Jobs view's actions,
exports into a download folder and Hub sharing, finding and refining styles. Generating (pictures,
comic pages and memes composed from panel jobs, the history) is its other half,
:class:`studio.api.generation.Generation`.

Every user mistake raises :class:`studio.errors.StudioError` (mostly ``InputError``) with a
message meant for the user; the UI turns it into ``gr.Error``. No Gradio here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.api.generation import Generation
from studio.checks import MAX_SEED, boolean, finite_float, json_object, strict_int, text
from studio.engine.backbones import KNOWN_BACKBONES
from studio.engine.generation import ASPECTS, MAX_LORA_SCALE
from studio.engine.noise_prior import PRIOR_FILE
from studio.engine.recipe import MAX_RESOLUTION, MAX_SAMPLING_STEPS, MIN_RESOLUTION, Recipe
from studio.engine.snr import sampler_for
from studio.engine.training import preview_prompts
from studio.errors import InputError, StudioError
from studio.jobs import run_actions
from studio.jobs.caption_jobs import read_caption_result
from studio.jobs.jobs import Jobs, parse_generate_options
from studio.media.captions import check_crop, merge_captions, read_sidecar
from studio.media.datasets import is_dataset_zip, open_dataset_zip
from studio.media.images import (
    MAX_NAME_CHARS,
    MAX_REFERENCE_IMAGES,
    crop_fraction,
    fit_to_budget,
    load_image,
    make_thumbnail,
)
from studio.store.templates import TemplateInfo
from studio.styles.refine import MAX_CANDIDATES, STYLE_METRICS, describe_lineage, template_round

log = logging.getLogger(__name__)

EXPORT_FORMATS = {"zip": "export_zip", "safetensors": "export_safetensors", "comfy": "export_comfy",
                  "comfyui": "export_comfy"}
STATUS_KEYS = ("id", "kind", "state", "name", "style_prompt", "backbone", "step", "total_steps", "losses", "t",
               "previews", "queue_position", "template_id", "error", "message", "eta_s", "sec_per_step",
               "outputs", "created", "request", "cancel_requested", "started", "finished", "duration_s",
               "checkpoint_step")
# One row of the Jobs view (/jobs): what a list shows, without the loss curve and the previews.
JOB_ROW_KEYS = ("id", "kind", "state", "name", "style_prompt", "step", "total_steps", "created", "started",
                "finished", "duration_s", "checkpoint_step", "template_id", "error", "message", "queue_position",
                "cancel_requested")
MAX_JOB_ROWS = 500
MAX_RESULTS = 100  # search results per query
MAX_OFFSET = 10_000  # refine_candidates' "offset" along the prompt list
EXPORT_MAX_AGE_S = 3600.0


def aspect_ratios() -> list[str]:
    """The aspect ratios generation offers ("1:1", "3:4", ...)."""
    return list(ASPECTS)


def backbone_family(backbone_id: str | None) -> str:
    """"flux" or "sd3" for a known backbone id; "flux" (the default family) for anything else."""
    return KNOWN_BACKBONES.get(backbone_id or "", ("flux", ""))[0]


def preview_prompts_of(recipe: dict | None) -> list[str]:
    """The preview prompts a training with this recipe renders, in preview index order."""
    return preview_prompts(Recipe.from_dict(recipe or {}))


@functools.lru_cache(maxsize=32)
def sampler_draws(name: str, family: str, mu: float | None, sigma: float | None, shift: float | None,
                  n: int = 20_000) -> tuple[float, ...]:
    """``n`` seeded draws of t from a training sampler (the engine's own), for plotting its density."""
    import torch

    sampler = sampler_for(name, family, mu, sigma, shift)
    return tuple(sampler.sample(n, torch.Generator().manual_seed(0)).tolist())


def suggest_name(style_prompt: str, taken: set[str] | None = None) -> str:
    """A template name from a style prompt: its first words, capitalised, unique among ``taken``."""
    words = re.sub(r"[^\w\s'-]+", " ", style_prompt or "").split()
    base = " ".join(words[:6])[:MAX_NAME_CHARS - 5].strip(" -'") or "My style"
    base = base[0].upper() + base[1:]
    taken = {t.casefold() for t in taken or ()}
    name, n = base, 2
    while name.casefold() in taken:
        name, n = f"{base} {n}", n + 1
    return name


def _as_paths(files: Any) -> list[str]:
    """File paths from what Gradio / the client hands over: paths, dicts, (path, caption) tuples."""
    if files is None:
        return []
    if isinstance(files, str | Path):
        files = [files]
    out = []
    for item in files:
        if isinstance(item, list | tuple):
            item = item[0] if item else None
        if isinstance(item, dict):
            item = item.get("path") or item.get("name") or (item.get("image") or {}).get("path")
        if item:
            out.append(str(item))
    return out


class StudioAPI(Generation):
    """Everything the studio's front ends can do, on one data folder and job queue."""

    def __init__(self, jobs: Jobs | None = None, backbone: str | None = None):
        self.jobs = jobs or Jobs()
        self.store = self.jobs.store
        self.backbone = backbone
        self.exports_dir = Path(tempfile.gettempdir()) / "studio-exports"
        self._index = None  # the CLIP style index (studio.styles.retrieval), made on the first search

    # -- training -----------------------------------------------------------------------------

    def train(self, images: Any, style_prompt: str, name: str | None = None, options: dict | None = None) -> str:
        """Queue a training; returns the job id at once (the worker trains).

        ``options``: ``preset`` (paper / quick / high_fidelity), any Recipe field (steps, lr,
        rank, sampler, mu, sigma, resolution, seed, offset_noise, noise_prior (true: learn and
        store the style's noise prior), preview_every, preview_prompt, ...), ``backbone`` and
        ``captions`` (one per image; a dataset zip's ``.txt`` captions fill the ones not given),
        ``crops`` (one ``[left, top, right, bottom]`` in fractions, or null, per image),
        ``auto_caption`` (true: the worker captions the images without a caption before training)
        and ``preview_prompts`` (up to 4 sample prompts; default the paper's three).
        """
        opts = json_object(options, "options", '{"preset": "quick"}')
        backbone = text(opts.pop("backbone", None), "backbone", optional=True, max_chars=1000) or self.backbone
        captions, crops = opts.pop("captions", None), opts.pop("crops", None)
        auto_caption = boolean(opts.pop("auto_caption", False), "auto_caption")
        if auto_caption:
            self._require_captioner()
        if isinstance(opts.get("preview_prompt"), str) and not opts["preview_prompt"].strip():
            opts["preview_prompt"] = None
        paths, sidecars = self._expand_zips(_as_paths(images))
        if any(sidecars) and (captions is None or isinstance(captions, list) and len(captions) == len(sidecars)):
            captions = merge_captions(captions, sidecars, len(sidecars))
        style_prompt = text(style_prompt, "style prompt", optional=True)
        if not paths and not (style_prompt or "").strip():  # both missing: say both at once
            raise InputError("Add at least one reference image, and describe the style in the style prompt "
                             "(e.g. 'watercolor painting').")
        name = (text(name, "template name", optional=True) or "").strip() or suggest_name(
            style_prompt or "", {t.name for t in self.store.list()})
        return self.jobs.submit_train(paths, style_prompt, name, recipe=opts, backbone=backbone, captions=captions,
                                      crops=crops, auto_caption=auto_caption)

    # -- references as a dataset: checked tiles, captions, auto-captioning ------------------------

    def _expand_zips(self, paths: list[str]) -> tuple[list[str], list[str | None]]:
        """Dataset zips opened into their images (with their .txt captions); other files as they are."""
        out: list[str] = []
        captions: list[str | None] = []
        for path in paths:
            if is_dataset_zip(path):
                dest = Path(tempfile.mkdtemp(prefix="studio-dataset-"))
                for image, caption in open_dataset_zip(path, dest):
                    out.append(str(image))
                    captions.append(caption)
            else:
                out.append(path)
                captions.append(None)
        return out, captions

    def inspect_references(self, images: Any, options: dict | None = None) -> list[dict]:
        """Check dropped reference files one by one, as they will be trained: one tile per picture.

        ``options``: ``resolution`` (the training's pixel budget; default the backbone's), ``crops``
        (one region or null per file). A dataset zip becomes one tile per image in it. Each tile:
        ``{"file", "name", "ok", "error" (one line, or None), "thumbnail" (PNG of the picture as trained:
        EXIF rotation, alpha over white, crop, resize), "width", "height" (as trained), "caption"
        (from a .txt beside it, or None)}``.
        """
        from studio.engine.backbones import default_backbone, resolve_allowed

        opts = json_object(options, "options", '{"resolution": 512}')
        resolution = strict_int(opts.get("resolution"), "resolution", MIN_RESOLUTION, MAX_RESOLUTION, optional=True)
        resolution = resolution or resolve_allowed(self.backbone or default_backbone()).default_resolution
        paths = _as_paths(images)
        crops = opts.get("crops")
        if crops is not None and (not isinstance(crops, list) or len(crops) != len(paths)):
            raise InputError(f"crops must be a list with one region (or null) per file ({len(paths)})")
        if len(paths) > MAX_REFERENCE_IMAGES * 2:
            raise InputError(f"Too many files ({len(paths)}); the limit is {MAX_REFERENCE_IMAGES} reference images.")
        folder = Path(tempfile.gettempdir()) / "studio-ref-thumbs"
        folder.mkdir(parents=True, exist_ok=True)
        tiles: list[dict] = []
        for k, path in enumerate(paths):
            name = Path(path).name
            try:
                if is_dataset_zip(path):
                    found = open_dataset_zip(path, Path(tempfile.mkdtemp(prefix="studio-dataset-")))
                    tiles += [reference_tile(str(p), p.name, resolution, None, folder, c) for p, c in found]
                    continue
                box = check_crop((crops or [None] * len(paths))[k], f"crop of {name}")
                tiles.append(reference_tile(path, name, resolution, box, folder))
            except StudioError as exc:
                tiles.append({"file": path, "name": name, "ok": False, "error": str(exc), "thumbnail": None,
                              "width": None, "height": None, "caption": None})
        return tiles

    def captioner_status(self) -> dict:
        """Whether auto-captioning can run: ``{"available", "model", "size", "note"}`` (note: why not and how to
        get the weights, or that they download on first use). Loads nothing."""
        from studio.engine.captioner import MODEL_SIZE, caption_source, captioner_availability

        ok, note = captioner_availability()
        return {"available": ok, "model": caption_source(), "size": MODEL_SIZE, "note": note}

    def _require_captioner(self) -> None:
        status = self.captioner_status()
        if not status["available"]:
            raise InputError(f"Auto-captioning is not available: {status['note']}")

    def auto_caption(self, images: Any, style_prompt: str | None = None, options: dict | None = None) -> str:
        """Queue auto-captioning of these pictures on the worker (``options``: ``crops``); returns the job id.
        Follow it with :meth:`caption_status`; the captions describe the content only (the style prompt's
        words are removed)."""
        opts = json_object(options, "options", '{"crops": [null, [0.1, 0, 0.9, 1]]}')
        self._require_captioner()
        paths, _ = self._expand_zips(_as_paths(images))
        return self.jobs.submit_caption(paths, style_prompt, crops=opts.get("crops"))

    def caption_status(self, job_id: str) -> dict:
        """A caption job: ``{"id", "state", "message", "error", "done", "total", "captions"}`` (captions fill
        in as the worker goes; None where a picture said nothing but style)."""
        status = self.jobs.status(_job_id(job_id))
        if status["kind"] != "caption":
            raise InputError(f"job {job_id} is a {status['kind']} job, not a caption job")
        result = read_caption_result(self.jobs.job_dir(status["id"]))
        return {"id": status["id"], "state": status["state"], "message": status["message"],
                "error": status["error"], "done": int(result.get("done") or 0),
                "total": int(result.get("total") or len(result["captions"])), "captions": result["captions"]}

    def job_status(self, job_id: str) -> dict:
        """The job's state for display: state, step, total_steps, losses, t, previews, queue_position,
        template_id, error, message, eta_s, ... (see :data:`STATUS_KEYS`)."""
        status = self.jobs.status(_job_id(job_id))
        return {k: status.get(k) for k in STATUS_KEYS}

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job; returns its status."""
        self.jobs.cancel(_job_id(job_id))
        return self.job_status(job_id)

    # -- the Jobs view: every job, and what can be done with one that ended -------------------------

    def jobs_list(self, kind: str | None = None, limit: int | None = None) -> list[dict]:
        """Jobs newest first (``kind``: train / generate / None for all; ``limit`` 1-500, default 100),
        each a row of :data:`JOB_ROW_KEYS`."""
        kind = (text(kind, "kind", optional=True) or "").strip() or None
        if kind not in (None, "train", "generate"):
            raise InputError(f"kind must be train or generate (or empty for all), not {kind[:40]!r}")
        limit = 100 if limit is None else strict_int(limit, "limit", 1, MAX_JOB_ROWS)
        rows = self.jobs.list_jobs(kind, limit=limit, brief=True)  # polled by the Jobs tab: no loss curves
        return [{k: status.get(k) for k in JOB_ROW_KEYS} for status in rows]

    def resume_job(self, job_id: str) -> dict:
        """Queue a cancelled or failed training again, from its last checkpoint; returns its status."""
        run_actions.resume(self.jobs, _job_id(job_id))
        return self.job_status(job_id)

    def save_checkpoint(self, job_id: str) -> dict:
        """Save a cancelled or failed training's last checkpoint as a template (the worker writes it);
        returns the job's status (follow it until done: its template_id)."""
        run_actions.save_checkpoint(self.jobs, _job_id(job_id))
        return self.job_status(job_id)

    def retry_job(self, job_id: str) -> str:
        """A new job with the settings of an ended one; returns the new job id."""
        return run_actions.retry(self.jobs, _job_id(job_id))

    def delete_job(self, job_id: str) -> dict:
        """Delete an ended job's folder (a template it made stays); returns what was deleted."""
        return run_actions.delete(self.jobs, _job_id(job_id))

    def job_settings(self, job_id: str) -> dict:
        """A training's settings (name, style_prompt, recipe, captions, reference files) for the Train form;
        with captions, also ``dataset``: the references and their captions as one dataset zip (the form's
        drop zone reads the captions back from it)."""
        from studio.media.datasets import write_dataset_zip

        found = run_actions.settings(self.jobs, _job_id(job_id))
        found["dataset"] = None
        if any(found["captions"]) and len(found["captions"]) == len(found["references"]):
            self.exports_dir.mkdir(parents=True, exist_ok=True)
            self._prune_exports()
            found["dataset"] = str(write_dataset_zip(found["references"], found["captions"],
                                                     self.exports_dir / f"{found['id']}-references.zip"))
        return found

    def active_training(self) -> dict | None:
        """The running (else the next queued) training, for a page that opens or reloads."""
        status = self.jobs.active_job("train")
        return {k: status.get(k) for k in STATUS_KEYS} if status else None

    # -- templates ----------------------------------------------------------------------------

    @staticmethod
    def describe(info: TemplateInfo) -> dict:
        """A template as a JSON-friendly dict (paths as strings)."""
        meta = info.meta
        return {
            "id": info.id, "name": info.name, "style_prompt": info.style_prompt, "backbone": info.backbone,
            "family": info.family, "created": info.created,
            "thumbnail": str(info.thumbnail) if info.thumbnail else None,
            "previews": [str(p) for p in info.previews], "references": [str(p) for p in info.references],
            "preview_prompts": meta.get("preview_prompts") or [], "steps": meta.get("steps_done"),
            "captions": meta.get("captions") or [], "training_prompts": meta.get("training_prompts") or [],
            "sampler": (meta.get("sampler") or {}).get("name"), "imported": bool(meta.get("imported")),
            "source_repo": meta.get("source_repo"), "final_loss": meta.get("final_loss"),
            "resolution": (meta.get("recipe") or {}).get("resolution"),
            # whether generation can start from the style's noise prior (trained with noise_prior)
            "noise_prior": (info.path / PRIOR_FILE).is_file(),
            # refined templates (studio.styles.refine): round 2+, the parent and the synthetic images picked
            "round": template_round(meta), "parent": meta.get("parent"),
            "lineage": describe_lineage(meta, info.path),
        }

    @staticmethod
    def brief(info: TemplateInfo) -> dict:
        """What a picker needs of a template (no file access): id, name, style prompt, backbone, family, created."""
        return {"id": info.id, "name": info.name, "style_prompt": info.style_prompt, "backbone": info.backbone,
                "family": info.family, "created": info.created}

    @classmethod
    def summary(cls, info: TemplateInfo) -> dict:
        """A template as a listing shows it (a gallery tile): :meth:`brief` plus its tile picture
        (``thumbnail``: the thumbnail, else its last preview or first reference; None without pictures),
        ``imported``, ``round`` and ``parent``. Built field by field from the checked template.json."""
        picture = info.thumbnail or (info.previews or [None])[-1] or (info.references or [None])[0]
        return {**cls.brief(info), "thumbnail": str(picture) if picture else None,
                "imported": bool(info.meta.get("imported")), "round": template_round(info.meta),
                "parent": info.meta.get("parent")}

    def templates(self, query: str | None = None, offset: int | None = 0, limit: int | None = None) -> dict:
        """One page of templates, newest first; ``query`` filters by name and style prompt.

        Returns ``{"templates": [summary], "total": matches in all, "offset", "limit"}``; ``limit``
        defaults to :data:`studio.store.templates.DEFAULT_PAGE_SIZE` (at most ``MAX_PAGE_SIZE``). A template's
        details (previews, references, lineage...): :meth:`template`.
        """
        query = text(query, "search text", optional=True)
        page = self.store.page((query or "").strip() or None, offset, limit)
        return {"templates": [self.summary(t) for t in page.items], "total": page.total, "offset": page.offset,
                "limit": page.limit}

    def template_list(self, query: str | None = None) -> list[dict]:
        """Every template as :meth:`brief` (for pickers and name checks), newest first."""
        return [self.brief(t) for t in self.store.list((query or "").strip() or None)]

    def template(self, template_id: str) -> dict:
        """One template in full (:meth:`describe`)."""
        return self.describe(self.store.get(template_id))

    def rename(self, template_id: str, name: str) -> dict:
        """Rename a template; returns it."""
        return self.describe(self.store.rename(template_id, text(name, "template name", optional=True)))

    def delete(self, template_id: str) -> dict:
        """Delete a template for good; returns {"deleted": id}."""
        self.store.delete(template_id)
        return {"deleted": template_id}

    def export(self, template_id: str, fmt: str = "zip", precision: str | None = None) -> Path:
        """Write a template as ``zip`` (the whole folder), ``safetensors`` (diffusers keys) or
        ``comfy`` (kohya/ComfyUI keys) into a fresh download folder; returns the file.

        ``precision`` (``comfy`` only): ``bf16`` (default, half the size) or ``fp32``."""
        method = EXPORT_FORMATS.get((text(fmt, "export format", optional=True) or "zip").strip().lower().lstrip("."))
        if method is None:
            raise InputError(f"unknown export format {fmt!r}: use zip, safetensors or comfy")
        precision = (text(precision, "export precision", optional=True) or "").strip().lower() or None
        if precision is not None and precision not in ("bf16", "fp32"):
            raise InputError(f"unknown export precision {precision!r}: use bf16 or fp32")
        if precision is not None and method != "export_comfy":
            raise InputError("an export precision applies to the comfy format only")
        self._prune_exports()
        dest = self.exports_dir / uuid.uuid4().hex
        if precision is not None:
            return self.store.export_comfy(template_id, dest, precision)
        return getattr(self.store, method)(template_id, dest)

    def _prune_exports(self) -> None:
        if not self.exports_dir.is_dir():
            return
        for folder in self.exports_dir.iterdir():
            try:
                if time.time() - folder.stat().st_mtime > EXPORT_MAX_AGE_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue

    def import_file(self, file: Any, name: str | None = None) -> dict:
        """Import a template ``.zip`` or a LoRA ``.safetensors``; returns the new template."""
        paths = _as_paths(file)
        if len(paths) != 1:
            raise InputError("choose one .zip or .safetensors file to import")
        name = text(name, "template name", optional=True)
        return self.describe(self.store.import_file(Path(paths[0]), name=(name or "").strip() or None))

    def import_hub(self, repo_id: str, token: str | None = None, name: str | None = None) -> dict:
        """Import a LoRA from a Hugging Face model repo (``user/name``)."""
        from studio.store import hub

        name = text(name, "template name", optional=True)
        return self.describe(hub.import_from_hub(self.store, repo_id, token, (name or "").strip() or None))

    def share(self, template_id: str, repo_id: str, token: str | None, private: bool = True) -> dict:
        """Upload a template with a model card to the Hub; returns {"url": ...}. The token is used once."""
        from studio.store import hub

        return {"url": hub.share(self.store, template_id, repo_id, token, private=bool(private))}

    # -- finding styles (CLIP retrieval) and scores ---------------------------------------------

    @property
    def index(self):
        """The CLIP style index over the store (:class:`studio.styles.retrieval.StyleIndex`). Its models load on
        the first search, in this process and on the CPU: searching must not wait behind a training."""
        if self._index is None:
            from studio.styles.retrieval import StyleIndex

            self._index = StyleIndex(self.store)
        return self._index

    @index.setter
    def index(self, value) -> None:
        self._index = value

    def warm_index(self) -> threading.Thread:
        """Bring the style index up to date in a background thread, so the first search of a big store does not
        embed every template inside a web request. Does nothing without the metric models."""

        def run() -> None:
            try:
                if self.index.available()[0]:
                    self.index.sync()
            except Exception:  # noqa: BLE001 - a cache: the next search tries again and reports problems
                log.exception("warming the style index failed")

        thread = threading.Thread(target=run, name="style-index", daemon=True)
        thread.start()
        return thread

    def search_templates(self, query: str | None = None, image: Any = None, k: int | None = None) -> dict:
        """Find templates by text (name and style prompt first, then by look in CLIP space) or by an
        image (by look; an image wins over a text). ``k``: how many results (default 8).

        Returns ``{"results": [template + "similarity" + "matched" + "closest_image" (its reference or preview
        most like the query)], "mode": "text" | "names" | "image", "note": ...}``. Without the metric models a
        text search matches names only ("names", the note says why) and an image search is an error that says why.
        """
        from studio.styles.retrieval import DEFAULT_K

        paths = _as_paths([image] if isinstance(image, dict) else image)  # one file, as gradio_client sends it
        k = strict_int(k, "k (how many results)", 1, MAX_RESULTS, optional=True) or DEFAULT_K
        query = text(query, "search text", optional=True)
        if paths:
            result = self.index.search_images(paths, k)
        elif (query or "").strip():
            result = self.index.search_text(query or "", k)
        else:
            raise InputError("give a text or an image to search for")
        return self._found(result)

    def similar_templates(self, images: Any, k: int | None = None, min_similarity: float | None = None) -> dict:
        """The templates that look most like ``images`` (e.g. references about to be trained): "you may
        already have this style". Only those at least ``min_similarity`` alike (default
        :data:`studio.styles.retrieval.SIMILAR_MIN`), at most ``k`` (default 3), best first. Same shape as
        :meth:`search_templates`; without the metric models: no results, mode "unavailable" and the reason.
        """
        from studio.styles.retrieval import SIMILAR_MIN, RetrievalUnavailable

        threshold = finite_float(min_similarity, "min_similarity", -1.0, 1.0, optional=True)
        threshold = SIMILAR_MIN if threshold is None else threshold
        k = strict_int(k, "k (how many results)", 1, MAX_RESULTS, optional=True) or 3
        try:
            result = self.index.search_images(_as_paths(images), k, threshold)
        except RetrievalUnavailable as exc:  # a passive suggestion: say why, do not fail
            return {"results": [], "mode": "unavailable", "note": str(exc)}
        return self._found(result)

    def _found(self, result) -> dict:
        return {"results": [{**self.summary(h.template), "matched": h.matched,
                             "similarity": None if h.similarity is None else round(h.similarity, 4),
                             "closest_image": str(h.closest) if h.closest else None}
                            for h in result.hits],
                "mode": result.mode, "note": result.note}

    def template_scores(self, template_id: str) -> dict:
        """A template's style scores on its final previews (DINO and CLIP-I against its references,
        CLIP-T against the preview prompts), computed once and cached; or ``{"available": False,
        "reason": ...}`` (no metric models here, or nothing to score)."""
        from studio.styles.retrieval import template_scores

        return template_scores(self.store, (template_id or "").strip(), self.index.scorer)

    # -- refining: StyleDrop's second round with feedback (studio.styles.refine) -----------------------

    def refine_candidates(self, template_id: str, n: int | None = None, options: dict | None = None,
                          progress: Callable[[str], None] | None = None) -> list[Path]:
        """Generate ``n`` candidates (default 8) with a template to pick favourites from for :meth:`refine`.

        Each shows another subject (the paper's prompts, or ``options["prompts"]``) at seed
        ``seed + i``, so they are the same pictures automatic feedback would judge. ``options``:
        ``seed`` (0; another seed gives other pictures), ``offset`` (start further along the prompt
        list), ``steps`` (denoising steps), ``lora_scale``, ``prompts``. Each PNG carries its content
        prompt, which becomes its caption in round 2. Returns the files, in prompt order.
        """
        from studio.styles import refine

        opts = json_object(options, "options", '{"seed": 1}')
        unknown = sorted(str(k) for k in set(opts) - {"seed", "offset", "steps", "lora_scale", "prompts"})
        if unknown:
            raise InputError(f"unknown candidate option(s): {', '.join(unknown)}")
        info = self.store.get((text(template_id, "template id", optional=True) or "").strip())
        prompts = _prompt_list(opts.get("prompts"))
        if not prompts:
            count = strict_int(n, "number of candidates", 1, refine.MAX_CANDIDATES, optional=True)
            offset = strict_int(opts.get("offset"), "offset", 0, MAX_OFFSET, optional=True) or 0
            prompts = refine.candidate_prompts(count or refine.DEFAULT_CANDIDATES, offset)
        elif not 1 <= len(prompts) <= refine.MAX_CANDIDATES:
            raise InputError(f"give 1 to {refine.MAX_CANDIDATES} candidate prompts")
        seed = strict_int(opts.get("seed"), "seed", 0, MAX_SEED - refine.MAX_CANDIDATES, optional=True) or 0
        steps = _default_if_zero(opts.get("steps"))  # the rest is checked with the generation options below
        scale = opts.get("lora_scale", 1.0)
        requests = [{**refine.candidate_options(p, seed + i, None, 1.0), "steps": steps, "lora_scale": scale}
                    for i, p in enumerate(prompts)]
        for r in requests:  # every candidate is checked before the first one is queued
            parse_generate_options(r)
        jobs = [self._submit(info, r) for r in requests]
        statuses = self._wait(jobs, progress or (lambda _msg: None))
        return [Path(s["outputs"][0]) for s in statuses]

    def automatic_feedback(self) -> dict:
        """Whether "let CLIP choose" can run here: {"available": bool, "reason": why not, with how to fix it}."""
        from studio.styles import refine

        try:
            refine.check_scorer()
        except StudioError as exc:
            return {"available": False, "reason": str(exc)}
        return {"available": True, "reason": ""}

    def refine(self, template_id: str, images: Any = None, feedback: str | None = None,
               options: dict | None = None) -> str:
        """Queue round 2 of a template; returns the training job's id (watch it with :meth:`job_status`).

        ``feedback``: ``"human"`` trains on the parent's references plus ``images`` (the favourite
        candidates, e.g. from :meth:`refine_candidates`); ``"auto"`` (the default without images) lets
        the worker make ``candidates`` pictures and keep the ``top_k`` with the best CLIP style x text
        score. ``options``: ``name`` (default "<parent> · round 2"), ``captions`` (human: one per image;
        default each PNG's own prompt), ``candidates`` (8), ``top_k`` (3), ``candidate_seed``,
        ``candidate_steps``, ``prompts``, ``style_metric`` (clip_i | dino), ``lora_scale``, and changes
        to the parent's recipe: steps, lr, seed, preview_every, ... (see studio.styles.refine.RECIPE_OVERRIDES).
        The new template records its parent, its round and the synthetic images it learned from.
        """
        opts = json_object(options, "options", '{"top_k": 3}')
        paths = _as_paths(images)
        mode = (text(feedback, "feedback", optional=True) or "").strip().lower() or ("human" if paths else "auto")
        mode = {"favourites": "human", "favorites": "human", "manual": "human", "clip": "auto",
                "automatic": "auto"}.get(mode, mode)
        if mode not in ("human", "auto"):
            raise InputError(f"unknown feedback {feedback!r}: use human (your favourites) or auto (CLIP picks)")
        name, captions = opts.pop("name", None), opts.pop("captions", None)
        renamed = {"candidate_seed": "seed", "candidate_steps": "steps"}
        auto = {renamed.get(k, k): opts.pop(k) for k in list(opts)
                if k in ("candidates", "top_k", "candidate_seed", "candidate_steps", "prompts", "style_metric",
                         "lora_scale")}
        if mode == "auto":
            if paths:
                raise InputError("automatic feedback picks its own images: send no images, or use feedback human")
            return self.jobs.submit_refine(template_id, auto=_auto_feedback(auto), name=name, recipe=opts)
        if auto:
            raise InputError(f"{', '.join(sorted(auto))}: only for automatic feedback")
        if not paths:
            raise InputError("tick at least one favourite candidate (or let CLIP choose)")
        return self.jobs.submit_refine(template_id, images=paths, captions=captions, name=name, recipe=opts)

    def publish_result(self, job_id: str) -> dict:
        """Save the kept result of a training whose template could not be saved (e.g. a full disk)
        as a template, once there is room; returns the job's status (done, with its template_id)."""
        self.jobs.publish_result(str(job_id or "").strip())
        return self.job_status(str(job_id or "").strip())


def reference_tile(path: str, name: str, resolution: int, box, folder: Path, caption: str | None = None) -> dict:
    """One checked reference: its thumbnail as trained, written into ``folder`` (see inspect_references)."""
    img = crop_fraction(load_image(path), box)
    trained = fit_to_budget(img, resolution)
    thumb = make_thumbnail(trained, 256)
    digest = hashlib.sha1(f"{path}|{resolution}|{box}|{time.time_ns()}".encode()).hexdigest()[:16]
    out = folder / f"{digest}.png"
    thumb.save(out)
    if caption is None:
        caption = read_sidecar(path)
    return {"file": path, "name": name, "ok": True, "error": None, "thumbnail": str(out),
            "width": trained.width, "height": trained.height, "caption": caption}


def _job_id(job_id: Any) -> str:
    """A job id as sent by a client: a text (stripped); a number or a list gets a message."""
    return (text(job_id, "job id", optional=True) or "").strip()


def _default_if_zero(value: Any) -> Any:
    """0 means "the default" (None) for step counts, as in the UI; anything else goes on to be checked."""
    return None if value == 0 and not isinstance(value, bool) else value


def _prompt_list(prompts: Any) -> list[str]:
    """Candidate prompts: a list of texts or one text with a prompt per line; blanks dropped."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        prompts = prompts.splitlines()
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a list of texts (or one text, a prompt per line)")
    return [p.strip() for p in prompts if p.strip()]


def _auto_feedback(auto: dict) -> dict:
    """Automatic-feedback options with their types and ranges checked before a job is queued."""
    checks = {
        "candidates": lambda v: strict_int(v, "candidates", 1, MAX_CANDIDATES, optional=True),
        "top_k": lambda v: strict_int(v, "top_k", 1, MAX_CANDIDATES, optional=True),
        "seed": lambda v: strict_int(v, "candidate_seed", 0, MAX_SEED - MAX_CANDIDATES, optional=True),
        "steps": lambda v: strict_int(_default_if_zero(v), "candidate_steps", 1, MAX_SAMPLING_STEPS, optional=True),
        "lora_scale": lambda v: finite_float(v, "lora_scale", -MAX_LORA_SCALE, MAX_LORA_SCALE, optional=True),
        "style_metric": lambda v: v if v is None else text(
            text(v, "style_metric").strip().lower(), "style_metric", choices=STYLE_METRICS),
        "prompts": lambda v: _prompt_list(v) or None,
    }
    out = {k: checks[k](v) for k, v in auto.items()}
    return {k: v for k, v in out.items() if v is not None}
