"""The studio's actions as plain, JSON-friendly functions: what the web UI and ``gradio_client`` call.

:class:`StudioAPI` wraps :class:`studio.jobs.Jobs` (training and generation run in the GPU
worker, never here) and the template store, and adds what only a front end needs: a name
suggested from the style prompt, waiting for generation jobs, comic pages and memes composed
from generated panels (:mod:`studio.compose`), exports into a download folder and Hub sharing.

Every user mistake raises :class:`studio.errors.StudioError` (mostly ``InputError``) with a
message meant for the user; the UI turns it into ``gr.Error``. No Gradio here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from . import compose
from .errors import InputError, StudioError
from .images import MAX_NAME_CHARS
from .jobs import CANCELLED, DONE, FAILED, FINAL, Jobs
from .noise_prior import PRIOR_FILE
from .refine import describe_lineage, template_round
from .templates import TemplateInfo

log = logging.getLogger(__name__)

MODES = ("text-to-image", "multi-panel", "meme")
_MODE_ALIASES = {"t2i": "text-to-image", "text": "text-to-image", "txt2img": "text-to-image",
                 "comic": "multi-panel", "panels": "multi-panel", "multipanel": "multi-panel"}
EXPORT_FORMATS = {"zip": "export_zip", "safetensors": "export_safetensors", "comfy": "export_comfy",
                  "comfyui": "export_comfy"}
# Keys of /generate's options besides GenerateOptions' fields, per mode.
MODE_KEYS = {
    "text-to-image": set(),
    "multi-panel": {"panels", "captions", "layout", "gutter", "border", "single_shot"},
    "meme": {"top", "bottom", "meme_style"},
}
STATUS_KEYS = ("id", "kind", "state", "name", "style_prompt", "backbone", "step", "total_steps", "losses", "t",
               "previews", "queue_position", "template_id", "error", "message", "eta_s", "sec_per_step",
               "outputs", "created", "request")
GENERATE_TIMEOUT_S = 1800.0
EXPORT_MAX_AGE_S = 3600.0


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


def read_png_params(path: str | Path) -> dict:
    """The generation parameters stored in a studio PNG ("studio" text chunk), or {}."""
    try:
        with Image.open(path) as img:
            return json.loads(img.text.get("studio", "{}"))  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return {}


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


class StudioAPI:
    """Everything the studio's front ends can do, on one data folder and job queue."""

    def __init__(self, jobs: Jobs | None = None, backbone: str | None = None):
        self.jobs = jobs or Jobs()
        self.store = self.jobs.store
        self.backbone = backbone
        self.exports_dir = Path(tempfile.gettempdir()) / "studio-exports"
        self._index = None  # the CLIP style index (studio.retrieval), made on the first search

    # -- training -----------------------------------------------------------------------------

    def train(self, images: Any, style_prompt: str, name: str | None = None, options: dict | None = None) -> str:
        """Queue a training; returns the job id at once (the worker trains).

        ``options``: ``preset`` (paper / quick / high_fidelity), any Recipe field (steps, lr,
        rank, sampler, mu, sigma, resolution, seed, offset_noise, noise_prior (true: learn and
        store the style's noise prior), preview_every, preview_prompt, ...), ``backbone`` and
        ``captions`` (one per image).
        """
        opts = dict(options or {})
        if not isinstance(options, dict | None):
            raise InputError("options must be a JSON object, e.g. {\"preset\": \"quick\"}")
        backbone = opts.pop("backbone", None) or self.backbone
        captions = opts.pop("captions", None)
        if isinstance(opts.get("preview_prompt"), str) and not opts["preview_prompt"].strip():
            opts["preview_prompt"] = None
        paths = _as_paths(images)
        name = (name or "").strip() or suggest_name(style_prompt or "", {t.name for t in self.store.list()})
        return self.jobs.submit_train(paths, style_prompt, name, recipe=opts, backbone=backbone, captions=captions)

    def job_status(self, job_id: str) -> dict:
        """The job's state for display: state, step, total_steps, losses, t, previews, queue_position,
        template_id, error, message, eta_s, ... (see :data:`STATUS_KEYS`)."""
        status = self.jobs.status((job_id or "").strip())
        return {k: status.get(k) for k in STATUS_KEYS}

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job; returns its status."""
        self.jobs.cancel((job_id or "").strip())
        return self.job_status(job_id)

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
            "sampler": (meta.get("sampler") or {}).get("name"), "imported": bool(meta.get("imported")),
            "source_repo": meta.get("source_repo"), "final_loss": meta.get("final_loss"),
            "resolution": (meta.get("recipe") or {}).get("resolution"),
            # whether generation can start from the style's noise prior (trained with noise_prior)
            "noise_prior": (info.path / PRIOR_FILE).is_file(),
            # refined templates (studio.refine): round 2+, the parent and the synthetic images picked
            "round": template_round(meta), "parent": meta.get("parent"),
            "lineage": describe_lineage(meta, info.path),
        }

    def templates(self, query: str | None = None) -> list[dict]:
        """Every template, newest first; ``query`` filters by name and style prompt."""
        return [self.describe(t) for t in self.store.list((query or "").strip() or None)]

    def template(self, template_id: str) -> dict:
        return self.describe(self.store.get(template_id))

    def rename(self, template_id: str, name: str) -> dict:
        return self.describe(self.store.rename(template_id, name))

    def delete(self, template_id: str) -> dict:
        """Delete a template for good; returns {"deleted": id}."""
        self.store.delete(template_id)
        return {"deleted": template_id}

    def export(self, template_id: str, fmt: str = "zip") -> Path:
        """Write a template as ``zip`` (the whole folder), ``safetensors`` (diffusers keys) or
        ``comfy`` (kohya/ComfyUI keys) into a fresh download folder; returns the file."""
        method = EXPORT_FORMATS.get((fmt or "zip").strip().lower().lstrip("."))
        if method is None:
            raise InputError(f"unknown export format {fmt!r}: use zip, safetensors or comfy")
        self._prune_exports()
        dest = self.exports_dir / uuid.uuid4().hex
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
        return self.describe(self.store.import_file(Path(paths[0]), name=(name or "").strip() or None))

    def import_hub(self, repo_id: str, token: str | None = None, name: str | None = None) -> dict:
        """Import a LoRA from a Hugging Face model repo (``user/name``)."""
        from . import hub

        return self.describe(hub.import_from_hub(self.store, repo_id, token, (name or "").strip() or None))

    def share(self, template_id: str, repo_id: str, token: str | None, private: bool = True) -> dict:
        """Upload a template with a model card to the Hub; returns {"url": ...}. The token is used once."""
        from . import hub

        return {"url": hub.share(self.store, template_id, repo_id, token, private=bool(private))}

    # -- finding styles (CLIP retrieval) and scores ---------------------------------------------

    @property
    def index(self):
        """The CLIP style index over the store (:class:`studio.retrieval.StyleIndex`). Its models load on
        the first search, in this process and on the CPU: searching must not wait behind a training."""
        if self._index is None:
            from .retrieval import StyleIndex

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
        from .retrieval import DEFAULT_K

        paths = _as_paths([image] if isinstance(image, dict) else image)  # one file, as gradio_client sends it
        if paths:
            result = self.index.search_images(paths, k or DEFAULT_K)
        elif (query or "").strip():
            result = self.index.search_text(query or "", k or DEFAULT_K)
        else:
            raise InputError("give a text or an image to search for")
        return self._found(result)

    def similar_templates(self, images: Any, k: int | None = None, min_similarity: float | None = None) -> dict:
        """The templates that look most like ``images`` (e.g. references about to be trained): "you may
        already have this style". Only those at least ``min_similarity`` alike (default
        :data:`studio.retrieval.SIMILAR_MIN`), at most ``k`` (default 3), best first. Same shape as
        :meth:`search_templates`; without the metric models: no results, mode "unavailable" and the reason.
        """
        from .retrieval import SIMILAR_MIN, RetrievalUnavailable

        threshold = SIMILAR_MIN if min_similarity is None else float(min_similarity)
        try:
            result = self.index.search_images(_as_paths(images), k or 3, threshold)
        except RetrievalUnavailable as exc:  # a passive suggestion: say why, do not fail
            return {"results": [], "mode": "unavailable", "note": str(exc)}
        return self._found(result)

    def _found(self, result) -> dict:
        return {"results": [{**self.describe(h.template), "matched": h.matched,
                             "similarity": None if h.similarity is None else round(h.similarity, 4),
                             "closest_image": str(h.closest) if h.closest else None}
                            for h in result.hits],
                "mode": result.mode, "note": result.note}

    def template_scores(self, template_id: str) -> dict:
        """A template's style scores on its final previews (DINO and CLIP-I against its references,
        CLIP-T against the preview prompts), computed once and cached; or ``{"available": False,
        "reason": ...}`` (no metric models here, or nothing to score)."""
        from .retrieval import template_scores

        return template_scores(self.store, (template_id or "").strip(), self.index.scorer)

    # -- refining: StyleDrop's second round with feedback (studio.refine) -----------------------

    def refine_candidates(self, template_id: str, n: int | None = None, options: dict | None = None,
                          progress: Callable[[str], None] | None = None) -> list[Path]:
        """Generate ``n`` candidates (default 8) with a template to pick favourites from for :meth:`refine`.

        Each shows another subject (the paper's prompts, or ``options["prompts"]``) at seed
        ``seed + i``, so they are the same pictures automatic feedback would judge. ``options``:
        ``seed`` (0; another seed gives other pictures), ``offset`` (start further along the prompt
        list), ``steps`` (denoising steps), ``lora_scale``, ``prompts``. Each PNG carries its content
        prompt, which becomes its caption in round 2. Returns the files, in prompt order.
        """
        from . import refine
        from .jobs import parse_generate_options

        if not isinstance(options, dict | None):
            raise InputError("options must be a JSON object, e.g. {\"seed\": 1}")
        opts = dict(options or {})
        unknown = sorted(set(opts) - {"seed", "offset", "steps", "lora_scale", "prompts"})
        if unknown:
            raise InputError(f"unknown candidate option(s): {', '.join(unknown)}")
        info = self.store.get((template_id or "").strip())
        prompts = opts.get("prompts")
        if isinstance(prompts, str):
            prompts = prompts.splitlines()
        prompts = [str(p).strip() for p in prompts or [] if str(p).strip()]
        if not prompts:
            prompts = refine.candidate_prompts(int(n or refine.DEFAULT_CANDIDATES), int(opts.get("offset") or 0))
        elif not 1 <= len(prompts) <= refine.MAX_CANDIDATES:
            raise InputError(f"give 1 to {refine.MAX_CANDIDATES} candidate prompts")
        seed, steps = int(opts.get("seed") or 0), opts.get("steps")
        requests = [refine.candidate_options(p, seed + i, int(steps) if steps else None,
                                             float(opts.get("lora_scale", 1.0))) for i, p in enumerate(prompts)]
        for r in requests:  # every candidate is checked before the first one is queued
            parse_generate_options(r)
        jobs = [self._submit(info, r) for r in requests]
        statuses = self._wait(jobs, progress or (lambda _msg: None))
        return [Path(s["outputs"][0]) for s in statuses]

    def refine(self, template_id: str, images: Any = None, feedback: str | None = None,
               options: dict | None = None) -> str:
        """Queue round 2 of a template; returns the training job's id (watch it with :meth:`job_status`).

        ``feedback``: ``"human"`` trains on the parent's references plus ``images`` (the favourite
        candidates, e.g. from :meth:`refine_candidates`); ``"auto"`` (the default without images) lets
        the worker make ``candidates`` pictures and keep the ``top_k`` with the best CLIP style x text
        score. ``options``: ``name`` (default "<parent> · round 2"), ``captions`` (human: one per image;
        default each PNG's own prompt), ``candidates`` (8), ``top_k`` (3), ``candidate_seed``,
        ``candidate_steps``, ``prompts``, ``style_metric`` (clip_i | dino), ``lora_scale``, and changes
        to the parent's recipe: steps, lr, seed, preview_every, ... (see studio.refine.RECIPE_OVERRIDES).
        The new template records its parent, its round and the synthetic images it learned from.
        """
        if not isinstance(options, dict | None):
            raise InputError("options must be a JSON object, e.g. {\"top_k\": 3}")
        opts = dict(options or {})
        paths = _as_paths(images)
        mode = (feedback or "").strip().lower() or ("human" if paths else "auto")
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
            return self.jobs.submit_refine(template_id, auto=auto, name=name, recipe=opts)
        if auto:
            raise InputError(f"{', '.join(sorted(auto))}: only for automatic feedback")
        if not paths:
            raise InputError("tick at least one favourite candidate (or let CLIP choose)")
        return self.jobs.submit_refine(template_id, images=paths, captions=captions, name=name, recipe=opts)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, template_id: str | None, prompt: str, mode: str = "text-to-image",
                 options: dict | None = None, progress: Callable[[str], None] | None = None) -> list[Path]:
        """Generate in a template's style and return the PNG files (parameters in their metadata).

        ``mode``: ``text-to-image``; ``multi-panel`` (``panels``: 2-6 prompts or
        {prompt, caption} dicts, ``layout`` "auto"/"2x2"/..., ``gutter``, ``border``,
        ``captions``; or ``single_shot: true`` for one image at the reference's aspect ratio);
        ``meme`` (``top``, ``bottom``, ``meme_style`` "classic" or "typography"). Other
        options are GenerateOptions fields: lora_scale, seed, steps, guidance, aspect,
        resolution, width, height, num_images, wrap_style, and (all off by default):

        - ``mix``: further templates on top of this one, ``[{"template": id, "scale": 0.5}]``
          (up to 4; scale -4..4; the main template's own strength is ``lora_scale``);
        - ``style_schedule``: apply the template only in the first fraction of the denoising
          steps, in (0, 1] (style is decided early, details late); null = every step;
        - ``fusion_weight``: per step ``base + w * (template - base)``, 0..2; 1 = the template
          alone, 0.5 = half way to the base model;
        - ``noise_prior``: true starts from the template's style noise prior (templates trained
          with ``noise_prior``; see ``/templates``' ``noise_prior`` flag).
        """
        from .generation import GenerateOptions

        mode = _MODE_ALIASES.get((mode or "").strip().lower(), (mode or "").strip().lower() or "text-to-image")
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
        if not isinstance(options, dict | None):
            raise InputError("options must be a JSON object")
        opts = dict(options or {})
        extra = {k: opts.pop(k) for k in list(opts) if k in MODE_KEYS[mode]}
        known = {f.name for f in fields(GenerateOptions)} - {"prompt"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise InputError(f"unknown option(s) for {mode}: {', '.join(unknown)}")
        template_id = (template_id or "").strip() or None
        info = self.store.get(template_id) if template_id else None
        say = progress or (lambda _msg: None)
        if mode == "multi-panel":
            return self._multi_panel(info, prompt, opts, extra, say)
        if mode == "meme":
            return self._meme(info, prompt, opts, extra, say)
        job = self._submit(info, {**opts, "prompt": prompt})
        return [Path(p) for p in self._wait([job], say)[0]["outputs"]]

    def _submit(self, info: TemplateInfo | None, options: dict) -> str:
        backbone = None if info is not None else self.backbone
        return self.jobs.submit_generate(info.id if info else None, options, backbone=backbone)

    def _wait(self, job_ids: list[str], say: Callable[[str], None],
              timeout: float = GENERATE_TIMEOUT_S) -> list[dict]:
        """Poll until every job is final; StudioError if one failed or was cancelled."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            statuses = [self.jobs.status(j) for j in job_ids]
            for s in statuses:
                if s["state"] == FAILED:
                    raise StudioError(f"generation failed: {s['error'] or s['message']}")
                if s["state"] == CANCELLED:
                    raise StudioError("the generation was cancelled")
            if all(s["state"] == DONE for s in statuses):
                return statuses
            done = sum(s["state"] in FINAL for s in statuses)
            waiting = next((s for s in statuses if s["state"] not in FINAL), statuses[0])
            message = waiting["message"]
            if len(job_ids) > 1:
                message = f"{done} of {len(job_ids)} done; {message}"
            if message != last:
                say(message)
                last = message
            if time.monotonic() > deadline:
                for j in job_ids:
                    self.jobs.cancel(j)
                raise StudioError(f"generation took longer than {timeout / 60:.0f} minutes and was cancelled "
                                  f"({waiting['message']})")
            time.sleep(0.2)

    def _multi_panel(self, info: TemplateInfo | None, prompt: str, opts: dict, extra: dict,
                     say: Callable[[str], None]) -> list[Path]:
        if extra.get("single_shot"):
            return self._single_shot(info, prompt, opts, say)
        panels = extra.get("panels")
        if isinstance(panels, str):
            panels = [line for line in panels.splitlines() if line.strip()]
        if not panels and prompt:
            panels = [line for line in str(prompt).splitlines() if line.strip()]
        panels = list(panels or [])
        if not 2 <= len(panels) <= compose.MAX_PANELS:
            raise InputError(f"a comic page needs 2 to {compose.MAX_PANELS} panel prompts, one per line "
                             f"(got {len(panels)})")
        prompts, captions = [], []
        for panel in panels:
            if isinstance(panel, dict):
                text, caption = panel.get("prompt") or "", panel.get("caption") or ""
            else:  # "prompt | caption" on one line
                text, _, caption = str(panel).partition("|")
            prompts.append(text.strip())
            captions.append(caption.strip())
        given = extra.get("captions")
        if isinstance(given, list):
            captions = [str(c or "") for c in given]
        elif given is False:
            captions = []
        layout = str(extra.get("layout") or "auto")
        compose.parse_layout(layout, len(prompts))  # bad layouts fail before any GPU work
        for i, text in enumerate(prompts):
            if not text:
                raise InputError(f"panel {i + 1} has no prompt")
        # One job per panel, all with the same seed: a shared starting noise keeps panels alike.
        base = {**opts, "num_images": 1}
        jobs = [self._submit(info, {**base, "prompt": text}) for text in prompts]
        statuses = self._wait(jobs, say)
        files = [s["outputs"][0] for s in statuses]
        say("laying out the page")
        page = compose.compose_panels([Image.open(f) for f in files], layout,
                                      gutter=int(extra.get("gutter", 16)), border=int(extra.get("border", 4)),
                                      captions=captions or None)
        panel_params = [read_png_params(f) for f in files]
        params = {**panel_params[0], "mode": "multi-panel", "layout": layout, "panels": panel_params,
                  "captions": captions, "final_prompt": " | ".join(p.get("final_prompt", "") for p in panel_params),
                  "width": page.width, "height": page.height}
        return [self._save(page, jobs[0], f"comic_{params.get('seed', 0)}.png", params)]

    def _single_shot(self, info: TemplateInfo | None, prompt: str, opts: dict,
                     say: Callable[[str], None]) -> list[Path]:
        """The paper's way for a template learned from a multi-panel page: one image at its shape."""
        if info is None or not info.references:
            raise InputError("single-shot multi-panel needs a template trained on a multi-panel reference")
        with Image.open(info.references[0]) as ref:
            size = ref.size
        resolution = opts.get("resolution") or (info.meta.get("recipe") or {}).get("resolution") or max(size)
        width, height = compose.reference_aspect(size, int(resolution))
        job = self._submit(info, {**opts, "prompt": prompt, "width": width, "height": height})
        return [Path(p) for p in self._wait([job], say)[0]["outputs"]]

    def _meme(self, info: TemplateInfo | None, prompt: str, opts: dict, extra: dict,
              say: Callable[[str], None]) -> list[Path]:
        top, bottom = str(extra.get("top") or "").strip(), str(extra.get("bottom") or "").strip()
        style = str(extra.get("meme_style") or "classic").lower()
        if style not in ("classic", "typography"):
            raise InputError("meme_style must be 'classic' (captions on top) or 'typography' (text drawn by the model)")
        if not top and not bottom:
            raise InputError("a meme needs a top or a bottom caption")
        if style == "typography":
            text = " ".join(t for t in (top, bottom) if t).replace('"', "'")
            job = self._submit(info, {**opts, "prompt": f'{(prompt or "").strip()} with the text "{text}"'})
            return [Path(p) for p in self._wait([job], say)[0]["outputs"]]
        for caption in (top, bottom):  # font coverage / length problems before any GPU work
            if caption:
                compose.font_for(caption.upper())
        job = self._submit(info, {**opts, "prompt": prompt})
        status = self._wait([job], say)[0]
        out = []
        for f in status["outputs"]:
            with Image.open(f) as img:
                image = compose.meme(img, top, bottom)
            params = {**read_png_params(f), "mode": "meme", "top": top, "bottom": bottom}
            out.append(self._save(image, job, f"meme_{Path(f).stem}.png", params))
        return out

    def _save(self, image: Image.Image, job_id: str, name: str, params: dict) -> Path:
        """Save a composed image into its job's folder, with the parameters in the PNG."""
        from .generation import save_png

        folder = self.jobs.job_dir(job_id) / "composed"
        folder.mkdir(parents=True, exist_ok=True)
        defaults = {"final_prompt": "", "steps": None, "guidance": None, "seed": None}
        path = folder / name
        save_png(image, path, {**defaults, **params, "width": image.width, "height": image.height})
        return path
