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
from studio.styles.eval_config import METRICS, PAPER_PROMPTS, EvalConfig, _image_name, _read_json
from studio.styles.style_sets import Style

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

