"""Text-to-image with a style template on a warm backbone.

The base pipeline stays loaded; templates' LoRAs are swapped in and out with diffusers'
``load_lora_weights`` / ``set_adapters`` / ``delete_adapters``, never by reloading the model.
Options beyond plain sampling, all off by default: mixing further templates in at their own
weights (:mod:`studio.engine.mixing`), fusion / style-schedule sampling (:mod:`studio.engine.fusion`) and
starting from the template's style noise prior (:mod:`studio.engine.noise_prior`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.checks import MAX_SEED, boolean, finite_float, shown, strict_int, text
from studio.engine import fusion
from studio.engine.backbones.base import Backbone
from studio.engine.mixing import MixedTemplate, resolve_mix, validate_mix
from studio.engine.noise_prior import NoisePrior, start_latents
from studio.engine.recipe import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_RESOLUTION,
    MAX_SAMPLING_STEPS,
    MIN_RESOLUTION,
    stored_resolution,
)
from studio.engine.training import ADAPTER as TRAINING_ADAPTER
from studio.engine.training import style_caption
from studio.errors import InputError
from studio.media.images import validate_prompt

# Aspect presets: width:height ratios, sized to the backbone's pixel budget.
ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3),
           "16:9": (16, 9), "9:16": (9, 16), "2:1": (2, 1), "1:2": (1, 2)}
MAX_IMAGES = 8
MAX_LORA_SCALE = 4.0
# Image sides must be multiples of this: FLUX and SD3.5 (and the tiny model) downscale 8x in the VAE and
# pack 2x2 latent patches (Backbone.size_multiple); known at submit time, without loading a model.
SIZE_MULTIPLE = 16
MAX_PIXELS = MAX_RESOLUTION * MAX_RESOLUTION  # one image: 4 megapixels, e.g. 2048 x 2048
MAX_REQUEST_PIXELS = 16 * 2**20  # one request, all images: e.g. 4 at 2048 x 2048 or 8 at 1440 x 1440


@dataclass
class GenerateOptions:
    """One text-to-image request. ``None`` means the backbone's / paper's default."""

    prompt: str
    lora_scale: float = 1.0
    seed: int = 0
    steps: int | None = None  # paper: 28
    guidance: float | None = None  # paper: 7.0
    aspect: str = "1:1"
    resolution: int | None = None  # pixel budget side; None: the template's training resolution
    width: int | None = None  # explicit size wins over aspect/resolution
    height: int | None = None
    num_images: int = 1
    wrap_style: bool = True  # "{prompt} in {style} style", as in training
    # Further templates mixed in on top of the main one: [{"template": id or folder, "scale": 0.6}]
    mix: list[dict] = field(default_factory=list)
    style_schedule: float | None = None  # apply the template only in the first X of the steps
    fusion_weight: float = 1.0  # per step v_base + w (v_template - v_base); 1 = plain template
    noise_prior: bool = False  # start from the template's style noise prior instead of N(0, I)

    def validate(self) -> GenerateOptions:
        """Check every field's type and range before anything is queued or allocated; InputError says which.

        JSON from API clients arrives unchecked: a wrong type gets the range message, not a TypeError
        in the worker. Whole numbers given as integral floats (``4.0``) are normalised in place.
        """
        if not isinstance(self.prompt, str | None):
            raise InputError(f"prompt must be a text (got {shown(self.prompt)})")
        self.prompt = validate_prompt(self.prompt, "prompt", max_chars=MAX_PROMPT_CHARS)
        self.lora_scale = finite_float(self.lora_scale, "LoRA strength (lora_scale)", -MAX_LORA_SCALE, MAX_LORA_SCALE)
        self.seed = strict_int(self.seed, "seed", 0, MAX_SEED)
        self.steps = strict_int(self.steps, "steps", 1, MAX_SAMPLING_STEPS, optional=True)
        self.guidance = finite_float(self.guidance, "guidance", 0.0, MAX_GUIDANCE, optional=True)
        self.aspect = text(self.aspect, "aspect", choices=ASPECTS)
        self.resolution = strict_int(self.resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION, optional=True)
        self.width = _side(self.width, "width")
        self.height = _side(self.height, "height")
        self.num_images = strict_int(self.num_images, "number of images (num_images)", 1, MAX_IMAGES)
        self.wrap_style = boolean(self.wrap_style, "wrap_style")
        self.mix = validate_mix(self.mix)
        if self.style_schedule is not None and not (_is_number(self.style_schedule)
                                                    and 0.0 < self.style_schedule <= 1.0):
            raise InputError("style schedule must be more than 0 and at most 1: the fraction of the denoising "
                             "steps that use the style (e.g. 0.3 = the first 30 %; leave it out for all steps)")
        if not (_is_number(self.fusion_weight) and 0.0 <= self.fusion_weight <= 2.0):
            raise InputError("fusion weight must be between 0 and 2 (1 = the template alone, 0 = the base model)")
        self.noise_prior = boolean(self.noise_prior, "noise_prior")
        if self.width is not None and self.height is not None:
            check_pixels(self.width, self.height, self.num_images)
        return self


def _is_number(value: object) -> bool:
    """A real, finite number (not a bool, NaN or an infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _side(value: object, name: str) -> int | None:
    """An explicit width or height: a whole multiple of :data:`SIZE_MULTIPLE` within the resolution bounds."""
    allowed = f"{name} must be a multiple of {SIZE_MULTIPLE} from {MIN_RESOLUTION} to {MAX_RESOLUTION}"
    try:
        side = strict_int(value, name, MIN_RESOLUTION, MAX_RESOLUTION, optional=True)
    except InputError:
        raise InputError(f"{allowed} (got {shown(value)})") from None
    if side is not None and side % SIZE_MULTIPLE:
        lower = max(MIN_RESOLUTION, side // SIZE_MULTIPLE * SIZE_MULTIPLE)
        raise InputError(f"{allowed} (got {side}; e.g. {lower} or {lower + SIZE_MULTIPLE})")
    return side


def check_pixels(width: int, height: int, num_images: int = 1) -> None:
    """Refuse a request whose size would not fit, before any memory is allocated.

    One image may have at most :data:`MAX_PIXELS` (its VAE decode holds about six full-size tensors
    of the decoder's width); one request at most :data:`MAX_REQUEST_PIXELS` in all.
    """
    if width * height > MAX_PIXELS:
        raise InputError(f"{width} x {height} is too large: one image may have at most {MAX_PIXELS / 2**20:g} "
                         f"megapixels (e.g. {MAX_RESOLUTION} x {MAX_RESOLUTION})")
    total = width * height * num_images
    if total > MAX_REQUEST_PIXELS:
        fits = max(1, MAX_REQUEST_PIXELS // (width * height))
        raise InputError(f"{num_images} images of {width} x {height} are too much for one request (at most "
                         f"{MAX_REQUEST_PIXELS / 2**20:g} megapixels in all): make at most {fits} at this size, "
                         "or smaller images")


def output_size(options: GenerateOptions, default_resolution: int, meta: dict | None = None,
                multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The width and height a (validated) request generates at, checked before any model work.

    Explicit ``width`` / ``height`` win; the rest comes from the aspect at the request's resolution,
    else the template's training resolution (``meta``, a template.json dict; a bad stored value is
    refused, see :func:`studio.engine.recipe.stored_resolution`), else ``default_resolution`` (the backbone's).
    """
    width, height = options.width, options.height
    if width is None or height is None:
        name = repr(meta.get("name")) if meta and isinstance(meta.get("name"), str) else "the template"
        resolution = (options.resolution or (stored_resolution(meta, f"template {name}") if meta else None)
                      or default_resolution)
        auto_w, auto_h = size_for_aspect(options.aspect, resolution, multiple)
        width, height = width or auto_w, height or auto_h
    if width % multiple or height % multiple:
        raise InputError(f"width and height must be multiples of {multiple} (got {width} x {height})")
    check_pixels(width, height, options.num_images)
    return width, height


def size_for_aspect(aspect: str, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """Width and height with the given aspect whose area is about ``resolution**2``."""
    aw, ah = ASPECTS[aspect]
    scale = (resolution * resolution / (aw * ah)) ** 0.5
    width = max(multiple, int(aw * scale) // multiple * multiple)
    height = max(multiple, int(ah * scale) // multiple * multiple)
    return width, height


def final_prompt(prompt: str, style_prompt: str | None, wrap: bool = True) -> str:
    """The prompt sent to the model: wrapped in the template's style unless the user opts out."""
    if wrap and style_prompt and not prompt.rstrip(". ").endswith(f"in {style_prompt} style"):
        return style_caption(prompt, style_prompt)
    return prompt


def adapter_name(template_path: Path) -> str:
    """A stable peft adapter name for a template folder."""
    return "t_" + hashlib.sha1(str(Path(template_path).resolve()).encode()).hexdigest()[:12]


def activate_templates(backbone: Backbone, templates: list[tuple[Path, float]]) -> None:
    """Make exactly these (template folder, scale) LoRAs active; load only what is missing."""
    pipe = backbone.pipe
    wanted = {adapter_name(path): (path, scale) for path, scale in templates}
    loaded = set(getattr(backbone.transformer, "peft_config", {}) or {})
    # A training in progress keeps its adapter; it is only switched off while we generate.
    stale = sorted(loaded - set(wanted) - {TRAINING_ADAPTER})
    if stale:
        pipe.delete_adapters(stale)
    for name, (path, _) in wanted.items():
        if name not in loaded:
            try:
                backbone.load_lora(path, name)  # pipe.load_lora_weights, or what works on a quantised base
            except (ValueError, KeyError, RuntimeError) as exc:
                raise InputError(f"template {Path(path).name!r} does not fit this backbone: {exc}") from exc
    if wanted:
        pipe.set_adapters(list(wanted), adapter_weights=[scale for _, scale in wanted.values()])
        # set_adapters does not undo an earlier disable_lora (no-template generation during a
        # training): without this, a template generated right after one would come out bare.
        pipe.enable_lora()
    elif loaded & {TRAINING_ADAPTER}:
        pipe.disable_lora()


def generate(backbone: Backbone, options: GenerateOptions, out_dir: Path,
             template: tuple[Path, dict] | None = None, stem: str = "image",
             mix: list[MixedTemplate] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[Path]:
    """Generate ``options.num_images`` PNGs (seeds ``seed, seed+1, ...``) into ``out_dir``.

    ``template`` is ``(folder, template.json dict)`` or None for the bare base model. ``mix``
    holds the resolved ``(folder, template.json dict, scale)`` of ``options.mix`` (see
    :func:`studio.engine.mixing.resolve_mix`; entries that are folder paths are resolved here when it
    is None). Each PNG carries its generation parameters in PNG text chunks ("parameters" and
    "studio"). ``should_stop`` (a callable) is asked after every denoising step: a cancel ends the job
    within one step (:class:`studio.errors.CancelledError`).
    """
    options.validate()
    if mix is None:
        mix = resolve_mix(None, options.mix)
    prior = check_request(options, template, mix, backbone.family)
    style = None
    # The size is checked before any adapter is loaded or latent allocated.
    width, height = output_size(options, backbone.default_resolution, template[1] if template else None,
                                backbone.size_multiple)
    if template is not None:
        folder, meta = template
        style = meta.get("style_prompt")
        activate_templates(backbone, [(folder, options.lora_scale)] + [(f, scale) for f, _, scale in mix])
    else:
        activate_templates(backbone, [])
    prompt = final_prompt(options.prompt, style, options.wrap_style)
    steps = options.steps or backbone.default_steps
    guidance = backbone.default_guidance if options.guidance is None else options.guidance
    weights = None
    if fusion.is_active(options.fusion_weight, options.style_schedule):
        weights = fusion.step_weights(steps, options.fusion_weight, options.style_schedule)
    # One call: text encoders that rest on the CPU are moved to the GPU once for both prompts, and a
    # prompt encoded before (the negative, a preview's, a repeated request's) comes from the cache.
    texts = [prompt] if backbone.negative_prompt() is None else [prompt, backbone.negative_prompt()]
    conds = backbone.encode_prompts(texts)
    negative = conds[1] if len(conds) > 1 else None
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(options.num_images):
        seed = options.seed + k
        latents = start_latents(backbone, prior, seed, width, height) if prior is not None else None
        sample = dict(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                      negative=negative, latents=latents, should_stop=should_stop)
        if weights is None:
            image = backbone.generate(conds[0], **sample)
        else:
            image = fusion.fused_generate(backbone, conds[0], weights, **sample)
        params = {**asdict(options), "seed": seed, "steps": steps, "guidance": guidance,
                  "width": width, "height": height, "final_prompt": prompt,
                  "backbone": backbone.backbone_id,
                  "template": template[1].get("id") if template else None,
                  "mix": [{"template": m.get("id") or m.get("name") or Path(f).name, "scale": scale}
                          for f, m, scale in mix]}
        path = out_dir / f"{stem}_{seed}.png"
        save_png(image, path, params)
        files.append(path)
    return files


def check_request(options: GenerateOptions, template: tuple[Path, dict] | None, mix: list[MixedTemplate],
                  family: str | None = None) -> NoisePrior | None:
    """What can be checked before any model work; returns the noise prior to start from, if any.

    Callers that load a model first (the CLI) call it early; :func:`generate` calls it again.
    """
    if mix and template is None:
        raise InputError("mixing needs a main template: pick one, then mix others into it")
    if template is None:
        if fusion.is_active(options.fusion_weight, options.style_schedule) or options.noise_prior:
            raise InputError("fusion, style schedule and noise prior need a template")
        return None
    folder, meta = template
    family = family or meta.get("family")  # no model loaded yet: mixed templates must match the main one
    for f, m in [(folder, meta)] + [(f, m) for f, m, _ in mix]:
        if family and m.get("family") and m["family"] != family:
            raise InputError(f"template {m.get('name') or Path(f).name!r} was trained for {m['family']}, "
                             f"not for the {family} backbone")
    if Path(folder).resolve() in {Path(f).resolve() for f, _, _ in mix}:
        raise InputError("the main template cannot be mixed into itself; change its strength instead")
    return NoisePrior.load(folder) if options.noise_prior else None


def parameters_text(params: dict) -> str:
    """The A1111-style "parameters" line other tools read: every LoRA that drew the picture (mixed-in
    templates too), and the style schedule, fusion and noise prior when they were used."""
    loras = [f"{params.get('template')} @ {params.get('lora_scale')}"] if params.get("template") else []
    loras += [f"{m.get('template')} @ {m.get('scale')}" for m in params.get("mix") or []]
    extra = []
    if params.get("style_schedule") not in (None, 1, 1.0):
        extra.append(f"Style schedule: first {params['style_schedule']:.0%} of the steps")
    if params.get("fusion_weight") not in (None, 1, 1.0):
        extra.append(f"Fusion weight: {params['fusion_weight']}")
    if params.get("noise_prior"):
        extra.append("Noise prior: the template's")
    return (f"{params['final_prompt']}\nSteps: {params['steps']}, Sampler: flow-match Euler, "
            f"Guidance: {params['guidance']}, Seed: {params['seed']}, Size: {params['width']}x{params['height']}, "
            f"LoRA: {', '.join(loras) or 'none'}, " + "".join(f"{e}, " for e in extra)
            + f"Model: {params.get('backbone')}")


def save_png(image: Image.Image, path: Path, params: dict) -> None:
    """Save a PNG atomically with its generation parameters in text chunks."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("studio", json.dumps(params))
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
