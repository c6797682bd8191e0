"""Generating through the studio: text-to-image, comic pages composed from panel jobs, memes, and the
history of what was made. :class:`Generation` is a part of :class:`studio.api.StudioAPI` (it uses its
``jobs``, ``store`` and ``backbone``); the pictures themselves are drawn by the worker's generation jobs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from studio.checks import boolean, json_object, strict_int, text
from studio.engine.recipe import MAX_RESOLUTION, MIN_RESOLUTION, stored_resolution
from studio.errors import InputError, StudioError
from studio.jobs.jobs import Jobs, parse_generate_options
from studio.jobs.records import CANCELLED, DONE, FAILED, FINAL
from studio.media import compose
from studio.store.templates import TemplateInfo, TemplateStore

MODES = ("text-to-image", "multi-panel", "meme")
_MODE_ALIASES = {"t2i": "text-to-image", "text": "text-to-image", "txt2img": "text-to-image",
                 "comic": "multi-panel", "panels": "multi-panel", "multipanel": "multi-panel"}
# Keys of /generate's options besides GenerateOptions' fields, per mode.
MODE_KEYS = {
    "text-to-image": set(),
    "multi-panel": {"panels", "captions", "layout", "gutter", "border", "single_shot"},
    "meme": {"top", "bottom", "meme_style"},
}
GENERATE_TIMEOUT_S = 1800.0
HISTORY_SCAN = 500  # generation jobs looked at for the history, newest first
MAX_HISTORY = 200  # pictures in /generation_history
PANEL_MARK = "panel"  # in a generation job's folder: one panel of a comic page composed elsewhere


class Generation:
    """The generation half of :class:`studio.api.StudioAPI` (``jobs``, ``store`` and ``backbone`` are its)."""

    jobs: Jobs
    store: TemplateStore
    backbone: str | None

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
        from studio.engine.generation import GenerateOptions

        mode = (text(mode, "mode", optional=True) or "").strip().lower()
        mode = _MODE_ALIASES.get(mode, mode or "text-to-image")
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
        opts = json_object(options, "options", '{"seed": 1, "steps": 20}')
        extra = {k: opts.pop(k) for k in list(opts) if k in MODE_KEYS[mode]}
        known = {f.name for f in fields(GenerateOptions)} - {"prompt"}
        unknown = sorted(str(k) for k in set(opts) - known)
        if unknown:
            raise InputError(f"unknown option(s) for {mode}: {', '.join(unknown)}")
        prompt = text(prompt, "prompt", optional=True) or ""
        template_id = (text(template_id, "template id", optional=True) or "").strip() or None
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
        if boolean(extra.get("single_shot"), "single_shot", optional=True):
            return self._single_shot(info, prompt, opts, say)
        prompts, captions = _panels(extra.get("panels"), prompt)
        given = extra.get("captions")
        if isinstance(given, list | tuple):
            captions = list(given)
        elif given is False:
            captions = []
        elif given is not None:
            raise InputError("captions must be a list of texts (one per panel) or false for none")
        layout = text(extra.get("layout"), "layout", optional=True) or "auto"
        compose.parse_layout(layout, len(prompts))
        gutter, border = compose.check_frame(extra.get("gutter", 16), extra.get("border", 4))
        captions = [compose.check_caption(c, "panel caption") for c in captions]
        if captions and len(captions) != len(prompts):
            raise InputError(f"give one caption per panel ({len(prompts)}), or none")
        # One job per panel, all with the same seed: a shared starting noise keeps panels alike.
        base = {**opts, "num_images": 1}
        requests = [{**base, "prompt": p} for p in prompts]
        for request in requests:  # every panel is checked before the first one is queued
            parse_generate_options(request)
        jobs = [self._submit(info, r) for r in requests]
        for job_id in jobs:  # the history lists the page, not each panel (the page goes into jobs[0])
            (self.jobs.job_dir(job_id) / PANEL_MARK).touch()
        statuses = self._wait(jobs, say)
        files = [s["outputs"][0] for s in statuses]
        say("laying out the page")
        page = compose.compose_panels([Image.open(f) for f in files], layout, gutter=gutter, border=border,
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
        resolution = (strict_int(opts.get("resolution"), "resolution", MIN_RESOLUTION, MAX_RESOLUTION, optional=True)
                      or stored_resolution(info.meta, f"template {info.name!r}")
                      or min(max(size), MAX_RESOLUTION))
        width, height = compose.reference_aspect(size, resolution)
        job = self._submit(info, {**opts, "prompt": prompt, "width": width, "height": height})
        return [Path(p) for p in self._wait([job], say)[0]["outputs"]]

    def _meme(self, info: TemplateInfo | None, prompt: str, opts: dict, extra: dict,
              say: Callable[[str], None]) -> list[Path]:
        # Captions, fonts and the style are checked before any GPU work.
        top = compose.check_caption(extra.get("top"), "top caption")
        bottom = compose.check_caption(extra.get("bottom"), "bottom caption")
        style = (text(extra.get("meme_style"), "meme_style", optional=True) or "classic").lower()
        if style not in ("classic", "typography"):
            raise InputError("meme_style must be 'classic' (captions on top) or 'typography' (text drawn by the model)")
        if not top and not bottom:
            raise InputError("a meme needs a top or a bottom caption")
        if style == "typography":
            words = " ".join(t for t in (top, bottom) if t).replace('"', "'")
            job = self._submit(info, {**opts, "prompt": f'{(prompt or "").strip()} with the text "{words}"'})
            return [Path(p) for p in self._wait([job], say)[0]["outputs"]]
        for caption in (top, bottom):
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

    def generation_history(self, template_id: str | None = None, limit: int | None = None) -> list[dict]:
        """Pictures made before, newest first (``template_id``: only with that template; "" or None: all):
        [{"image", "prompt", "template_id", "job_id", "created"}], at most ``limit`` (1-200, default 24).
        A comic page or meme is listed as the composed picture, not as its panels. The job folders are the
        history: it survives restarts, and deleting a job in the Jobs view removes its pictures."""
        template_id = (text(template_id, "template id", optional=True) or "").strip() or None
        limit = 24 if limit is None else strict_int(limit, "limit", 1, MAX_HISTORY)
        out: list[dict] = []
        for status in self.jobs.list_jobs("generate", states=DONE, limit=HISTORY_SCAN, brief=True):
            request = status.get("request") or {}
            if template_id is not None and request.get("template_id") != template_id:
                continue
            folder = self.jobs.job_dir(status["id"])
            composed = sorted((folder / "composed").glob("*.png")) if (folder / "composed").is_dir() else []
            if (folder / PANEL_MARK).exists() and not composed:
                continue  # one panel of a comic page: the page itself is listed with the job that holds it
            asked = (request.get("options") or {}).get("prompt") or ""
            for path in composed or [Path(p) for p in status["outputs"]]:
                if path.is_file():  # the prompt as drawn (style words, a comic's panels) is in the PNG
                    prompt = _png_prompt(path) or asked
                    out.append({"image": str(path), "prompt": prompt, "template_id": request.get("template_id"),
                                "job_id": status["id"], "created": status.get("created")})
            if len(out) >= limit:
                break
        return out[:limit]

    def _save(self, image: Image.Image, job_id: str, name: str, params: dict) -> Path:
        """Save a composed image into its job's folder, with the parameters in the PNG."""
        from studio.engine.generation import save_png

        folder = self.jobs.job_dir(job_id) / "composed"
        folder.mkdir(parents=True, exist_ok=True)
        defaults = {"final_prompt": "", "steps": None, "guidance": None, "seed": None}
        path = folder / name
        save_png(image, path, {**defaults, **params, "width": image.width, "height": image.height})
        return path


def read_png_params(path: str | Path) -> dict:
    """The generation parameters stored in a studio PNG ("studio" text chunk), or {}."""
    try:
        with Image.open(path) as img:
            return json.loads(img.text.get("studio", "{}"))  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return {}


def _png_prompt(path: Path) -> str:
    return str(read_png_params(path).get("final_prompt") or "")


def _panels(panels: Any, prompt: str) -> tuple[list[str], list[str]]:
    """A comic page's panel prompts and captions from ``panels`` (a list of "prompt | caption" texts or
    {prompt, caption} dicts, or one text with a panel per line; default: the prompt's lines)."""
    if isinstance(panels, str):
        panels = [line for line in panels.splitlines() if line.strip()]
    if not panels and prompt:
        panels = [line for line in prompt.splitlines() if line.strip()]
    if panels is not None and not isinstance(panels, list | tuple):
        raise InputError("panels must be a list of panel prompts (or one text with a panel per line)")
    panels = list(panels or [])
    if not 2 <= len(panels) <= compose.MAX_PANELS:
        raise InputError(f"a comic page needs 2 to {compose.MAX_PANELS} panel prompts, one per line "
                         f"(got {len(panels)})")
    prompts, captions = [], []
    for i, panel in enumerate(panels, 1):
        if isinstance(panel, dict):
            words, caption = panel.get("prompt") or "", panel.get("caption") or ""
        elif isinstance(panel, str):  # "prompt | caption" on one line
            words, _, caption = panel.partition("|")
        else:
            words, caption = None, None
        if not isinstance(words, str) or not isinstance(caption, str):
            raise InputError(f"panel {i} must be a text or a {{prompt, caption}} object with texts")
        if not words.strip():
            raise InputError(f"panel {i} has no prompt")
        prompts.append(words.strip())
        captions.append(caption.strip())
    return prompts, captions
