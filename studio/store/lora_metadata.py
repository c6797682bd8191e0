"""The metadata other tools read in a LoRA file's header, written on export and read on import.

Written beside the studio's own card (``studio_template``):

* kohya's ``ss_*`` keys (sd-scripts writes them; A1111 / Forge / Civitai read them): ``ss_network_module``,
  ``ss_network_dim`` / ``ss_network_alpha`` (equal: exports fold ``alpha / rank`` into the weights),
  ``ss_base_model_version`` (``flux1`` / ``sd3``), ``ss_output_name``, ``ss_training_comment``,
  ``ss_resolution``, ``ss_steps`` and ``ss_tag_frequency`` (the training captions' tags, JSON);
* the SAI model spec ``modelspec.*`` (ComfyUI's and SwarmUI's model browsers): ``sai_model_spec``,
  ``architecture`` (e.g. ``flux-1-dev/lora``), ``implementation``, ``title``, ``trigger_phrase`` (the
  style wrapper the template was trained with, ``in <style> style``), ``resolution`` and ``date``.

Read back (:func:`name_from_header`, :func:`style_from_header`) when a file has no studio card, and
:func:`refused_architecture` refuses models this studio has no backbone for (FLUX.1-schnell).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping

NETWORK_MODULES = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}
BASE_MODEL_VERSIONS = {"flux": "flux1", "sd3": "sd3"}
ARCHITECTURES = {"flux-dev": "flux-1-dev/lora", "sd3.5-large": "stable-diffusion-3-large/lora",
                 "sd3.5-medium": "stable-diffusion-3-medium/lora"}
FAMILY_ARCHITECTURES = {"flux": "flux-1/lora", "sd3": "stable-diffusion-3/lora"}  # tiny, a folder, a hub id
IMPLEMENTATIONS = {"flux": "https://github.com/black-forest-labs/flux",
                   "sd3": "https://github.com/Stability-AI/sd3.5"}
DEFAULT_RESOLUTION = {"tiny": 64}
_WRAPPED = re.compile(r"^in (.+) style$", re.IGNORECASE)
MAX_TAGS = 3


def trigger_phrase(style_prompt: str) -> str:
    """The words the template was trained with around each caption: ``in <style> style``."""
    return f"in {style_prompt} style"


def unwrap_style(text: str) -> str:
    """``"in watercolor painting style"`` -> ``"watercolor painting"``; anything else unchanged."""
    text = " ".join(text.split())
    match = _WRAPPED.match(text)
    return match.group(1).strip() if match else text


def tag_frequency(meta: Mapping) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset folder, how many captions hold each comma-separated tag.

    Each reference's training prompt is its caption (or the recipe's default content) plus the
    trigger phrase, as in :func:`studio.engine.training` (``"{content} in {style} style"``).
    """
    style = str(meta.get("style_prompt") or "")
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    default = str(recipe.get("default_content") or "an image")
    references = meta.get("references") if isinstance(meta.get("references"), list) else []
    captions = meta.get("captions") if isinstance(meta.get("captions"), list) else []
    counts: Counter[str] = Counter()
    for i in range(max(len(references), len(captions), 1)):
        caption = captions[i] if i < len(captions) and isinstance(captions[i], str) else None
        tags = [t.strip() for t in (caption or default).split(",") if t.strip()]
        counts.update(dict.fromkeys([trigger_phrase(style), *tags], 1))
    return {f"{len(references) or 1}_{style}": dict(counts.most_common())}


def export_metadata(meta: Mapping, family: str, rank: int, title: str) -> dict[str, str]:
    """The kohya and model-spec header entries of an exported LoRA (all strings, as safetensors wants).

    ``meta`` is template.json, ``rank`` the template's LoRA rank (also written as the alpha: exports
    carry ``alpha = rank``), ``title`` the name other tools show.
    """
    backbone = str(meta.get("backbone") or "")
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    resolution = int(recipe.get("resolution") or DEFAULT_RESOLUTION.get(backbone, 512))
    style = str(meta.get("style_prompt") or "")
    created = str(meta.get("created") or "")
    return {
        "ss_network_module": NETWORK_MODULES[family],
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_output_name": title,
        "ss_training_comment": (f"Style Template Studio template; style prompt {style!r}; "
                                f"trained on {backbone or family} as 'in <style> style' captions"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(int(meta.get("steps_done") or 0)),
        "ss_tag_frequency": json.dumps(tag_frequency(meta), ensure_ascii=False),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES.get(backbone, FAMILY_ARCHITECTURES[family]),
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": title,
        "modelspec.trigger_phrase": trigger_phrase(style),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": created[:10] if len(created) >= 10 else created,
    }


# --------------------------------------------------------------------------- import


def refused_architecture(header: Mapping[str, str]) -> str | None:
    """A one-line refusal for a file made for a model this studio has no backbone for, else None."""
    arch = str(header.get("modelspec.architecture") or "").strip().lower()
    version = str(header.get("ss_base_model_version") or "").strip().lower()
    if arch.startswith("flux-1-schnell") or version in ("flux1_schnell", "flux1-schnell"):
        shown = arch or version
        return (f"it is a FLUX.1-schnell LoRA ({shown!r}); this studio has no schnell backbone "
                "(FLUX.1-dev and SD3.5 only)")
    return None


def name_from_header(header: Mapping[str, str]) -> str | None:
    """The name a file gives itself: kohya's ``ss_output_name``, else ``modelspec.title``."""
    for key in ("ss_output_name", "modelspec.title"):
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def style_from_tags(raw: str | None) -> str | None:
    """The most frequent caption tags of ``ss_tag_frequency`` (those in the most captions, at most 3)."""
    if not raw:
        return None
    try:
        folders = json.loads(raw)
    except (ValueError, TypeError):
        return None
    counts: Counter[str] = Counter()
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(tag, str) and tag.strip() and isinstance(n, int | float) and n > 0:
                        counts[" ".join(tag.split())] += int(n)
    if not counts:
        return None
    top = counts.most_common()
    best = [tag for tag, n in top if n == top[0][1]][:MAX_TAGS]
    return unwrap_style(", ".join(best))
