"""The paper's evaluation protocol (seed 000, §4, Table 2): ``python -m studio.styles.evaluate``.

For every reference style and every configuration (a training recipe such as the SD3 sampler
baseline or the style-friendly sampler) it trains one template on one warm backbone, generates the
paper's 23 prompts x 2 seeds as ``"{prompt} in {style prompt} style"``, and scores the images with
DINO / CLIP-I (against the style's reference images) and CLIP-T (against the content prompt, see
:mod:`studio.styles.metrics`). Beside them, always (they need no model weights), the weight-free
distances of :mod:`studio.styles.weightfree`: colour and texture against the references, content
against the base model's image for the same prompt and seed. ``--train-seeds K`` trains every
(style, configuration) K times with recipe seeds seed..seed+K-1; the table then gives means ± standard
errors and paired differences (:mod:`studio.styles.eval_stats`). Then it writes a table, CSV/JSON
results and one image grid per style.

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
    grids/<style>.png        rows: the base model, then configurations (x training seeds); columns: the
                             reference, then each prompt x seed; grids/overview.png: every style at a glance
    units/<style>/<config>/  spec.json, run/ (training; run/result is the template), images/, result.json
    units/<style>/<config>@train<k>/   the same for training seed k > 0 (``--train-seeds``)
    base/<style>/            the base model's images (no template) for the content distance, result.json
    eval.log                 what each invocation did

``--report-only`` rewrites table.md, the results and the grids from the finished units without
loading any model (also beside a run that is still going).

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
import hashlib
import json
import logging
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from studio import config as studio_config
from studio.engine.recipe import Recipe
from studio.engine.training import Observer, StepReport, style_caption, write_json
from studio.errors import StudioError
from studio.media.images import load_reference_images, slugify
from studio.styles.eval_config import (
    CONFIG_PRESETS,
    DEFAULT_CONFIGS,
    METRICS,
    PAPER_PROMPTS,
    EvalConfig,
    EvalSettings,
    _image_name,
    _read_json,
    resolve_configs,
    unit_name,
)
from studio.styles.eval_report import write_reports
from studio.styles.style_sets import Style, load_styles
from studio.styles.weightfree import METRIC_VERSION, WEIGHTFREE_METRICS, WeightFreeScorer

log = logging.getLogger(__name__)


# -- one unit: (style, configuration) -------------------------------------------------------------


def _train_changed(old: dict, new: dict) -> bool:
    """Whether a unit must be retrained. Recipe fields added to the code since the unit was trained
    count as unchanged while they hold their default, so upgrading the studio mid-run retrains nothing."""
    defaults = Recipe().to_dict()
    recipe = {**{k: defaults.get(k) for k in new["recipe"]}, **(old.get("recipe") or {})}
    return {**old, "recipe": {k: v for k, v in recipe.items() if k in new["recipe"]}} != new


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]



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

    def unit_dir(self, style: Style, cfg: EvalConfig, train_seed: int = 0) -> Path:
        return self.out / "units" / style.name / unit_name(cfg.name, train_seed)

    def spec(self, style: Style, cfg: EvalConfig, train_seed: int = 0) -> dict:
        """What a unit's results depend on: training and generation settings, kept apart."""
        s = self.settings
        return {
            "train": {
                "backbone": self.backbone_id,
                "recipe": s.recipe(cfg, train_seed).to_dict(),
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
        units = [(st, c, k) for st in self.styles for c in self.settings.configs
                 for k in range(self.settings.train_seeds)]
        with tqdm(units, desc="evaluation", unit="unit", file=sys.stderr, dynamic_ncols=True) as bar:
            for style, cfg, k in bar:
                label = f"{style.name}/{unit_name(cfg.name, k)}"
                bar.set_postfix_str(label, refresh=True)
                result = self.run_unit(style, cfg, scorer, bar, k)
                scores = " ".join(f"{name} {result[key]:.3f}" for key, name in (*METRICS, *WEIGHTFREE_METRICS)
                                  if result.get(key) is not None)
                bar.write(f"{label}: {scores or 'not scored'}", file=sys.stderr)
                write_reports(self, grids_for=[style])  # partial results are readable during long runs
        write_reports(self)
        self._log("done: " + ", ".join(f"{k} {len(v)}" for k, v in self.summary.items()))
        return self.summary

    def run_unit(self, style: Style, cfg: EvalConfig, scorer, bar: tqdm, train_seed: int = 0) -> dict:
        """Bring one unit (a style, a configuration, a training seed) up to date; its result.json content."""
        unit = self.unit_dir(style, cfg, train_seed)
        label = f"{style.name}/{unit.name}"
        spec = self.spec(style, cfg, train_seed)
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
            weightfree = result.get("weightfree_version") == METRIC_VERSION
            if weightfree and (scorer is None or (scored and same_models)):
                self.summary["skipped"].append(label)
                return result

        missing = [(p, s) for p, s in self.settings.items() if not (unit / _image_name(p, s)).is_file()]
        gen_seconds = 0.0
        if missing:  # the template is only needed for images still to make (LoRAs may be deleted)
            template = self._train(style, cfg, unit, bar, label, train_seed)
            gen_seconds = self._generate(unit, template, missing, bar, label)
        bar.set_postfix_str(f"{label}: scoring", refresh=True)
        result = self._score(style, cfg, unit, scorer, result, gen_seconds, train_seed, bar)
        write_json(unit / "result.json", result)  # last: its presence means "unit finished"
        return result

    def _train(self, style: Style, cfg: EvalConfig, unit: Path, bar: tqdm, label: str, train_seed: int) -> Path:
        from studio.engine.training import TrainRequest, prepare_run, train

        run_dir = unit / "run"
        template = run_dir / "result"
        if (template / "template.json").is_file():
            return template
        backbone = self.backbone
        request = TrainRequest(self.references(style), style.style_prompt, f"eval {label}",
                               self.settings.recipe(cfg, train_seed), style.captions)
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

    def base_dir(self, style: Style) -> Path:
        return self.out / "base" / style.name

    def base_images(self, style: Style, bar: tqdm | None = None) -> dict[tuple[int, int], Image.Image]:
        """The base model's images (no template) for the style's prompts and seeds, made once per style:
        the content measure compares each template's image with the one made from the same prompt
        ("{prompt} in {style} style") and seed without it. Also scores them (``base/<style>/result.json``)."""
        folder = self.base_dir(style)
        s = self.settings
        spec = {"backbone": self.backbone_id, "style_prompt": style.style_prompt,
                "generate": self.spec(style, s.configs[0])["generate"]}
        if _read_json(folder / "spec.json") != spec:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "spec.json", spec)
        missing = [(p, sd) for p, sd in s.items() if not (folder / _image_name(p, sd)).is_file()]
        if missing:
            from studio.engine.generation import GenerateOptions, generate

            for k, (p, sd) in enumerate(missing):
                if bar is not None:
                    bar.set_postfix_str(f"{style.name}: base model image {k + 1}/{len(missing)}", refresh=True)
                options = GenerateOptions(prompt=style_caption(PAPER_PROMPTS[p], style.style_prompt), seed=sd,
                                          steps=s.gen_steps, guidance=s.guidance, resolution=s.resolution)
                generate(self.backbone, options, folder / "images", None, stem=f"p{p:02d}")
        images = {(p, sd): Image.open(folder / _image_name(p, sd)).convert("RGB") for p, sd in s.items()}
        result = _read_json(folder / "result.json")
        items = [list(i) for i in s.items()]
        if result is None or result.get("items") != items or result.get("weightfree_version") != METRIC_VERSION:
            scores = WeightFreeScorer().score(list(images.values()), self.references(style))
            result = {"style": style.name, "items": items, "weightfree_version": METRIC_VERSION,
                      **{key: scores[key] for key, _ in WEIGHTFREE_METRICS}, "content": 0.0,
                      "per_image": {key: scores["per_image"][key] for key in ("colour", "texture")}}
            write_json(folder / "result.json", result)
        return images

    def _metric_models(self, scorer) -> list[str] | None:
        return [scorer.dino_source, scorer.clip_source] if scorer is not None else None

    def _score(self, style: Style, cfg: EvalConfig, unit: Path, scorer, old: dict | None,
               gen_seconds: float, train_seed: int, bar: tqdm) -> dict:
        items = self.settings.items()
        content = [PAPER_PROMPTS[p] for p, _ in items]
        per_image = [{"prompt_index": p, "seed": s, "prompt": PAPER_PROMPTS[p], "file": _image_name(p, s)}
                     for p, s in items]
        timing = _read_json(unit / "run" / "timing.json") or {}
        result: dict[str, Any] = {
            "style": style.name, "config": cfg.name, "train_seed": train_seed, "style_prompt": style.style_prompt,
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
        images = [Image.open(unit / item["file"]).convert("RGB") for item in per_image]
        if scorer is None:
            result["scores_missing"] = self.scorer_reason
        else:
            full = [style_caption(p, style.style_prompt) for p in content]
            scores = scorer.score(images, self.references(style), content, full)
            for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
                result[key] = scores[key]
                for item, value in zip(per_image, scores["per_image"][key], strict=True):
                    item[key] = value
            self.summary["scored"].append(f"{style.name}/{unit.name}")
        # the weight-free distances need no model: always computed, beside DINO / CLIP when those exist
        base = self.base_images(style, bar)
        weightfree = WeightFreeScorer().score(images, self.references(style), [base[i] for i in items])
        result["weightfree_version"] = METRIC_VERSION
        for key, _ in WEIGHTFREE_METRICS:
            result[key] = weightfree[key]
            for item, value in zip(per_image, weightfree["per_image"][key], strict=True):
                item[key] = value
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
    parser.add_argument("--train-seeds", type=int, default=1,
                        help="trainings per style and configuration, with recipe seeds seed..seed+K-1 (default 1)")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's 300; small for smoke runs)")
    parser.add_argument("--resolution", type=int, help="training and generation pixel budget side")
    parser.add_argument("--gen-steps", type=int, help="denoising steps (default 28)")
    parser.add_argument("--guidance", type=float, help="guidance (default 7.0)")
    parser.add_argument("--dino-model",
                        help="DINO folder or hub id (default $STUDIO_DINO_MODEL or facebook/dino-vits16)")
    parser.add_argument("--clip-model",
                        help="CLIP folder or hub id (default $STUDIO_CLIP_MODEL or openai/clip-vit-base-patch32)")
    parser.add_argument("--no-score", action="store_true", help="train and generate only (DINO / CLIP)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite table.md, results and grids from the units finished so far (no model "
                             "is loaded; safe beside a running evaluation of the same folder)")
    return parser


def settings_from_args(argv: list[str] | None = None) -> EvalSettings:
    args = build_parser().parse_args(argv)
    out = args.out or studio_config.runs_dir() / "eval" / slugify(args.backbone)
    return EvalSettings(
        styles_dir=args.styles or _default_styles(), out_dir=out, backbone=args.backbone,
        configs=resolve_configs(args.configs, args.config), prompts=args.prompts, seeds=args.seeds,
        train_seeds=args.train_seeds,
        steps=args.steps, resolution=args.resolution, gen_steps=args.gen_steps, guidance=args.guidance,
        dino_model=args.dino_model, clip_model=args.clip_model, score=not args.no_score,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
        if build_parser().parse_args(argv).report_only:
            write_reports(Evaluation(settings))
            print(settings.out_dir / "table.md")
            return 0
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
