"""Turning job and template data into what the page shows: HTML snippets, plot tables, captions.

Pure functions, no Gradio, so the tab modules stay wiring only and this is testable alone.
"""

from __future__ import annotations

import functools
import hashlib
import html
import math
import os
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from studio.api import backbone_family, sampler_draws

STATE_LABELS = {"queued": "Waiting", "running": "Training", "done": "Done", "failed": "Failed",
                "cancelled": "Cancelled"}
T_BINS = 25
T_COLORS = {"this run": "#dc2626", "style-friendly": "#2563eb", "SD3": "#f59e0b", "SD3 baseline": "#f59e0b",
            "uniform": "#6b7280"}
EMA_ALPHA = 0.1


def fmt_duration(seconds: float | None) -> str:
    """``75`` -> ``"1:15"``; ``3700`` -> ``"1:01:40"``; None -> ``"–"``."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_date(value: str | None) -> str:
    """An ISO time as "2026-11-22 14:03" (local time), or the raw text."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


def status_html(status: dict | None) -> str:
    """The live status panel: state, message, progress bar, step / total, speed and ETA."""
    if not status:
        return ('<div class="job-card idle"><b>No training yet.</b> Add reference images, describe the style '
                'and press <b>Train</b>. Progress, the loss curve and previews appear here.</div>')
    state = status.get("state") or "queued"
    step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
    pct = 100.0 if state == "done" else (100.0 * step / total if total else 0.0)
    parts = []
    if state == "queued":
        pos = status.get("queue_position")
        parts.append(f"position {pos} in the queue" if pos else "in the queue")
    if total and state != "queued":
        parts.append(f"step {step} / {total}")
    sps = status.get("sec_per_step")
    if state == "running" and sps:
        parts.append(f"{1 / sps:.2f} it/s" if sps < 1 else f"{sps:.1f} s/it")
    if state == "running" and status.get("eta_s") is not None:
        parts.append(f"ETA {fmt_duration(status['eta_s'])}")
    message = status.get("error") if state == "failed" else status.get("message")
    name = html.escape(status.get("name") or "")
    label = STATE_LABELS.get(state, state)
    if state in ("queued", "running") and status.get("cancel_requested"):
        label, message = "Cancelling…", "stopping at the next step or preview image; the last checkpoint is kept"
    return (
        f'<div class="job-card {state}" data-title="{html.escape(tab_title(status))}" '
        f'data-checkpoint="{int(status.get("checkpoint_step") or 0)}">'
        f'<div class="job-head"><span class="badge {state}">{html.escape(label)}</span> '
        f'<b>{name}</b> <span class="job-meta">{" · ".join(html.escape(p) for p in parts)}</span></div>'
        f'<div class="bar" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" aria-valuemax="100">'
        f'<div class="fill {state}" style="width:{pct:.1f}%"></div></div>'
        f'<div class="job-msg">{html.escape(message or "")}</div></div>'
    )


def tab_title(status: dict | None) -> str:
    """The browser tab's title: progress while a training runs (``[57%] Training Blue Blobs``), its end after."""
    base = "Style Template Studio"
    if not status:
        return base
    state, name = status.get("state") or "queued", status.get("name") or "a template"
    step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
    if state == "running":
        if status.get("cancel_requested"):
            return f"Cancelling {name} – {base}"
        return f"[{100 * step // total if total else 0}%] Training {name} – {base}"
    if state == "queued":
        return f"[waiting] {name} – {base}"
    return f"{STATE_LABELS.get(state, state)}: {name} – {base}"


def loss_frame(losses: list[float | None]) -> pd.DataFrame | None:
    """Loss per step, raw and smoothed (bias-corrected EMA), in long form for a colour series."""
    rows, ema, weight = [], 0.0, 0.0
    for i, loss in enumerate(losses, start=1):
        if loss is None or not math.isfinite(loss):
            continue
        ema = (1 - EMA_ALPHA) * ema + EMA_ALPHA * loss
        weight = (1 - EMA_ALPHA) * weight + EMA_ALPHA
        rows.append((i, float(loss), "raw"))
        rows.append((i, ema / weight, "smoothed"))
    if not rows:  # None, not an empty frame: a plot that starts empty never draws its colour series
        return None
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def _histogram(values: list[float], bins: int = T_BINS) -> list[float]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    n = max(1, len(values))
    return [c * bins / n for c in counts]  # density: integrates to 1 over (0, 1)


def _expected(name: str, family: str, mu: float | None, sigma: float | None, shift: float | None) -> list[float]:
    """Density of a sampler's t per bin, from seeded draws of the engine's own sampler."""
    return _histogram(list(sampler_draws(name, family, mu, sigma, shift)))


def t_frame(ts: list[float], recipe: dict | None, backbone: str | None) -> pd.DataFrame:
    """Histogram of the noise levels t sampled so far, against this run's sampler and SD3's."""
    recipe = recipe or {}
    family = backbone_family(backbone)
    name = recipe.get("sampler") or "style_friendly"
    centers = [(i + 0.5) / T_BINS for i in range(T_BINS)]
    # The sampled series is always there (zeros before the first step) so the legend never changes.
    sampled = _histogram([float(t) for t in ts if t is not None]) if ts else [0.0] * T_BINS
    series = [("this run", sampled)]  # short labels: the legend sits under a narrow plot
    label = {"style_friendly": "style-friendly", "sd3": "SD3"}.get(name, name)
    series.append((label, list(_expected(name, family, recipe.get("mu"), recipe.get("sigma"), recipe.get("shift")))))
    if name != "sd3":
        series.append(("SD3 baseline", list(_expected("sd3", family, None, None, None))))
    rows = [(c, d, label) for label, dens in series for c, d in zip(centers, dens, strict=True)]
    return pd.DataFrame(rows, columns=["t (noise level)", "density", "sampler"])


def preview_items(previews: list[dict], prompts: list[str]) -> list[tuple[str, str]]:
    """Gallery items for the training previews: newest step first, one caption per image."""
    items = []
    for entry in sorted(previews or [], key=lambda e: e["step"], reverse=True):
        step = entry["step"]
        for i, path in enumerate(entry["files"]):
            what = prompts[i] if i < len(prompts) else f"prompt {i + 1}"
            when = "step 0 · base model" if step == 0 else f"step {step}"
            items.append((path, f"{when} · {what}"))
    return items


def gallery_items(templates: list[dict]) -> list[tuple[str, str]]:
    """Gallery tiles for templates (picture, name), one per template, in order."""
    return [(tile_image(t), t["name"]) for t in templates]


NO_PICTURE_NOTE = "imported LoRA · no pictures yet: generate with it to see its style"


@functools.lru_cache(maxsize=256)
def _name_card(name: str) -> str:
    import tempfile

    from studio.media.compose import name_card

    folder = Path(tempfile.gettempdir()) / "studio-name-cards"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(f'card-v2:{name}'.encode()).hexdigest()[:16]}.png"  # v2: the card's look
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        name_card(name, NO_PICTURE_NOTE).save(tmp, format="PNG")
        os.replace(tmp, path)
    return str(path)


def final_previews(paths: list[str]) -> list[str]:
    """The previews of a template's last training step (the finished style), else all of them."""
    steps = [(int(m[1]), p) for p in paths if (m := re.search(r"step_(\d+)_", Path(p).name))]
    if not steps:
        return paths
    last = max(s for s, _ in steps)
    return [p for s, p in steps if s == last]


def template_card(t: dict | None) -> str:
    """Markdown details of one template."""
    if not t:
        return "*Select a template on the left to see it here.*"
    lines = [f"### {t['name']}", f"**Style prompt:** {t['style_prompt'] or '—'}"]
    meta = [f"backbone `{t['backbone'] or '?'}`"]
    if t.get("created"):
        meta.append(f"created {fmt_date(t['created'])}")
    if t.get("steps"):
        meta.append(f"{t['steps']} steps")
    if t.get("sampler"):
        meta.append(f"{t['sampler'].replace('_', '-')} sampler")
    if t.get("references"):
        meta.append(f"{len(t['references'])} reference image(s)")
    if t.get("imported"):
        meta.append("imported" + (f" from `{t['source_repo']}`" if t.get("source_repo") else ""))
    lines.append(" · ".join(meta))
    if t.get("lineage"):
        lines.append(lineage_text(t["lineage"]))
    if any(t.get("captions") or []):
        shown = [f"{i + 1}. {_md_text(c) if c else '*(no caption: “an image”)*'}" for i, c in enumerate(t["captions"])]
        lines.append("**Captions** (what each reference shows; trained as “caption in style”):\n\n"
                     + "\n".join(shown))
    if t.get("preview_prompts"):
        lines.append("**Sample prompts:** " + " · ".join(_md_text(p) for p in t["preview_prompts"]))
    return "\n\n".join(lines)


def _md_text(text: str) -> str:
    """A user's text inside Markdown: its markup characters shown as they are."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|~])", r"\\\1", str(text))


def template_choices(templates: list[dict]) -> list[tuple[str, str]]:
    """Dropdown choices: (label, id), with "no template" first."""
    return [("No template (base model)", "")] + [(f"{t['name']} — {t['style_prompt']}"[:90], t["id"])
                                                 for t in templates]


def style_suffix(style: str | None) -> str:
    return f" in {style} style" if style else ""


def rewrap_prompt(prompt: str, old_style: str | None, new_style: str | None) -> str:
    """Swap the ``" in {style} style"`` ending of a prompt for another template's."""
    text = (prompt or "").rstrip()
    old = style_suffix(old_style)
    if old and text.endswith(old):
        text = text[: -len(old)]
    for_new = style_suffix(new_style)
    if not text:
        text = "a cozy wood cabin in the snow"
    return text + for_new if for_new and not text.endswith(for_new) else text


# -- finding styles and scores (studio.styles.retrieval) -------------------------------------------------

# The paper's FLUX.1-dev averages, style-friendly sampler, sigma 3 (Table 2, v3): a yardstick for the card.
PAPER_SCORES = {"dino": 0.478, "clip_i": 0.691, "clip_t": 0.343}
SCORE_LABELS = (("dino", "Style (DINO)"), ("clip_i", "Style (CLIP)"), ("clip_t", "Prompt (CLIP-T)"))


def tile_image(t: dict) -> str:
    """The picture a template's tile shows: in search results its picture closest to the query, else its
    thumbnail, last preview or first reference; a card with its name when it has no picture at all."""
    return (t.get("closest_image") or t.get("thumbnail") or (t.get("previews") or [None])[-1]
            or (t.get("references") or [None])[0] or _name_card(t["name"]))


def similarity_text(similarity: float | None) -> str:
    """An image-image cosine similarity for people: ``0.914`` -> ``"91 % alike"``."""
    return "" if similarity is None else f"{max(0.0, similarity) * 100:.0f} % alike"


def _md(text: str) -> str:
    """Template names inside Markdown: no accidental emphasis, links or HTML."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", str(text))


def alike_list(results: list[dict], limit: int = 4) -> str:
    """``"**Crimson poster** 97 % alike · **Blue wash** 71 % alike"``: names with how alike, best first."""
    parts = [f"**{_md(t['name'])}** {similarity_text(t.get('similarity'))}".rstrip() for t in results[:limit]]
    more = len(results) - limit
    return " · ".join(parts) + (f" · and {more} more" if more > 0 else "")


def search_items(found: dict) -> list[tuple[str, str]]:
    """Gallery tiles for search results: each template's picture closest to the query (so the tile shows why
    it came up), captioned with its name (tiles are narrow: how alike goes in :func:`search_note`)."""
    return [(tile_image(t), t["name"]) for t in found.get("results") or []]


GALLERY_LABEL = "Your style templates — click one"


def gallery_label(found: dict | None) -> str:
    """The gallery's label: what the tiles are (all templates, or a search's results in their order)."""
    mode = (found or {}).get("mode")
    if mode == "image":
        return "Most like your picture, best first — click one"
    if mode == "text":
        return "Best matches first — click one"
    if mode == "names":
        return "Names and style prompts with your words — click one"
    return GALLERY_LABEL


def search_note(found: dict) -> str:
    """The line under the search results: how alike each template is (by picture), or how text search ranks."""
    if found.get("mode") == "image" and found.get("results"):
        return f"Most like your picture: {alike_list(found['results'])}."
    return found.get("note") or ""


def scores_markdown(scores: dict | None) -> str:
    """The card's score line, or why there are none."""
    if not scores:
        return ""
    if not scores.get("available"):
        reason = html.escape(str(scores.get("reason") or "unknown reason"))
        if scores.get("models_missing"):
            # the full reason (which model, which folder) is in the API's answer; the card stays short
            return ("**Scores unavailable:** the metric models (DINO ViT-S/16, CLIP ViT-B/32) are not on this "
                    "machine.\n\n<span class='hint'>To see how close this style's previews are to its references, "
                    "download them once with `hf download facebook/dino-vits16` and `hf download "
                    "openai/clip-vit-base-patch32`, or set STUDIO_DINO_MODEL and STUDIO_CLIP_MODEL to local "
                    "copies (see *Find a style* in the README).</span>")
        return f"**No scores:** {reason}."
    n = int(scores.get("n_images") or 0)
    values = " · ".join(f"{label} **{scores[key]:.2f}**" for key, label in SCORE_LABELS
                        if isinstance(scores.get(key), (int, float)))
    paper = ", ".join(f"{label.split(' ')[-1].strip('()')} {PAPER_SCORES[key]:.2f}" for key, label in SCORE_LABELS)
    return (f"**Scores** on its {n} final preview{'s' if n != 1 else ''}: {values}\n\n"
            "<span class='hint'>Style: how close the previews look to the reference images. Prompt: how well "
            "they show what their prompt asked for. Higher is closer (1 = identical). For comparison, the paper's "
            f"FLUX.1-dev averages: {paper}.</span>")


def similar_markdown(found: dict) -> str:
    """The Train tab's "you may already have this style" header, naming the templates and how alike they are."""
    results = found.get("results") or []
    if not results:
        return ""
    named = [f"**{_md(t['name'])}** ({similarity_text(t.get('similarity'))})" for t in results]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    if len(results) == 1:
        return (f"**You may already have this style.** {listed} looks like your references: you can use it "
                "instead of training again — or just go on.")
    return (f"**You may already have this style.** {listed} look like your references: pick one and use it "
            "instead of training again — or just go on.")


# -- refining (studio.styles.refine: StyleDrop's round 2) -------------------------------------------------


def lineage_text(lineage: dict) -> str:
    """The card's line for a refined template: where it came from and what it learned from."""
    n = len(lineage.get("synthetic") or [])
    pictures = f"{n} test picture{'s' if n != 1 else ''}"
    if lineage.get("mode") == "auto":
        how = f"{pictures} CLIP picked" + (f" out of {lineage['candidates']}" if lineage.get("candidates") else "")
    else:
        how = f"{pictures} you picked"
    return (f"↳ **Refined from {lineage.get('parent_name') or lineage.get('parent')}** (round "
            f"{lineage.get('round') or 2}): trained again on its references plus {how}.")


def candidate_label(index: int, prompt: str | None) -> str:
    """How a test picture is named on the page: ``"3 · A moose"``."""
    return f"{index + 1} · {prompt}" if prompt else f"{index + 1}"


def picked_items(lineage: dict | None) -> list[tuple[str, str]]:
    """Gallery items for the test pictures a refined template learned from, with their prompt (and scores)."""
    items = []
    for entry in (lineage or {}).get("synthetic") or []:
        if not entry.get("image"):
            continue
        caption = entry.get("prompt") or ""
        if isinstance(entry.get("score"), (int, float)):
            caption += f" · style {entry.get('style', 0):.2f} × prompt {entry.get('text', 0):.2f}"
        items.append((entry["image"], caption))
    return items


def history_items(entries: list[dict]) -> list[tuple[str, str]]:
    """The Generate tab's history strip: (picture, "prompt · time")."""
    out = []
    for entry in entries:
        prompt = entry.get("prompt") or ""
        prompt = prompt if len(prompt) <= 60 else prompt[:59] + "…"
        out.append((entry["image"], f"{prompt} · {fmt_date(entry.get('created'))}".strip(" ·")))
    return out
