"""Auto-captioning in the job system: a "caption" job's folder, and captioning a training's references.

A caption job (``Jobs.submit_caption``) holds normalised copies of the pictures in ``references/``;
the worker writes ``captions.json`` after every picture (``{"captions": [...], "done": n, "total": n,
"model": ...}``), so a page can fill its caption boxes while the job runs. A training submitted with
``auto_caption`` has ``"auto_caption": "pending"`` in its ``request.json``; the worker captions the
references that have no caption first (:func:`caption_training_references`), then trains. Either way
the user's own captions are never replaced (:func:`studio.media.captions.merge_captions`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from studio.engine.checkpoints import write_json
from studio.errors import InputError
from studio.media.captions import check_crop, merge_captions
from studio.media.images import crop_fraction

CAPTIONS_FILE = "captions.json"
CAPTION_MAX_SIDE = 1024  # the captioner sees 768 px; a stored copy needs no more


def apply_crops(images: list[Image.Image], crops: list | None) -> list[Image.Image]:
    """Each image cut to its region: ``crops`` has one ``[left, top, right, bottom]`` (fractions) or null
    per image, or is None / empty for none. InputError naming the image otherwise."""
    if crops is None or (isinstance(crops, list | tuple) and not crops):
        return images
    if not isinstance(crops, list | tuple) or len(crops) != len(images):
        raise InputError(f"crops must be a list with one region (or null) per image ({len(images)})")
    return [crop_fraction(img, check_crop(box, f"crop of image {i + 1}")) for i, (img, box)
            in enumerate(zip(images, crops, strict=True))]


def prepare_caption_run(images: list[Image.Image], run_dir: Path) -> list[str]:
    """Write a caption job's pictures (at most CAPTION_MAX_SIDE px) and its empty result; their names."""
    refs = run_dir / "references"
    refs.mkdir(parents=True)
    names = []
    for i, img in enumerate(images):
        img = img.copy()
        img.thumbnail((CAPTION_MAX_SIDE, CAPTION_MAX_SIDE), Image.Resampling.LANCZOS)
        names.append(f"cap_{i:02d}.png")
        img.save(refs / names[-1])
    write_json(run_dir / CAPTIONS_FILE, {"captions": [None] * len(names), "done": 0, "total": len(names)})
    return names


def read_caption_result(run_dir: Path) -> dict:
    """A caption job's ``captions.json`` as it is now (``{"captions": [], "done": 0, "total": 0}`` if unreadable)."""
    try:
        data = json.loads((run_dir / CAPTIONS_FILE).read_text())
        if isinstance(data, dict) and isinstance(data.get("captions"), list):
            return data
    except (OSError, ValueError):
        pass
    return {"captions": [], "done": 0, "total": 0}


def run_caption_job(run_dir: Path, style_prompt: str, captioner, check: Callable[[], None],
                    on_progress: Callable[[int, int], None]) -> list[str | None]:
    """The worker's part of a caption job: caption every picture, writing the result after each one
    (``on_progress(done, total)`` after each picture too)."""
    names = json.loads((run_dir / "job.json").read_text())["request"]["references"]
    images = [Image.open(run_dir / "references" / n).convert("RGB") for n in names]
    result = {"captions": [None] * len(names), "done": 0, "total": len(names), "model": captioner.source}

    def progress(done: int, total: int, caption: str | None) -> None:
        result["captions"][done - 1] = caption
        result["done"] = done
        write_json(run_dir / CAPTIONS_FILE, result)
        on_progress(done, total)

    out: list[str | None] = []
    for i, image in enumerate(images):
        check()
        out += captioner.caption([image], style_prompt)
        progress(i + 1, len(images), out[-1])
    return out


def mark_auto_caption(run_dir: Path) -> None:
    """Ask the worker to caption this training's uncaptioned references before it trains."""
    path = run_dir / "request.json"
    write_json(path, {**json.loads(path.read_text()), "auto_caption": "pending"})


def caption_training_references(run_dir: Path, captioner_factory: Callable[[], object],
                                check: Callable[[], None], say: Callable[[str], None]) -> list[str | None] | None:
    """Before a training marked ``auto_caption``: caption its references that have no caption and write
    them into ``request.json`` (typed captions win). Once per run; returns the captions, or None when
    there was nothing to do."""
    path = run_dir / "request.json"
    request = json.loads(path.read_text())
    if request.get("auto_caption") != "pending":
        return None
    captions = list(request.get("captions") or [None] * len(request["references"]))
    missing = [i for i, c in enumerate(captions) if not c]
    auto: list[str | None] = [None] * len(captions)
    if missing:
        captioner = captioner_factory()
        for k, i in enumerate(missing):
            check()
            say(f"captioning the references: {k} of {len(missing)} done")
            image = Image.open(run_dir / "references" / request["references"][i]).convert("RGB")
            auto[i] = captioner.caption([image], request["style_prompt"])[0]
    merged = merge_captions(captions, auto, len(captions))
    write_json(path, {**request, "captions": merged, "auto_captions": auto, "auto_caption": "done"})
    return merged
