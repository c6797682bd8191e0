"""The paper's evaluation protocol (seed 000, §4, Table 2): ``python -m studio.styles.evaluate``.

For every reference style and every configuration (a training recipe such as the SD3 sampler
baseline or the style-friendly sampler) it trains one template on one warm backbone, generates the
paper's 23 prompts x 2 seeds as ``"{prompt} in {style prompt} style"``, and scores the images with
DINO / CLIP-I (against the style's reference images) and CLIP-T (against the content prompt, see
:mod:`studio.styles.metrics`). Then it writes a table, CSV/JSON results and one image grid per style.

**Styles folder.** Either one entry per style::

    styles/
      watercolor/            a folder per style: its image(s) (png, jpg, jpeg, webp) ...
        reference.png
        style.txt            ... the style prompt on the first line ("watercolor painting")
        caption.txt          optional content caption(s): one line for all images, or one per image
                             in file-name order ("A house"); default "an image"
      flat_cartoon.png       or a single image per style, with
      flat_cartoon.txt       its style prompt beside it (and optionally flat_cartoon.caption.txt)

or a ``styles.json`` manifest in the folder (it wins when present; paths relative to the folder)::

    {"styles": [{"name": "watercolor-house", "style_prompt": "watercolor painting",
                 "images": ["refs/house.png"], "captions": ["A house"]}]}

Style names become folder names: letters, digits, ``.``, ``_`` and ``-`` are kept, anything else
is slugified. The StyleDrop references the paper used are not shipped (their licences vary);
``assets/eval/styles`` is a two-style example for smoke runs.

**Configurations.** Named presets (:data:`CONFIG_PRESETS`: ``sd3``, ``style_friendly``, ``sigma2``,
``sigma3``, ``offset0.01``, ``sd3_offset0.1``, ``uniform``) or custom ones,
``--config name:key=value,key=value`` with keys from :class:`studio.engine.recipe.Recipe`. Every
configuration trains with the same seed, so configurations differ only in their recipe.

**Output folder**::

    table.md                 mean over styles and per style, configurations side by side
    results.csv, results.json  one row per (style, configuration); results.json adds per-image scores
    grids/<style>.png        rows: configurations; columns: the reference, then each prompt x seed
    units/<style>/<config>/  spec.json, run/ (training; run/result is the template), images/, result.json
    eval.log                 what each invocation did

**Resuming.** Run the same command again: a unit whose ``result.json`` matches the settings is not
touched; an interrupted unit keeps its finished parts (a trained template, generated images) and
its training resumes from the last checkpoint. Changing a unit's training settings (recipe,
backbone, references, style prompt) retrains it; changing generation settings regenerates it;
adding prompts or seeds generates only the new images. Delete ``units/<style>/<config>`` to redo
one unit from scratch; delete its ``result.json`` to rescore it. Units scored without the metric
models are scored by a later run that has them, without retraining.

**The full protocol on a GPU** (FLUX.1-dev, 18 styles x 23 prompts x 2 seeds; 300 training steps,
28 denoising steps and guidance 7.0 are the defaults)::

    hf auth login   # FLUX.1-dev is gated: accept its licence on the Hub first
    hf download black-forest-labs/FLUX.1-dev --exclude "flux1-dev.safetensors" "ae.safetensors"
    hf download facebook/dino-vits16
    hf download openai/clip-vit-base-patch32
    HF_HUB_OFFLINE=1 python -m studio.styles.evaluate --backbone flux-dev --styles styledrop/ \
        --out eval/flux-dev --configs sd3,sigma2,sigma3

``styledrop/`` holds the 18 reference images in the format above. Each finished FLUX unit keeps its
LoRA (``run/result``, about 360 MB; delete it to reclaim the space: a unit is only retrained when it
still has images to make); checkpoints are deleted once a unit's training is done.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from studio import config as studio_config
from studio.engine.recipe import Recipe
from studio.engine.training import Observer, StepReport, style_caption, write_json
from studio.errors import InputError, StudioError
from studio.media.images import load_reference_images, slugify, validate_prompt

log = logging.getLogger(__name__)

# The paper's 23 evaluation prompts (seed 000, appendix C.2; StyleDrop's list), in its order.
PAPER_PROMPTS: tuple[str, ...] = (
    "An Opera house in Sydney",
    "A fluffy baby sloth with a knitted hat trying to figure out a laptop, close up",
    "A Golden Gate bridge",
    "The letter 'G'",
    "A man riding a snowboard",
    "A panda eating bamboo",
    "A friendly robot",
    "A baby penguin",
    "A moose",
    "A towel",
    "An espresso machine",
    "An avocado",
    "A crown",
    "A banana",
    "A bench",
    "A boat",
    "A butterfly",
    "An F1 race car",
    "A Christmas tree",
    "A cow",
    "A hat",
    "A piano",
    "A wood cabin",
)

# Named configurations: Recipe fields over the paper's recipe (Recipe() defaults).
CONFIG_PRESETS: dict[str, dict[str, Any]] = {
    "sd3": {"sampler": "sd3"},  # the baseline: logit-normal t with shift 3
    "style_friendly": {"sampler": "style_friendly"},  # mu -6, sigma: the family default (FLUX 3, SD3.5 2)
    "sigma2": {"sampler": "style_friendly", "sigma": 2.0},
    "sigma3": {"sampler": "style_friendly", "sigma": 3.0},
    "offset0.01": {"sampler": "style_friendly", "offset_noise": 0.01},  # the paper's best FLUX result
    "sd3_offset0.1": {"sampler": "sd3", "offset_noise": 0.1},  # Table S3's offset-noise baseline
    "uniform": {"sampler": "uniform"},
}
DEFAULT_CONFIGS = ("sd3", "style_friendly")

# The paper's numbers (DINO, CLIP-I, CLIP-T) per backbone, shown as reference rows. Table 2 of v3/CVPR
# reports FLUX style-friendly as 0.478 (sigma 3, the FLUX default); v1/v2 reported 0.461 (sigma 2).
PAPER_RESULTS: dict[str, tuple[str, list[tuple[str, tuple[float, float, float]]]]] = {
    "flux-dev": ("FLUX.1-dev", [
        ("Table 2: SD3 sampler", (0.373, 0.645, 0.350)),
        ("Table 2 (v3): style-friendly, sigma 3", (0.478, 0.691, 0.343)),
        ("Table 2 (v1/v2): style-friendly, sigma 2", (0.461, 0.686, 0.344)),
        ("Table S3: style-friendly + offset noise 0.01", (0.500, 0.704, 0.341)),
    ]),
    "sd3.5-large": ("SD3.5-Large", [
        ("Table 2: SD3 sampler", (0.424, 0.670, 0.350)),
        ("Table 2: style-friendly, sigma 2", (0.489, 0.698, 0.349)),
    ]),
}
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T (content)"))
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Style:
    """One reference style: its images, style prompt and optional content captions."""

    name: str
    style_prompt: str
    images: list[Path]
    captions: list[str | None] | None = None


def _style_name(raw: str) -> str:
    return raw if _SAFE_NAME.fullmatch(raw) else slugify(raw)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _captions(lines: list[str], n_images: int, where: str) -> list[str | None] | None:
    if not lines:
        return None
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise InputError(f"{where}: give one caption line for all images or one per image ({n_images})")
    return list(lines)


def _manifest_styles(folder: Path, manifest: Path) -> list[Style]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{manifest} is not valid JSON ({exc})") from None
    entries = data.get("styles") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(f'{manifest}: expected {{"styles": [...]}} or a list of styles')
    styles = []
    for k, entry in enumerate(entries):
        where = f"{manifest.name} entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or not entry["images"]:
            raise InputError(f"{where}: give a dict with 'images' (a non-empty list) and 'style_prompt'")
        images = [folder / str(p) for p in entry["images"]]
        captions = entry.get("captions")
        if captions is not None and (not isinstance(captions, list) or len(captions) != len(images)):
            raise InputError(f"{where}: 'captions' must be a list with one caption per image")
        name = str(entry.get("name") or images[0].stem)
        prompt = validate_prompt(str(entry.get("style_prompt") or ""), f"style prompt of {name!r}")
        styles.append(Style(_style_name(name), prompt, images, [c or None for c in captions] if captions else None))
    return styles


def _folder_styles(folder: Path) -> list[Style]:
    styles = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            name = path.name
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
                            and not p.name.startswith("."))
            prompt_file, caption_file = path / "style.txt", path / "caption.txt"
        elif path.suffix.lower() in _IMAGE_SUFFIXES:
            name, images = path.stem, [path]
            prompt_file, caption_file = path.with_suffix(".txt"), path.with_name(f"{path.stem}.caption.txt")
        else:
            continue
        if not images:
            raise InputError(f"style folder {name!r} holds no images")
        if not prompt_file.is_file():
            raise InputError(f"style {name!r} has no style prompt: write it into "
                             f"{prompt_file.relative_to(folder)} (one line, e.g. 'watercolor painting')")
        lines = _read_lines(prompt_file)
        prompt = validate_prompt(lines[0] if lines else "", f"style prompt in {prompt_file.name}")
        captions = _captions(_read_lines(caption_file), len(images), caption_file.name) \
            if caption_file.is_file() else None
        styles.append(Style(_style_name(name), prompt, images, captions))
    return styles


def load_styles(folder: str | os.PathLike) -> list[Style]:
    """Read a styles folder (see the module docstring); InputError naming what is wrong."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"styles folder {folder} does not exist")
    manifest = folder / "styles.json"
    styles = _manifest_styles(folder, manifest) if manifest.is_file() else _folder_styles(folder)
    if not styles:
        raise InputError(f"no styles found in {folder}: add one folder (images + style.txt) or image + .txt "
                         "per style, or a styles.json")
    names = [s.name for s in styles]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"two styles share the name(s) {', '.join(duplicates)}")
    return styles


@dataclass
class EvalConfig:
    """A named training configuration: Recipe fields over the paper's recipe."""

    name: str
    overrides: dict[str, Any]


def _parse_value(key: str, text: str) -> Any:
    """Parse ``text`` as the type of Recipe field ``key``."""
    kinds = {f.name: str(f.type) for f in fields(Recipe)}
    if key not in kinds:
        raise InputError(f"unknown recipe field {key!r}; choose from {', '.join(sorted(kinds))}")
    kind, text = kinds[key], text.strip()
    if text.lower() == "none" and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise InputError(f"{key}={text!r}: expected {kind.split(' ')[0]}") from None
    return text


def parse_config(text: str) -> EvalConfig:
    """``name:key=value,key=value`` (or a preset's name) -> EvalConfig; InputError when malformed."""
    name, _, body = text.partition(":")
    name = name.strip()
    if not _SAFE_NAME.fullmatch(name):
        raise InputError(f"configuration name {name!r}: use letters, digits, '.', '_' or '-'")
    if not body.strip():
        if name not in CONFIG_PRESETS:
            raise InputError(f"unknown configuration {name!r}; presets: {', '.join(CONFIG_PRESETS)}, "
                             "or define one with --config name:key=value,...")
        return EvalConfig(name, dict(CONFIG_PRESETS[name]))
    overrides: dict[str, Any] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"--config {text!r}: expected key=value, got {item!r}")
        overrides[key.strip()] = _parse_value(key.strip(), value)
    Recipe(**overrides).validate()
    return EvalConfig(name, overrides)


def resolve_configs(names: str | list[str] | None, custom: list[str] | None = None) -> list[EvalConfig]:
    """``--configs`` names (presets or names from ``--config``) plus every ``--config`` definition."""
    defined = {c.name: c for c in (parse_config(text) for text in custom or [])}
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    ordered = list(dict.fromkeys([*(names or DEFAULT_CONFIGS), *defined]))
    return [defined.get(n) or parse_config(n) for n in ordered]


@dataclass
class EvalSettings:
    """Everything an evaluation run depends on (the CLI flags)."""

    styles_dir: Path
    out_dir: Path
    backbone: str = "tiny"
    configs: list[EvalConfig] = field(default_factory=lambda: resolve_configs(None))
    prompts: int = len(PAPER_PROMPTS)
    seeds: int = 2
    steps: int | None = None  # None: the recipe's (300)
    resolution: int | None = None  # None: the backbone's default
    gen_steps: int | None = None  # None: the backbone's default (28)
    guidance: float | None = None  # None: the backbone's default (7.0)
    dino_model: str | None = None
    clip_model: str | None = None
    score: bool = True

    def validate(self) -> EvalSettings:
        if not 1 <= self.prompts <= len(PAPER_PROMPTS):
            raise InputError(f"--prompts must be between 1 and {len(PAPER_PROMPTS)}")
        if not 1 <= self.seeds <= 100:
            raise InputError("--seeds must be between 1 and 100")
        if self.gen_steps is not None and not 1 <= self.gen_steps <= 200:
            raise InputError("--gen-steps must be between 1 and 200")
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise InputError("configuration names must be unique")
        for c in self.configs:
            self.recipe(c)  # validates
        return self

    def recipe(self, cfg: EvalConfig) -> Recipe:
        """The recipe a configuration trains with: no previews (the grid shows the results)."""
        recipe = replace(Recipe(**cfg.overrides), preview_every=0)
        if self.steps is not None:
            recipe = replace(recipe, steps=self.steps)
        if self.resolution is not None:
            recipe = replace(recipe, resolution=self.resolution)
        return recipe.validate()

    def items(self) -> list[tuple[int, int]]:
        """(prompt index, seed) of every image a unit generates."""
        return [(p, s) for p in range(self.prompts) for s in range(self.seeds)]


# -- one unit: (style, configuration) -------------------------------------------------------------


def _image_name(prompt_index: int, seed: int) -> str:
    """A unit's image, relative to the unit folder (generation writes ``{stem}_{seed}.png``)."""
    return f"images/p{prompt_index:02d}_{seed}.png"


def _train_changed(old: dict, new: dict) -> bool:
    """Whether a unit must be retrained. Recipe fields added to the code since the unit was trained
    count as unchanged while they hold their default, so upgrading the studio mid-run retrains nothing."""
    defaults = Recipe().to_dict()
    recipe = {**{k: defaults.get(k) for k in new["recipe"]}, **(old.get("recipe") or {})}
    return {**old, "recipe": {k: v for k, v in recipe.items() if k in new["recipe"]}} != new


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _BarObserver(Observer):
    """Shows training progress of the current unit in the evaluation's progress bar."""

    def __init__(self, bar: tqdm, label: str):
        self.bar, self.label, self.last = bar, label, 0.0

    def on_step(self, report: StepReport) -> None:
        now = time.monotonic()
        if now - self.last < 0.5 and report.step < report.total:  # one redraw per step floods logs
            return
        self.last = now
        self.bar.set_postfix_str(f"{self.label}: training {report.step}/{report.total} "
                                 f"loss {report.loss:.4f}", refresh=True)


class Evaluation:
    """One evaluation run: a warm backbone, a lazily loaded scorer, the output folder."""

    def __init__(self, settings: EvalSettings, backbone=None, scorer=None):
        self.settings = settings.validate()
        self.styles = load_styles(settings.styles_dir)
        self._references: dict[str, list[Image.Image]] = {}
        for style in self.styles:  # a bad image fails now, not hours into a run
            self.references(style)
        self.out = Path(settings.out_dir)
        self._backbone = backbone
        self._scorer = scorer
        if backbone is not None:
            self.backbone_id, self.family = backbone.backbone_id, backbone.family
        else:  # resolved (not loaded) up front: a bad name fails before any work
            from studio.engine.backbones import resolve

            spec = resolve(settings.backbone)
            self.backbone_id, self.family = spec.backbone_id, spec.family
        self.scorer_reason = ""
        self.summary: dict[str, list[str]] = {"trained": [], "generated": [], "scored": [], "skipped": []}

    # lazily: a fully finished output folder is re-tabled without loading any model
    @property
    def backbone(self):
        if self._backbone is None:
            from studio.engine.backbones import load_backbone

            tqdm.write(f"loading backbone {self.backbone_id} ...", file=sys.stderr)
            self._backbone = load_backbone(self.backbone_id)
        return self._backbone

    def scorer(self):
        """The StyleScorer, or None (with ``scorer_reason``) when scoring is off or impossible."""
        if not self.settings.score:
            self.scorer_reason = "scoring was turned off (--no-score)"
            return None
        if self._scorer is None:
            from studio.styles.metrics import StyleScorer

            self._scorer = StyleScorer(self.settings.dino_model, self.settings.clip_model)
        ok, reason = self._scorer.available()
        self.scorer_reason = reason
        return self._scorer if ok else None

    def references(self, style: Style) -> list[Image.Image]:
        if style.name not in self._references:
            self._references[style.name] = load_reference_images(style.images)
        return self._references[style.name]

    def unit_dir(self, style: Style, cfg: EvalConfig) -> Path:
        return self.out / "units" / style.name / cfg.name

    def spec(self, style: Style, cfg: EvalConfig) -> dict:
        """What a unit's results depend on: training and generation settings, kept apart."""
        s = self.settings
        return {
            "train": {
                "backbone": self.backbone_id,
                "recipe": s.recipe(cfg).to_dict(),
                "style_prompt": style.style_prompt,
                "captions": style.captions,
                "references": [_file_digest(p) for p in style.images],
            },
            "generate": {"steps": s.gen_steps, "guidance": s.guidance, "resolution": s.resolution},
        }

    def run(self) -> dict[str, list[str]]:
        """Train, generate and score every unit that is not finished; write the reports."""
        self.out.mkdir(parents=True, exist_ok=True)
        scorer = self.scorer()
        if scorer is None:
            tqdm.write(f"note: scores will be missing: {self.scorer_reason}", file=sys.stderr)
        self._log(f"start: backbone {self.settings.backbone}, {len(self.styles)} styles, configs "
                  f"{[c.name for c in self.settings.configs]}, {self.settings.prompts} prompts x "
                  f"{self.settings.seeds} seeds")
        units = [(st, c) for st in self.styles for c in self.settings.configs]
        with tqdm(units, desc="evaluation", unit="unit", file=sys.stderr, dynamic_ncols=True) as bar:
            for style, cfg in bar:
                bar.set_postfix_str(f"{style.name}/{cfg.name}", refresh=True)
                result = self.run_unit(style, cfg, scorer, bar)
                scores = " ".join(f"{label} {result[key]:.3f}" for key, label in METRICS
                                  if result.get(key) is not None)
                bar.write(f"{style.name}/{cfg.name}: {scores or 'not scored'}", file=sys.stderr)
                write_reports(self, grids_for=[style])  # partial results are readable during long runs
        write_reports(self)
        self._log("done: " + ", ".join(f"{k} {len(v)}" for k, v in self.summary.items()))
        return self.summary

    def run_unit(self, style: Style, cfg: EvalConfig, scorer, bar: tqdm) -> dict:
        """Bring one unit up to date and return its result.json content."""
        unit, label = self.unit_dir(style, cfg), f"{style.name}/{cfg.name}"
        spec = self.spec(style, cfg)
        old = _read_json(unit / "spec.json")
        if old is not None and _train_changed(old.get("train") or {}, spec["train"]):
            self._log(f"{label}: training settings changed, redoing the unit")
            shutil.rmtree(unit)
        elif old is not None and old.get("generate") != spec["generate"]:
            self._log(f"{label}: generation settings changed, regenerating")
            shutil.rmtree(unit / "images", ignore_errors=True)
            (unit / "result.json").unlink(missing_ok=True)
        unit.mkdir(parents=True, exist_ok=True)
        write_json(unit / "spec.json", spec)

        items = [list(i) for i in self.settings.items()]
        result = _read_json(unit / "result.json")
        if result is not None and result.get("items") == items:
            scored = result.get("dino") is not None
            same_models = result.get("metric_models") == self._metric_models(scorer)
            if scorer is None or (scored and same_models):
                self.summary["skipped"].append(label)
                return result

        missing = [(p, s) for p, s in self.settings.items() if not (unit / _image_name(p, s)).is_file()]
        gen_seconds = 0.0
        if missing:  # the template is only needed for images still to make (LoRAs may be deleted)
            template = self._train(style, cfg, unit, bar, label)
            gen_seconds = self._generate(unit, template, missing, bar, label)
        bar.set_postfix_str(f"{label}: scoring", refresh=True)
        result = self._score(style, cfg, unit, scorer, result, gen_seconds)
        write_json(unit / "result.json", result)  # last: its presence means "unit finished"
        return result

    def _train(self, style: Style, cfg: EvalConfig, unit: Path, bar: tqdm, label: str) -> Path:
        from studio.engine.training import TrainRequest, prepare_run, train

        run_dir = unit / "run"
        template = run_dir / "result"
        if (template / "template.json").is_file():
            return template
        backbone = self.backbone
        request = TrainRequest(self.references(style), style.style_prompt, f"eval {style.name} {cfg.name}",
                               self.settings.recipe(cfg), style.captions)
        prepare_run(request, run_dir, backbone.backbone_id, backbone.family, backbone.default_resolution)
        t0 = time.perf_counter()
        train(backbone, run_dir, _BarObserver(bar, label))
        seconds = time.perf_counter() - t0
        for stale in ("checkpoint", "checkpoint.old"):  # the finished template is all we keep (FLUX: ~1 GB each)
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        write_json(run_dir / "timing.json", {"train_seconds": seconds})
        self.summary["trained"].append(label)
        self._log(f"{label}: trained in {seconds:.1f} s")
        return template

    def _generate(self, unit: Path, template: Path, missing: list[tuple[int, int]], bar: tqdm, label: str) -> float:
        from studio.engine.generation import GenerateOptions, generate

        t0 = time.perf_counter()
        meta = json.loads((template / "template.json").read_text())
        for k, (p, s) in enumerate(missing):
            bar.set_postfix_str(f"{label}: generating {k + 1}/{len(missing)}", refresh=True)
            options = GenerateOptions(prompt=PAPER_PROMPTS[p], seed=s, steps=self.settings.gen_steps,
                                      guidance=self.settings.guidance, resolution=self.settings.resolution)
            generate(self.backbone, options, unit / "images", (template, meta), stem=f"p{p:02d}")  # p00_0.png
        self.summary["generated"].append(label)
        return time.perf_counter() - t0

    def _metric_models(self, scorer) -> list[str] | None:
        return [scorer.dino_source, scorer.clip_source] if scorer is not None else None

    def _score(self, style: Style, cfg: EvalConfig, unit: Path, scorer, old: dict | None,
               gen_seconds: float) -> dict:
        items = self.settings.items()
        content = [PAPER_PROMPTS[p] for p, _ in items]
        per_image = [{"prompt_index": p, "seed": s, "prompt": PAPER_PROMPTS[p], "file": _image_name(p, s)}
                     for p, s in items]
        timing = _read_json(unit / "run" / "timing.json") or {}
        result: dict[str, Any] = {
            "style": style.name, "config": cfg.name, "style_prompt": style.style_prompt,
            "items": [list(i) for i in items],
            "train_seconds": timing.get("train_seconds"),
            "generate_seconds": gen_seconds + ((old or {}).get("generate_seconds") or 0.0),
            "final_loss": (_read_json(unit / "run" / "result" / "template.json") or {}).get("final_loss"),
            "metric_models": self._metric_models(scorer),
            "scores_missing": None,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
            result[key] = None
        if scorer is None:
            result["scores_missing"] = self.scorer_reason
        else:
            images = [Image.open(unit / item["file"]).convert("RGB") for item in per_image]
            full = [style_caption(p, style.style_prompt) for p in content]
            scores = scorer.score(images, self.references(style), content, full)
            for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
                result[key] = scores[key]
                for item, value in zip(per_image, scores["per_image"][key], strict=True):
                    item[key] = value
            self.summary["scored"].append(f"{style.name}/{cfg.name}")
        result["n_images"] = len(per_image)
        result["per_image"] = per_image
        return result

    def _log(self, message: str) -> None:
        log.info(message)
        stamp = datetime.now().isoformat(timespec="seconds")
        with (self.out / "eval.log").open("a") as f:
            f.write(f"{stamp} {message}\n")


def run_evaluation(settings: EvalSettings, backbone=None, scorer=None) -> dict[str, list[str]]:
    """Run (or resume) an evaluation; returns which units were trained / generated / scored / skipped.

    ``backbone``: an already loaded backbone to reuse (default: load ``settings.backbone`` when
    something needs training or generating). ``scorer``: a :class:`studio.styles.metrics.StyleScorer`.
    """
    return Evaluation(settings, backbone, scorer).run()


# -- reports ------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def describe_config(cfg: EvalConfig, family: str) -> str:
    """A short human description of a configuration's recipe (sampler and what else differs)."""
    recipe = Recipe(**cfg.overrides)
    sampler = recipe.noise_sampler(family)
    if sampler.name == "style_friendly":
        text = f"style-friendly, mu {sampler.mu:g}, sigma {sampler.sigma:g}"
    elif sampler.name == "sd3":
        text = f"SD3 sampler, shift {sampler.shift:g}"
    else:
        text = "uniform t"
    if recipe.offset_noise:
        text += f", offset noise {recipe.offset_noise:g}"
    rest = {k: v for k, v in cfg.overrides.items() if k not in ("sampler", "mu", "sigma", "shift", "offset_noise")}
    return text + "".join(f", {k} {v}" for k, v in rest.items())


def collect_results(ev: Evaluation) -> list[dict]:
    """The finished units' results for the current styles x configurations."""
    rows = []
    for style in ev.styles:
        for cfg in ev.settings.configs:
            result = _read_json(ev.unit_dir(style, cfg) / "result.json")
            if result is not None and result.get("items") == [list(i) for i in ev.settings.items()]:
                rows.append(result)
    return rows


def write_reports(ev: Evaluation, grids_for: list[Style] | None = None) -> None:
    """results.json, results.csv, table.md and the grids (of ``grids_for``, default all styles)."""
    rows = collect_results(ev)
    s = ev.settings
    family = ev.family
    by_unit = {(r["style"], r["config"]): r for r in rows}
    complete = [st for st in ev.styles if all((st.name, c.name) in by_unit for c in s.configs)]
    means = {c.name: {key: _mean([by_unit[(st.name, c.name)].get(key) for st in complete])
                      for key in ("dino", "clip_i", "clip_t", "clip_t_full")} for c in s.configs}
    summary = {
        "backbone": ev.backbone_id, "styles": [st.name for st in ev.styles],
        "configs": {c.name: {"overrides": c.overrides, "description": describe_config(c, family),
                             "recipe": s.recipe(c).to_dict()} for c in s.configs},
        "prompts": list(PAPER_PROMPTS[: s.prompts]), "seeds": list(range(s.seeds)),
        "gen_steps": s.gen_steps, "guidance": s.guidance, "resolution": s.resolution,
        "clip_t": "content prompt without 'in {style} style' (clip_t_full: the full prompt)",
        "mean_over_complete_styles": means, "complete_styles": [st.name for st in complete],
        "units": rows,
    }
    ev.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(ev.out / "results.json", json.dumps(summary, indent=2).encode())

    buf = io.StringIO()
    columns = ["style", "config", "style_prompt", "dino", "clip_i", "clip_t", "clip_t_full", "n_images",
               "train_seconds", "generate_seconds", "final_loss", "scores_missing"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    _atomic_write(ev.out / "results.csv", buf.getvalue().encode())

    _atomic_write(ev.out / "table.md", render_table(ev, by_unit, complete, means, family).encode())
    grids = ev.out / "grids"
    grids.mkdir(exist_ok=True)
    for style in ev.styles if grids_for is None else grids_for:
        if any((style.name, c.name) in by_unit for c in s.configs):
            grid = render_grid(ev, style, by_unit)
            out = io.BytesIO()
            grid.save(out, format="PNG")
            _atomic_write(grids / f"{style.name}.png", out.getvalue())


def render_table(ev: Evaluation, by_unit: dict, complete: list[Style], means: dict, family: str) -> str:
    s = ev.settings
    configs = s.configs
    n_images = s.prompts * s.seeds
    gen_steps = s.gen_steps or "default (28)"
    lines = [
        f"# Style evaluation: {ev.backbone_id}",
        "",
        f"{len(ev.styles)} styles x {s.prompts} prompts x {s.seeds} seeds = {n_images} images per style and "
        f"configuration; training steps {s.steps or 'recipe (300)'}; {gen_steps} denoising steps, guidance "
        f"{s.guidance if s.guidance is not None else 'default (7.0)'}; resolution {s.resolution or 'default'}.",
        "",
        "Cosine similarities, higher is better. **DINO** (ViT-S/16) and **CLIP-I** (ViT-B/32): generated image "
        "vs the style's reference image(s), i.e. style fidelity. **CLIP-T**: generated image vs the *content* "
        "prompt without \"in {style} style\" (e.g. \"A baby penguin\"), i.e. prompt fidelity; "
        "results.csv also has `clip_t_full` against the full prompt.",
        "",
    ]
    if ev.backbone_id == "tiny":
        lines += ["> `tiny` is a random-weight demo model: these numbers check the pipeline, not the method.", ""]
    missing = sorted({r["scores_missing"] for r in by_unit.values() if r.get("scores_missing")})
    if missing:
        lines += [f"> **Scores are missing** for some units: {'; '.join(missing)}. Images and grids were written; "
                  "run the same command again once the metric models are available (or pass --dino-model / "
                  "--clip-model) to score them without retraining.", ""]
    done = len(by_unit)
    total = len(ev.styles) * len(configs)
    if done < total:
        lines += [f"Progress: {done} of {total} units finished; means are over the {len(complete)} styles "
                  "finished in every configuration.", ""]
    lines += [f"## Mean over {len(complete)} styles", "",
              "| configuration | recipe | " + " | ".join(label for _, label in METRICS) + " |",
              "|---|---|" + "---:|" * len(METRICS)]
    for c in configs:
        lines.append(f"| {c.name} | {describe_config(c, family)} | "
                     + " | ".join(_fmt(means[c.name][key]) for key, _ in METRICS) + " |")
    if ev.backbone_id in PAPER_RESULTS:
        model, rows = PAPER_RESULTS[ev.backbone_id]
        for name, values in rows:
            lines.append(f"| *paper, {model}* | *{name}* | "
                         + " | ".join(f"*{v:.3f}*" for v in values) + " |")
        lines += ["", "Paper rows: 18 StyleDrop styles x 23 prompts x 2 images; the paper's CLIP-T text is "
                  "unspecified."]
    for key, label in METRICS:
        lines += ["", f"## {label} per style", "",
                  "| style | style prompt | " + " | ".join(c.name for c in configs) + " |",
                  "|---|---|" + "---:|" * len(configs)]
        for style in ev.styles:
            cells = [_fmt((by_unit.get((style.name, c.name)) or {}).get(key)) for c in configs]
            lines.append(f"| {style.name} | {style.style_prompt} | " + " | ".join(cells) + " |")
    lines += ["", "Grids: `grids/<style>.png`, one row per configuration; the reference on the left, then "
              "each prompt x seed in order.", ""]
    return "\n".join(lines)


def render_grid(ev: Evaluation, style: Style, by_unit: dict, cell: int = 192) -> Image.Image:
    """Rows: configurations; columns: the reference, then every prompt x seed (grey where missing)."""
    items = ev.settings.items()
    label_w, header_h = 150, 30
    font = ImageFont.load_default(size=11)
    cols, rows = 1 + len(items), len(ev.settings.configs)
    grid = Image.new("RGB", (label_w + cols * cell, header_h + rows * cell), "white")
    draw = ImageDraw.Draw(grid)

    def paste(img: Image.Image, col: int, row: int) -> None:
        img, side = img.convert("RGB"), cell - 4  # a thin white gap between cells
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        if max(img.size) < side:  # tiny's 64 px images: blow up without smoothing
            scale = side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.NEAREST)
        x = label_w + col * cell + (cell - img.width) // 2
        y = header_h + row * cell + (cell - img.height) // 2
        grid.paste(img, (x, y))

    def header(text: str, col: int) -> None:
        limit = max(4, cell // 6)
        draw.text((label_w + col * cell + 4, 2), text[:limit], fill="black", font=font)

    header("reference", 0)
    draw.text((label_w + 4, 15), style.style_prompt[: cell // 6], fill="gray", font=font)
    for k, (p, s) in enumerate(items, start=1):
        header(PAPER_PROMPTS[p], k)
        draw.text((label_w + k * cell + 4, 15), f"seed {s}", fill="gray", font=font)
    reference = ev.references(style)[0]
    for row, cfg in enumerate(ev.settings.configs):
        result = by_unit.get((style.name, cfg.name))
        y = header_h + row * cell
        draw.text((4, y + 4), cfg.name, fill="black", font=font)
        for line, (key, label) in enumerate(METRICS):
            value = (result or {}).get(key)
            draw.text((4, y + 20 + 14 * line), f"{label.split()[0]} {_fmt(value)}", fill="gray", font=font)
        paste(reference, 0, row)
        for k, (p, s) in enumerate(items, start=1):
            path = ev.unit_dir(style, cfg) / _image_name(p, s)
            if path.is_file():
                paste(Image.open(path), k, row)
            else:
                draw.rectangle([label_w + k * cell + 1, y + 1, label_w + (k + 1) * cell - 2, y + cell - 2],
                               fill=(220, 220, 220))
    return grid


# -- command line -------------------------------------------------------------------------------


def _default_styles() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "eval" / "styles"


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<15} {json.dumps(o)}" for name, o in CONFIG_PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m studio.styles.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The paper's evaluation: train a template per style and configuration, generate the "
                    "23 prompts x seeds, score DINO / CLIP-I / CLIP-T, write table.md, results.csv/json, grids.",
        epilog=f"configuration presets (Recipe fields):\n{presets}\n\nThe styles folder format and the "
               "output layout are described in `python -c 'import studio.styles.evaluate as e; help(e)'`.",
    )
    parser.add_argument("--backbone", default="tiny", help="tiny | flux-dev | sd3.5-large | sd3.5-medium | folder")
    parser.add_argument("--styles", type=Path, default=None,
                        help="styles folder (default: the two-style example assets/eval/styles)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder; rerun with the same one to resume (default: <runs>/eval/<backbone>)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated configuration names (default: sd3,style_friendly)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="define (and add) a configuration from Recipe fields, e.g. lowlr:lr=5e-5,sigma=2")
    parser.add_argument("--prompts", type=int, default=len(PAPER_PROMPTS), help="use the first N of the 23 prompts")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (0..K-1; default 2)")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's 300; small for smoke runs)")
    parser.add_argument("--resolution", type=int, help="training and generation pixel budget side")
    parser.add_argument("--gen-steps", type=int, help="denoising steps (default 28)")
    parser.add_argument("--guidance", type=float, help="guidance (default 7.0)")
    parser.add_argument("--dino-model",
                        help="DINO folder or hub id (default $STUDIO_DINO_MODEL or facebook/dino-vits16)")
    parser.add_argument("--clip-model",
                        help="CLIP folder or hub id (default $STUDIO_CLIP_MODEL or openai/clip-vit-base-patch32)")
    parser.add_argument("--no-score", action="store_true", help="train and generate only")
    return parser


def settings_from_args(argv: list[str] | None = None) -> EvalSettings:
    args = build_parser().parse_args(argv)
    out = args.out or studio_config.runs_dir() / "eval" / slugify(args.backbone)
    return EvalSettings(
        styles_dir=args.styles or _default_styles(), out_dir=out, backbone=args.backbone,
        configs=resolve_configs(args.configs, args.config), prompts=args.prompts, seeds=args.seeds,
        steps=args.steps, resolution=args.resolution, gen_steps=args.gen_steps, guidance=args.guidance,
        dino_model=args.dino_model, clip_model=args.clip_model, score=not args.no_score,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
        summary = run_evaluation(settings)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(settings.out_dir / "table.md")
    print(", ".join(f"{k}: {len(v)}" for k, v in summary.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
