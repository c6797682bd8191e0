"""The evaluation's reports: the finished units' results gathered into ``results.json`` /
``results.csv``, the Markdown table (means over the styles finished in every configuration, per-style
tables, the paper's numbers as reference rows) and one image grid per style, all written atomically
so partial results stay readable during a long run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from studio.engine.recipe import Recipe
from studio.styles.eval_config import METRICS, PAPER_PROMPTS, EvalConfig, _image_name, _read_json, unit_name
from studio.styles.eval_stats import Aggregate, fmt
from studio.styles.style_sets import Style
from studio.styles.weightfree import WEIGHTFREE_METRICS

if TYPE_CHECKING:
    from studio.styles.evaluate import Evaluation

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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fmt(value: float | None, key: str = "") -> str:
    return fmt(value, None, _DIGITS.get(key, 3))


_DIGITS = {"colour": 2}  # Lab units: two decimals are already below a visible difference
ALL_METRICS = (*METRICS, *WEIGHTFREE_METRICS)
_KEYS = ("dino", "clip_i", "clip_t", "clip_t_full", "colour", "texture", "content")


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
    """The finished units' results for the current styles x configurations x training seeds."""
    rows = []
    for style in ev.styles:
        for cfg in ev.settings.configs:
            for k in range(ev.settings.train_seeds):
                result = _read_json(ev.unit_dir(style, cfg, k) / "result.json")
                if result is not None and result.get("items") == [list(i) for i in ev.settings.items()]:
                    rows.append({**result, "train_seed": k})
    return rows


def _base_results(ev: Evaluation, styles: list[Style]) -> dict[str, dict]:
    """The base model's weight-free scores per style (``base/<style>/result.json``), where present."""
    items = [list(i) for i in ev.settings.items()]
    found = {}
    for style in styles:
        result = _read_json(ev.out / "base" / style.name / "result.json")
        if result is not None and result.get("items") == items:
            found[style.name] = result
    return found


def write_reports(ev: Evaluation, grids_for: list[Style] | None = None) -> None:
    """results.json, results.csv, table.md and the grids (of ``grids_for``, default all styles, and
    the overview of every style)."""
    rows = collect_results(ev)
    s = ev.settings
    family = ev.family
    agg = Aggregate(rows, [st.name for st in ev.styles], [c.name for c in s.configs], s.train_seeds)
    means = {c.name: {key: agg.config_value(c.name, key)[0] for key in _KEYS} for c in s.configs}
    ses = {c.name: {key: agg.config_value(c.name, key)[1] for key in _KEYS} for c in s.configs}
    base = _base_results(ev, ev.styles)
    summary = {
        "backbone": ev.backbone_id, "styles": [st.name for st in ev.styles],
        "configs": {c.name: {"overrides": c.overrides, "description": describe_config(c, family),
                             "recipe": s.recipe(c).to_dict()} for c in s.configs},
        "prompts": list(PAPER_PROMPTS[: s.prompts]), "seeds": list(range(s.seeds)),
        "train_seeds": s.train_seeds,
        "gen_steps": s.gen_steps, "guidance": s.guidance, "resolution": s.resolution,
        "clip_t": "content prompt without 'in {style} style' (clip_t_full: the full prompt)",
        "weightfree": "colour: Lab sliced Wasserstein to the references; texture: random-network Gram distance to "
                      "the references; content: 1 - edge SSIM to the base model's image (studio.styles.weightfree); "
                      "lower is closer",
        "mean_over_complete_styles": means, "se_over_train_seeds": ses,
        "complete_styles": agg.complete,
        "base_model": {name: {key: r.get(key) for key, _ in WEIGHTFREE_METRICS} for name, r in base.items()},
        "units": rows,
    }
    ev.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(ev.out / "results.json", json.dumps(summary, indent=2).encode())

    buf = io.StringIO()
    columns = ["style", "config", "train_seed", "style_prompt", "dino", "clip_i", "clip_t", "clip_t_full",
               "colour", "texture", "content", "n_images", "train_seconds", "generate_seconds", "final_loss",
               "scores_missing"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    _atomic_write(ev.out / "results.csv", buf.getvalue().encode())

    _atomic_write(ev.out / "table.md", render_table(ev, agg, base, family).encode())
    grids = ev.out / "grids"
    grids.mkdir(exist_ok=True)
    styles_done = [st for st in ev.styles if any(agg.unit(st.name, c.name, k) for c in s.configs
                                                 for k in range(s.train_seeds))]
    for style in styles_done if grids_for is None else [st for st in grids_for if st in styles_done]:
        _save_png(render_grid(ev, style, agg), grids / f"{style.name}.png")
    if styles_done:
        _save_png(render_overview(ev, styles_done), grids / "overview.png")


def _save_png(img: Image.Image, path: Path) -> None:
    out = io.BytesIO()
    img.save(out, format="PNG")
    _atomic_write(path, out.getvalue())


def render_table(ev: Evaluation, agg: Aggregate, base: dict[str, dict], family: str) -> str:
    s = ev.settings
    configs = s.configs
    n_images = s.prompts * s.seeds
    gen_steps = s.gen_steps or "default (28)"
    seeds = s.train_seeds
    lines = [
        f"# Style evaluation: {ev.backbone_id}",
        "",
        f"{len(ev.styles)} styles x {s.prompts} prompts x {s.seeds} seeds = {n_images} images per style and "
        f"configuration{f' and training seed ({seeds} training seeds)' if seeds > 1 else ''}; training steps "
        f"{s.steps or 'recipe (300)'}; {gen_steps} denoising steps, guidance "
        f"{s.guidance if s.guidance is not None else 'default (7.0)'}; resolution {s.resolution or 'default'}.",
        "",
        "Cosine similarities, higher is better. **DINO** (ViT-S/16) and **CLIP-I** (ViT-B/32): generated image "
        "vs the style's reference image(s), i.e. style fidelity. **CLIP-T**: generated image vs the *content* "
        "prompt without \"in {style} style\" (e.g. \"A baby penguin\"), i.e. prompt fidelity; "
        "results.csv also has `clip_t_full` against the full prompt.",
        "",
        "Weight-free distances, lower is closer (`studio/styles/weightfree.py`): **colour**, sliced Wasserstein "
        "distance of the Lab colours to the references (Lab units); **texture**, Gram-matrix distance of a fixed "
        "random conv net to the references (0-1); **content**, 1 - SSIM of colour edges against the base model's "
        "image for the same prompt and seed (0-2; low = the template kept the base model's layout).",
        "",
    ]
    if ev.backbone_id == "tiny":
        lines += ["> `tiny` is a small demo model pre-trained for a minute on drawn shapes: these numbers check the "
                  "pipeline and show what a toy scale can show, not the paper's result.", ""]
    missing = sorted({r["scores_missing"] for r in agg.units.values() if r.get("scores_missing")})
    if missing:
        lines += [f"> **Scores are missing** (DINO / CLIP) for some units: {'; '.join(missing)}. The weight-free "
                  "distances, images and grids were written; run the same command again once the metric models "
                  "are available (or pass --dino-model / --clip-model) to score them without retraining.", ""]
    done, total = len(agg.units), len(ev.styles) * len(configs) * seeds
    if done < total:
        lines += [f"Progress: {done} of {total} units finished; means are over the {len(agg.complete)} styles "
                  "finished in every configuration" + (" and training seed." if seeds > 1 else "."), ""]
    metrics = list(ALL_METRICS)  # DINO / CLIP stay in view (a dash until scored), the weight-free ones beside
    spread = " (± standard error over the training seeds)" if seeds > 1 else ""
    lines += [f"## Mean over {len(agg.complete)} styles{spread}", "",
              "| configuration | recipe | " + " | ".join(label for _, label in metrics) + " |",
              "|---|---|" + "---:|" * len(metrics)]
    for c in configs:
        cells = [fmt(*agg.config_value(c.name, key), _DIGITS.get(key, 3)) for key, _ in metrics]
        lines.append(f"| {c.name} | {describe_config(c, family)} | " + " | ".join(cells) + " |")
    base_rows = [base[name] for name in agg.complete if name in base]
    if base_rows and len(base_rows) == len(agg.complete):
        cells = [_fmt(sum(r[key] for r in base_rows) / len(base_rows), key) if key in ("colour", "texture", "content")
                 else "–" for key, _ in metrics]
        lines.append("| *base model* | *no template, same prompts and seeds* | " + " | ".join(cells) + " |")
    if ev.backbone_id in PAPER_RESULTS:
        model, rows = PAPER_RESULTS[ev.backbone_id]
        for name, values in rows:
            lines.append(f"| *paper, {model}* | *{name}* | " + " | ".join(f"*{v:.3f}*" for v in values)
                         + " | –" * (len(metrics) - len(values)) + " |")
        lines += ["", "Paper rows: 18 StyleDrop styles x 23 prompts x 2 images; the paper's CLIP-T text is "
                  "unspecified."]
    if len(configs) > 1 and agg.complete:
        baseline = configs[0].name
        shown = [(key, label) for key, label in metrics if agg.has(key)]
        lines += ["", f"## Paired difference to {baseline}", "",
                  f"Per style: the configuration's mean over training seeds minus {baseline}'s; then mean ± standard "
                  f"error over the {len(agg.complete)} styles, and (better / worse) how many styles moved toward / "
                  "away from the reference (higher similarity, lower colour and texture distance). For content a "
                  "positive difference means the template moved further from the base model's layout.", "",
                  "| configuration | " + " | ".join(label for _, label in shown) + " |",
                  "|---|" + "---:|" * len(shown)]
        for c in configs[1:]:
            cells = []
            for key, _ in shown:
                p = agg.paired(c.name, baseline, key)
                if p is None:
                    cells.append("–")
                else:
                    text = f"{p['mean']:+.{_DIGITS.get(key, 3)}f}"
                    text += f" ± {p['se']:.{_DIGITS.get(key, 3)}f}" if p["se"] is not None else ""
                    cells.append(text + ("" if key == "content" else f" ({p['better']} / {p['worse']})"))
            lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
    for key, label in metrics:
        if not agg.has(key):  # no per-style table of dashes
            continue
        lines += ["", f"## {label} per style{' (mean ± SE over training seeds)' if seeds > 1 else ''}", "",
                  "| style | style prompt | " + " | ".join(c.name for c in configs)
                  + (" | base model |" if key in ("colour", "texture") else " |"),
                  "|---|---|" + "---:|" * (len(configs) + (key in ("colour", "texture")))]
        for style in ev.styles:
            cells = [fmt(*agg.style_value(style.name, c.name, key), _DIGITS.get(key, 3)) for c in configs]
            if key in ("colour", "texture"):
                cells.append(_fmt((base.get(style.name) or {}).get(key), key))
            lines.append(f"| {style.name} | {style.style_prompt} | " + " | ".join(cells) + " |")
    lines += ["", "Grids: `grids/<style>.png`, the base model's row first, then one row per configuration and "
              "training seed; the reference on the left, then each prompt x seed in order. `grids/overview.png`: "
              "every style, its reference, then the first prompts (seed 0) of the base model and of each "
              "configuration's first training.", ""]
    return "\n".join(lines)


def _paste(grid: Image.Image, img: Image.Image, x: int, y: int, cell: int) -> None:
    """``img`` centred in the cell at (x, y): shrunk to fit, or blown up without smoothing (tiny's 64 px)."""
    img, side = img.convert("RGB"), cell - 4  # a thin white gap between cells
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    if max(img.size) < side:
        scale = side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.NEAREST)
    grid.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))


def render_grid(ev: Evaluation, style: Style, agg: Aggregate, cell: int = 192) -> Image.Image:
    """Rows: the base model (when its images exist), then every configuration x training seed; columns:
    the reference, then every prompt x seed (grey where missing)."""
    items = ev.settings.items()
    label_w, header_h = 150, 30
    font = ImageFont.load_default(size=11)
    base_dir = ev.out / "base" / style.name
    has_base = all((base_dir / _image_name(p, s)).is_file() for p, s in items)
    rows: list[tuple[str, Path, dict | None]] = \
        [("base model", base_dir, _read_json(base_dir / "result.json"))] if has_base else []
    for cfg in ev.settings.configs:
        for k in range(ev.settings.train_seeds):
            rows.append((unit_name(cfg.name, k), ev.unit_dir(style, cfg, k), agg.unit(style.name, cfg.name, k)))
    cols = 1 + len(items)
    grid = Image.new("RGB", (label_w + cols * cell, header_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)

    def header(text: str, col: int) -> None:
        draw.text((label_w + col * cell + 4, 2), text[: max(4, cell // 6)], fill="black", font=font)

    header("reference", 0)
    draw.text((label_w + 4, 15), style.style_prompt[: cell // 6], fill="gray", font=font)
    for k, (p, s) in enumerate(items, start=1):
        header(PAPER_PROMPTS[p], k)
        draw.text((label_w + k * cell + 4, 15), f"seed {s}", fill="gray", font=font)
    reference = ev.references(style)[0]
    for row, (name, folder, result) in enumerate(rows):
        y = header_h + row * cell
        draw.text((4, y + 4), name, fill="black", font=font)
        shown = [(key, label) for key, label in ALL_METRICS if (result or {}).get(key) is not None]
        for line, (key, label) in enumerate(shown or METRICS):
            draw.text((4, y + 20 + 14 * line), f"{label.split()[0]} {_fmt((result or {}).get(key), key)}",
                      fill="gray", font=font)
        _paste(grid, reference, label_w, y, cell)
        for k, (p, s) in enumerate(items, start=1):
            path = folder / _image_name(p, s)
            if path.is_file():
                _paste(grid, Image.open(path), label_w + k * cell, y, cell)
            else:
                draw.rectangle([label_w + k * cell + 1, y + 1, label_w + (k + 1) * cell - 2, y + cell - 2],
                               fill=(220, 220, 220))
    return grid


def render_overview(ev: Evaluation, styles: list[Style], per_group: int = 3, cell: int = 68) -> Image.Image:
    """One row per style: its reference, then the first ``per_group`` prompts (seed 0) of the base
    model and of each configuration's first training (grey where missing)."""
    prompts = list(range(min(per_group, ev.settings.prompts)))
    groups = [("base model", lambda st: ev.out / "base" / st.name)]
    groups += [(c.name, lambda st, c=c: ev.unit_dir(st, c, 0)) for c in ev.settings.configs]
    label_w, header_h, gap = 110, 18, 8
    group_w = len(prompts) * cell + gap
    grid = Image.new("RGB", (label_w + cell + gap + len(groups) * group_w, header_h + len(styles) * cell), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    draw.text((label_w + 2, 2), "reference", fill="black", font=font)
    for g, (name, _) in enumerate(groups):
        draw.text((label_w + cell + gap + g * group_w + 2, 2), name, fill="black", font=font)
    for row, style in enumerate(styles):
        y = header_h + row * cell
        draw.text((4, y + cell // 2 - 6), style.name[:17], fill="black", font=font)
        _paste(grid, ev.references(style)[0], label_w, y, cell)
        for g, (_, folder_of) in enumerate(groups):
            for j, p in enumerate(prompts):
                x = label_w + cell + gap + g * group_w + j * cell
                path = folder_of(style) / _image_name(p, 0)
                if path.is_file():
                    _paste(grid, Image.open(path), x, y, cell)
                else:
                    draw.rectangle([x + 2, y + 2, x + cell - 3, y + cell - 3], fill=(220, 220, 220))
    return grid
