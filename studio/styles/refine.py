"""Refine a template: StyleDrop's second round of training with feedback (seed 001).

A first-round template can leak content from its few references (every picture gets the
reference's house, or its layout). StyleDrop's fix: generate candidates of *other* subjects with
the template, keep the ones that show the style *and* the asked-for subject, and train again on
the references plus those picks. Two ways to pick:

* **human feedback**: the user ticks favourites among the candidates;
* **automatic feedback**: CLIP scores every candidate, style (image similarity to the references,
  CLIP-I or DINO) times text (CLIP-T against the candidate's content prompt), and the top ``k`` win.

The result is a new template (round ``parent round + 1``) whose ``template.json`` records its
``parent``, its ``round`` and, under ``refine``, the synthetic images it learned from (their content
prompts and, for automatic feedback, every candidate's scores). The parent is never changed.

Where things run: the web process only plans (:func:`plan_refinement`, no models); candidates for
human feedback are ordinary generate jobs; automatic feedback is one training job whose worker first
runs :func:`prepare_automatic` (generate, score, pick, write the run folder), then trains as usual.
The CLI runs the same functions in its own process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image

from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, prepare_run, write_json
from studio.errors import InputError, NotFoundError, StudioError
from studio.media.images import MAX_NAME_CHARS, MAX_REFERENCE_IMAGES, load_image, load_reference_images, validate_name
from studio.store.templates import TemplateInfo, TemplateStore

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 8
DEFAULT_TOP_K = 3
MAX_CANDIDATES = 16
STYLE_METRICS = ("clip_i", "dino")  # what "style" means when CLIP picks: CLIP-I (StyleDrop's choice) or DINO
PLAN_FILE = "refine.json"  # an automatic refinement's plan, in its job / run folder until the picks are made
CANDIDATES_DIR = "candidates"
# Recipe fields a refinement may change; the rest (sampler, rank, resolution...) stay the parent's.
RECIPE_OVERRIDES = ("steps", "grad_accum", "lr", "seed", "preview_every", "preview_steps", "preview_prompt",
                    "checkpoint_every", "precision", "tier", "gradient_checkpointing")
# The paper's content prompts (appendix C.2) taken 7 apart: 7 and 23 are coprime, so every prompt
# comes once before any repeats, and neighbours differ in kind (a building, a robot, a bench...).
_PROMPT_STRIDE = 7


def candidate_prompts(n: int = DEFAULT_CANDIDATES, offset: int = 0) -> list[str]:
    """``n`` diverse content prompts for candidates (the paper's 23, in a spread-out order).

    ``offset`` starts further along the same order ("make other candidates"). Subjects that differ
    from the references are the point: they show whether the template learned the style or the content.
    """
    from studio.styles.eval_config import PAPER_PROMPTS

    if not 1 <= n <= MAX_CANDIDATES:
        raise InputError(f"the number of candidates must be between 1 and {MAX_CANDIDATES}")
    total = len(PAPER_PROMPTS)
    return [PAPER_PROMPTS[((offset + i) * _PROMPT_STRIDE) % total] for i in range(n)]


def candidate_options(prompt: str, seed: int, steps: int | None = None, lora_scale: float = 1.0) -> dict:
    """The GenerateOptions fields of one candidate (one image; the prompt is wrapped in the style)."""
    return {"prompt": prompt, "seed": int(seed), "steps": steps, "lora_scale": float(lora_scale), "num_images": 1}


# -- scores and the automatic pick ------------------------------------------------------------------


def feedback_score(style: float, text: float) -> float:
    """StyleDrop's automatic feedback: style score times text score.

    Both are cosine similarities, clipped at 0 first: a product of two negative similarities would
    otherwise rank an image that fails on both counts above one that is merely neutral.
    """
    return max(0.0, float(style)) * max(0.0, float(text))


def pick_top_k(scores: Sequence[float], k: int, tiebreak: Sequence[float] | None = None) -> list[int]:
    """Indices of the ``k`` best scores, best first. Equal scores (e.g. several clipped to 0) are
    ordered by ``tiebreak`` (higher first), then by position."""
    if k < 1:
        raise InputError("keep at least one candidate (top k >= 1)")
    second = tiebreak if tiebreak is not None else [0.0] * len(scores)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), -float(second[i]), i))
    return order[:k]


@dataclass
class Candidate:
    """One generated candidate: its file, its content prompt (the caption in round 2) and its seed."""

    file: Path
    prompt: str
    seed: int
    scores: dict[str, float] = field(default_factory=dict)  # style, text, score (automatic feedback)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.file.name, "prompt": self.prompt, "seed": self.seed, **self.scores}


def score_candidates(candidates: list[Candidate], references: list[Image.Image], scorer,
                     style_metric: str = "clip_i") -> list[Candidate]:
    """Fill each candidate's ``scores``: ``style`` (``style_metric`` against the references),
    ``text`` (CLIP-T against its content prompt) and ``score`` = :func:`feedback_score`."""
    if style_metric not in STYLE_METRICS:
        raise InputError(f"style metric must be one of {', '.join(STYLE_METRICS)}")
    if not references:
        raise InputError("this template has no reference images to compare candidates with; "
                         "pick your favourites by hand instead")
    images = [Image.open(c.file).convert("RGB") for c in candidates]
    result = scorer.score(images, references, [c.prompt for c in candidates])
    per_image = result["per_image"]
    for i, c in enumerate(candidates):
        style, text = float(per_image[style_metric][i]), float(per_image["clip_t"][i])
        c.scores = {"style": round(style, 6), "text": round(text, 6), "score": round(feedback_score(style, text), 6)}
    return candidates


def pick_automatic(candidates: list[Candidate], references: list[Image.Image], scorer, k: int = DEFAULT_TOP_K,
                   style_metric: str = "clip_i") -> list[Candidate]:
    """Score the candidates and return the ``k`` best by style x text (ties: the better style), best first."""
    score_candidates(candidates, references, scorer, style_metric)
    best = pick_top_k([c.scores["score"] for c in candidates], k, [c.scores["style"] for c in candidates])
    return [candidates[i] for i in best]


# -- candidates ------------------------------------------------------------------------------------


def generate_candidates(backbone, template: tuple[Path, dict], prompts: Sequence[str], out_dir: Path,
                        seed: int = 0, steps: int | None = None, lora_scale: float = 1.0,
                        check: Callable[[], None] | None = None,
                        on_image: Callable[[int, int], None] | None = None) -> list[Candidate]:
    """Generate one candidate per prompt with the template (seeds ``seed, seed+1, ...``) into ``out_dir``.

    A candidate already on disk is kept (an interrupted job resumes; generation is deterministic).
    ``check`` runs before each image (it raises to stop); ``on_image(done, total)`` after each.
    """
    from studio.engine.generation import GenerateOptions, generate

    out_dir.mkdir(parents=True, exist_ok=True)
    found = []
    for i, prompt in enumerate(prompts):
        if check is not None:
            check()
        stem, s = f"cand_{i:02d}", seed + i
        path = out_dir / f"{stem}_{s}.png"
        if not path.is_file():
            options = GenerateOptions(**candidate_options(prompt, s, steps, lora_scale))
            path, = generate(backbone, options, out_dir, template, stem=stem)
        found.append(Candidate(path, prompt, s))
        if on_image is not None:
            on_image(i + 1, len(prompts))
    return found


def read_candidate_prompt(path: str | Path) -> str | None:
    """The content prompt a studio PNG was generated from (its "studio" text chunk), or None."""
    try:
        with Image.open(path) as img:
            params = json.loads(img.text.get("studio", "{}"))  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return None
    prompt = params.get("prompt") if isinstance(params, dict) else None
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else None


# -- planning a refinement (no models: the web process and the CLI) --------------------------------


def template_round(meta: dict) -> int:
    """Which training round a template is (1 unless it was refined)."""
    value = meta.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def refined_name(parent: TemplateInfo, taken: set[str] | None = None) -> str:
    """``"<parent name> · round 2"``, unique among ``taken`` (names, any case)."""
    taken = {t.casefold() for t in taken or ()}
    # Refining a refined template: "X · round 3", not "X · round 2 · round 3".
    base = parent.name.rsplit(" · round ", 1)[0] if template_round(parent.meta) > 1 else parent.name
    tail = f" · round {template_round(parent.meta) + 1}"
    name = base[: MAX_NAME_CHARS - len(tail) - 4].rstrip() + tail
    n = 2
    candidate = name
    while candidate.casefold() in taken:
        candidate, n = f"{name} ({n})", n + 1
    return candidate


def parent_recipe(parent: TemplateInfo, overrides: dict | None = None) -> Recipe:
    """The parent's recipe (same sampler, rank, resolution...) with ``overrides`` of :data:`RECIPE_OVERRIDES`."""
    data = dict(overrides or {})
    unknown = sorted(set(data) - set(RECIPE_OVERRIDES))
    if unknown:
        raise InputError(f"a refinement keeps the parent's recipe; it cannot change {', '.join(unknown)} "
                         f"(it can change {', '.join(RECIPE_OVERRIDES)})")
    known = {f.name for f in fields(Recipe)}
    base = Recipe.from_dict(parent.meta.get("recipe") if isinstance(parent.meta.get("recipe"), dict) else {})
    try:
        recipe = replace(base, **{k: v for k, v in data.items() if k in known and v is not None})
        return recipe.validate()
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid recipe: {exc}") from None


def _parent_captions(parent: TemplateInfo) -> list[str | None]:
    """The captions of the parent's own references (its synthetic images' captions are not needed)."""
    captions = parent.meta.get("captions")
    refs = parent.references
    if not isinstance(captions, list):
        return [None] * len(refs)
    out = [c if isinstance(c, str) and c.strip() else None for c in captions[: len(refs)]]
    return out + [None] * (len(refs) - len(out))


def lineage(parent: TemplateInfo, mode: str, synthetic: list[dict], **details: Any) -> dict:
    """What a refined template records about where it came from (see the module docstring).

    ``synthetic``: one dict per chosen image, in the order they follow the references (prompt,
    source file name, seed and scores when known). :func:`studio.engine.training.prepare_run` adds each
    one's ``file`` in the new template.
    """
    return {"parent": parent.id, "parent_name": parent.name, "round": template_round(parent.meta) + 1,
            "mode": mode, "synthetic": synthetic, **details}


def refine_request(parent: TemplateInfo, chosen: list[Image.Image], captions: list[str | None], name: str,
                   recipe: Recipe, mode: str, synthetic: list[dict] | None = None, **details: Any) -> TrainRequest:
    """The round-2 training request: the parent's references (and captions) plus the chosen synthetic
    images captioned with their content prompts, the parent's style prompt and recipe, and its lineage."""
    if not chosen:
        raise InputError("choose at least one candidate to train round 2 with")
    if len(captions) != len(chosen):
        raise InputError(f"give one caption per chosen image ({len(chosen)})")
    references = load_reference_images(parent.references) if parent.references else []
    if len(references) + len(chosen) > MAX_REFERENCE_IMAGES:
        raise InputError(f"too many images: {len(references)} reference(s) + {len(chosen)} chosen; round 2 "
                         f"trains on at most {MAX_REFERENCE_IMAGES} (choose fewer)")
    if not parent.style_prompt.strip():
        raise InputError(f"template {parent.name!r} has no style prompt, so it cannot be refined")
    synthetic = synthetic or [{"prompt": c} for c in captions]
    return TrainRequest(references + list(chosen), parent.style_prompt, name, recipe,
                        _parent_captions(parent) + list(captions),
                        lineage=lineage(parent, mode, synthetic, **details))


@dataclass
class Refinement:
    """A checked refinement, ready to become a job or a CLI run.

    Human feedback: ``request`` is the finished training request. Automatic feedback: ``plan``
    is what :func:`prepare_automatic` needs (``request`` is None until the worker picked).
    """

    parent: TemplateInfo
    name: str
    recipe: Recipe
    mode: str  # "human" | "auto"
    request: TrainRequest | None = None
    plan: dict | None = None

    def summary(self) -> dict:
        """For the job record: what the refinement is, without the images."""
        out = {"parent": self.parent.id, "parent_name": self.parent.name, "mode": self.mode,
               "round": template_round(self.parent.meta) + 1}
        if self.plan:
            out.update({k: self.plan[k] for k in ("candidates", "top_k", "style_metric")})
        if self.request is not None and self.request.lineage:
            out["chosen"] = len(self.request.lineage["synthetic"])
        return out


def plan_refinement(store: TemplateStore, template_id: str, *, images: Sequence[str | Path] | None = None,
                    captions: Sequence[str | None] | None = None, auto: dict | None = None,
                    name: str | None = None, recipe: dict | None = None, scorer=None) -> Refinement:
    """Check a refinement of template ``template_id`` and prepare it, loading no model.

    Human feedback: ``images`` are the chosen candidates (studio PNGs carry their content prompt;
    ``captions`` override it, one per image). Automatic feedback: ``auto`` holds ``candidates``
    (N, default 8), ``top_k`` (default 3), ``seed``, ``steps`` (denoising steps per candidate),
    ``lora_scale``, ``prompts`` (default :func:`candidate_prompts`) and ``style_metric``
    (clip_i | dino); the metric models must be available here (``scorer``: default the
    configured ones), else an InputError says why. ``recipe``: changes to the parent's recipe
    (:data:`RECIPE_OVERRIDES`). ``name``: default "<parent> · round 2".
    """
    try:
        parent = store.get((template_id or "").strip())
    except NotFoundError as exc:
        raise InputError(f"cannot refine: {exc}") from None
    recipe_obj = parent_recipe(parent, recipe)
    name = validate_name((name or "").strip() or refined_name(parent, {t.name for t in store.list()}))
    if auto is None:
        paths = [Path(p) for p in images or []]
        if not paths:
            raise InputError("choose at least one candidate to train round 2 with (or let CLIP choose)")
        chosen = [load_image(p) for p in paths]
        given = list(captions or [])
        if given and len(given) != len(paths):
            raise InputError(f"give one caption per chosen image ({len(paths)}), or none")
        caps = [(given[i] if given and isinstance(given[i], str) and given[i].strip() else None)
                or read_candidate_prompt(p) for i, p in enumerate(paths)]
        synthetic = [{"prompt": c, "source": p.name} for c, p in zip(caps, paths, strict=True)]
        request = refine_request(parent, chosen, caps, name, recipe_obj, "human", synthetic)
        return Refinement(parent, name, recipe_obj, "human", request=request)
    plan = auto_plan(parent, name, recipe_obj, auto, scorer)
    return Refinement(parent, name, recipe_obj, "auto", plan=plan)


def auto_plan(parent: TemplateInfo, name: str, recipe: Recipe, options: dict, scorer=None) -> dict:
    """Validate automatic-feedback options and return the plan :func:`prepare_automatic` runs."""
    from studio.engine.generation import GenerateOptions

    opts = dict(options or {})
    known = {"candidates", "top_k", "seed", "steps", "lora_scale", "prompts", "style_metric"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise InputError(f"unknown automatic-feedback option(s): {', '.join(unknown)}")
    prompts = opts.get("prompts")
    n = int(opts.get("candidates") or (len(prompts) if prompts else DEFAULT_CANDIDATES))
    if prompts:
        prompts = [str(p).strip() for p in prompts if str(p).strip()]
        if len(prompts) != n or not 1 <= n <= MAX_CANDIDATES:
            raise InputError(f"give 1 to {MAX_CANDIDATES} candidate prompts (and as many as candidates)")
    else:
        prompts = candidate_prompts(n)
    top_k = int(opts.get("top_k") or DEFAULT_TOP_K)
    if not 1 <= top_k <= n:
        raise InputError(f"CLIP can keep 1 to {n} of {n} candidates (top k = {top_k})")
    style_metric = str(opts.get("style_metric") or "clip_i").lower()
    if style_metric not in STYLE_METRICS:
        raise InputError(f"style metric must be one of {', '.join(STYLE_METRICS)}")
    seed, steps = int(opts.get("seed") or 0), opts.get("steps")
    lora_scale = float(opts.get("lora_scale", 1.0))
    for p in prompts:  # the same checks a generation makes, before the job is queued
        GenerateOptions(**candidate_options(p, seed, int(steps) if steps else None, lora_scale)).validate()
    if not parent.references:
        raise InputError(f"template {parent.name!r} has no reference images, so CLIP cannot judge the style of "
                         "candidates; pick your favourites by hand instead")
    if len(parent.references) + top_k > MAX_REFERENCE_IMAGES:
        raise InputError(f"round 2 trains on at most {MAX_REFERENCE_IMAGES} images: lower top k")
    check_scorer(scorer)
    return {"parent": parent.id, "name": name, "recipe": recipe.to_dict(), "candidates": n, "top_k": top_k,
            "prompts": prompts, "seed": seed, "steps": int(steps) if steps else None, "lora_scale": lora_scale,
            "style_metric": style_metric}


def check_scorer(scorer=None) -> None:
    """InputError with the reason when the metric models (CLIP, DINO) are not available here."""
    from studio.styles.metrics import CLIP_ENV, DINO_ENV, StyleScorer

    scorer = scorer or StyleScorer(download=False)
    ok, reason = scorer.available()
    if not ok:
        how = "" if "hf download" in reason else f" (download them, or set {CLIP_ENV} / {DINO_ENV} to local copies)"
        raise InputError(f"automatic feedback needs the CLIP and DINO metric models, which are not available "
                         f"here: {reason}. Pick your favourites by hand instead{how}.")


# -- automatic feedback (the worker or the CLI: loads models) --------------------------------------


def prepare_automatic(backbone, run_dir: Path, store: TemplateStore, scorer,
                      say: Callable[[str], None] | None = None, check: Callable[[], None] | None = None) -> dict:
    """Run an automatic refinement's plan (``run_dir/refine.json``): generate the candidates into
    ``run_dir/candidates``, score them, keep the top k and write the round-2 training request into
    ``run_dir`` (:func:`studio.engine.training.prepare_run`). Returns the lineage written.

    ``say`` gets progress messages; ``check`` runs between candidates (it raises to stop).
    """
    say = say or (lambda _message: None)
    plan = json.loads((run_dir / PLAN_FILE).read_text())
    try:
        parent = store.get(plan["parent"])
    except NotFoundError:
        raise StudioError(f"the template to refine ({plan['parent']!r}) was deleted before the job ran") from None
    prompts = plan["prompts"]
    candidates = generate_candidates(
        backbone, (parent.path, parent.meta), prompts, run_dir / CANDIDATES_DIR, plan["seed"], plan["steps"],
        plan["lora_scale"], check, lambda done, total: say(f"drawing test pictures: {done} of {total}"))
    if check is not None:
        check()
    say(f"CLIP is scoring {len(candidates)} test pictures (style x prompt)")
    references = [Image.open(p).convert("RGB") for p in parent.references]
    chosen = pick_automatic(candidates, references, scorer, plan["top_k"], plan["style_metric"])
    log.info("automatic feedback picked %s", [c.file.name for c in chosen])
    request = refine_request(
        parent, [Image.open(c.file).convert("RGB") for c in chosen], [c.prompt for c in chosen], plan["name"],
        Recipe.from_dict(plan["recipe"]), "auto", [c.to_dict() for c in chosen],
        candidates=len(candidates), top_k=plan["top_k"], style_metric=plan["style_metric"],
        scores=[c.to_dict() for c in candidates])
    prepare_run(request, run_dir, backbone.backbone_id, backbone.family, backbone.default_resolution)
    say(f"CLIP kept {len(chosen)} of {len(candidates)} test pictures; training round {request.lineage['round']}")
    return request.lineage


def write_plan(run_dir: Path, plan: dict) -> None:
    """Write an automatic refinement's plan into its (new) run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / PLAN_FILE, plan)


def describe_lineage(meta: dict, folder: Path) -> dict | None:
    """A refined template's lineage for display (each synthetic image's file as ``image``), or None."""
    info = meta.get("refine")
    if not isinstance(info, dict) or not meta.get("parent"):
        return None
    synthetic = []
    for entry in info.get("synthetic") or []:
        if not isinstance(entry, dict):
            continue
        rel = entry.get("file")
        path = folder / rel if isinstance(rel, str) and ".." not in rel and not rel.startswith("/") else None
        # "image", not "path": gradio_client takes any dict with a "path" for a file to download
        synthetic.append({**entry, "image": str(path) if path is not None and path.is_file() else None})
    return {"parent": meta.get("parent"), "parent_name": info.get("parent_name") or meta.get("parent"),
            "round": template_round(meta), "mode": info.get("mode"), "candidates": info.get("candidates"),
            "synthetic": synthetic}


def fmt_score(value: Any) -> str:
    """A score for people (two decimals), or "–"."""
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
