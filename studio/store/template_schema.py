"""template.json's schema: every field the studio writes, its type and its bounds.

:func:`sanitize` keeps the known fields whose values have the type and range the studio itself
writes (:func:`studio.engine.training.write_result`, the lineage of :mod:`studio.styles.refine`, imports and
Hub imports in :mod:`studio.store.exchange` / :mod:`studio.store.hub`, the worker's ``job_id``) and drops
everything else: unknown fields, values of another type, out-of-range numbers, over-long text,
unsafe paths, and nested objects of another shape (each nested object keeps only its own known
keys, each list only its valid items). The store applies it to imports before anything is written
and to every template.json it reads, so nothing a file adds (e.g. a ``{"path": ..., "meta":
{"_type": "gradio.FileData"}}`` object, which gradio_client would try to download) reaches an API
response.

Pure Python, no torch: the listing stays light. The recipe's fields mirror
:class:`studio.engine.recipe.Recipe` (a test keeps the two in step).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from datetime import datetime
from typing import Any

Check = Callable[[Any], Any]  # returns the cleaned value or raises _Invalid


class _Invalid(Exception):
    """The value does not fit its field: the field (or list item) is dropped."""


MAX_TEXT = 2000  # prompts, captions
MAX_NAME_CHARS = 80  # studio.media.images.MAX_NAME_CHARS (not imported: keeps this module dependency-free)
MAX_ID_CHARS = 255
MAX_PATH_CHARS = 255
MAX_REFERENCES = 256
MAX_PREVIEWS = 4096
MAX_SEED = 2**32 - 1
FAMILIES = ("flux", "sd3")
SAMPLERS = ("style_friendly", "sd3", "uniform")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # job ids
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


# --------------------------------------------------------------------------- value checks


def text(max_chars: int, choices: tuple[str, ...] | None = None) -> Check:
    """A string of at most ``max_chars`` without NUL (one of ``choices`` when given)."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_chars or "\x00" in value:
            raise _Invalid
        if choices is not None and value not in choices:
            raise _Invalid
        return value

    return check


def line(max_chars: int) -> Check:
    """One line of text: no control characters at all (names, ids, file names)."""
    base = text(max_chars)

    def check(value: Any) -> str:
        value = base(value)
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
            raise _Invalid
        return value

    return check


def pattern(regex: re.Pattern) -> Check:
    """A string matching ``regex`` (ids, repo ids)."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.match(value):
            raise _Invalid
        return value

    return check


def integer(lo: int, hi: int) -> Check:
    """A whole number in ``[lo, hi]`` (not a bool; ``3.0`` becomes ``3``)."""

    def check(value: Any) -> int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise _Invalid
        return value

    return check


def number(lo: float, hi: float, open_lo: bool = False) -> Check:
    """A finite number in ``[lo, hi]`` (``open_lo``: ``lo`` itself excluded), not a bool."""

    def check(value: Any) -> float | int:
        if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
                or not lo <= value <= hi or (open_lo and value == lo)):
            raise _Invalid
        return value

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


def optional(check: Check) -> Check:
    """None, or what ``check`` accepts."""
    return lambda value: None if value is None else check(value)


def rel_path(value: Any) -> str:
    """A harmless path inside the template folder: relative, no ``..``, backslash or hidden part."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_CHARS or "\\" in value:
        raise _Invalid
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts) or ":" in parts[0]:
        raise _Invalid
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise _Invalid
    return value


def file_name(value: Any) -> str:
    """A bare file name (no folder)."""
    value = rel_path(value)
    if "/" in value:
        raise _Invalid
    return value


def template_id(value: Any) -> str:
    """A template id: a plain folder name of this store."""
    value = line(MAX_ID_CHARS)(value)
    if not value.strip() or value.startswith(".") or "/" in value:
        raise _Invalid
    return value


def timestamp(value: Any) -> str:
    """An ISO 8601 time as the studio writes ``created`` (``Z`` accepted)."""
    value = line(64)(value)
    try:
        datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise _Invalid from None
    return value


def list_of(item: Check, max_items: int, keep_positions: bool = False) -> Check:
    """A list of at most ``max_items``; invalid items are dropped (``keep_positions``: become None,
    for lists whose positions matter, such as captions that follow the references)."""

    def check(value: Any) -> list:
        if not isinstance(value, list) or len(value) > max_items:
            raise _Invalid
        out = []
        for entry in value:
            try:
                out.append(item(entry))
            except _Invalid:
                if keep_positions:
                    out.append(None)
        return out

    return check


def obj(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    """A JSON object with these fields: unknown keys and invalid values are dropped; without a valid
    value for each ``required`` field the whole object is invalid."""

    def check(value: Any) -> dict:
        if not isinstance(value, dict):
            raise _Invalid
        out = _fields(value, fields)
        if any(key not in out for key in required):
            raise _Invalid
        return out

    return check


def _fields(value: dict, fields: dict[str, Check]) -> dict:
    out = {}
    for key, check in fields.items():
        if key not in value:
            continue
        try:
            out[key] = check(value[key])
        except _Invalid:
            continue
    return out


# --------------------------------------------------------------------------- the schema

# studio.engine.recipe.Recipe's fields with the bounds of Recipe.validate (None: the backbone's default).
RECIPE = {
    "steps": integer(1, 100_000),
    "grad_accum": integer(1, 256),
    "lr": number(0.0, 1.0, open_lo=True),
    "rank": integer(1, 512),
    "alpha": optional(number(0.0, 4096.0, open_lo=True)),
    "sampler": text(32, SAMPLERS),
    "mu": optional(number(-20.0, 20.0)),
    "sigma": optional(number(0.0, 20.0, open_lo=True)),
    "shift": optional(number(0.0, 100.0, open_lo=True)),
    "offset_noise": number(0.0, 1.0),
    "noise_prior": boolean,
    "resolution": optional(integer(32, 2048)),
    "seed": integer(0, MAX_SEED),
    "train_guidance": number(0.0, 30.0),
    "precision": text(8, ("auto", "bf16", "fp16", "fp32")),
    "tier": text(8, ("auto", "bf16", "fp8", "int8", "nf4")),
    "gradient_checkpointing": optional(boolean),
    "micro_batch": optional(integer(1, 256)),
    "compile_blocks": boolean,
    "preview_every": integer(0, 100_000),
    "preview_steps": optional(integer(1, 200)),
    "preview_prompt": optional(text(MAX_TEXT)),
    "preview_prompts": optional(list_of(text(MAX_TEXT), 4)),
    "checkpoint_every": integer(0, 100_000),
    "default_content": text(MAX_TEXT),
}

# studio.engine.snr.NoiseSampler.describe()
SAMPLER = {"name": text(32, SAMPLERS), "mu": number(-100.0, 100.0), "sigma": number(0.0, 100.0, open_lo=True),
           "shift": number(0.0, 100.0, open_lo=True)}

# studio.engine.noise_prior.NoisePrior.describe()
NOISE_PRIOR = {"file": rel_path, "kind": line(32), "samples": integer(0, 10**7),
               "shape": list_of(integer(0, 10**5), 8), "min_std": number(0.0, 1e3)}

_SCORE = number(-1e3, 1e3)
# One candidate of an automatic refinement (studio.styles.refine.Candidate.to_dict()).
CANDIDATE = {"source": file_name, "prompt": optional(text(MAX_TEXT)), "seed": integer(0, MAX_SEED),
             "style": _SCORE, "text": _SCORE, "score": _SCORE}
# One synthetic image a refined template learned from: a candidate plus its file in the template.
SYNTHETIC = {**CANDIDATE, "file": rel_path}

# What a refined template records under "refine" (studio.styles.refine.lineage, minus parent and round).
REFINE = {
    "parent_name": line(MAX_ID_CHARS),
    "mode": text(8, ("human", "auto")),
    "synthetic": list_of(obj(SYNTHETIC, required=("file",)), MAX_REFERENCES),
    "candidates": integer(1, 1000),
    "top_k": integer(1, 1000),
    "style_metric": text(16, ("clip_i", "dino")),
    "scores": list_of(obj(CANDIDATE, required=("source",)), 1000),
}

SCHEMA: dict[str, Check] = {
    "format_version": integer(1, 1000),
    "id": template_id,
    "name": line(MAX_NAME_CHARS),
    "style_prompt": text(MAX_TEXT),
    "backbone": line(300),  # which ones may be used is decided when a job is submitted (backbones.resolve_allowed)
    "family": text(8, FAMILIES),
    "base_model": line(300),
    "recipe": obj(RECIPE),
    "sampler": obj(SAMPLER),
    "lora_targets": list_of(line(200), 256),
    "memory_tier": text(8, ("bf16", "fp8", "int8", "nf4")),
    "steps_done": integer(0, 10**7),
    "created": timestamp,
    "added": timestamp,  # when it came into this store (an import: the import's time)
    "references": list_of(rel_path, MAX_REFERENCES),
    "captions": list_of(optional(text(MAX_TEXT)), MAX_REFERENCES, keep_positions=True),
    "previews": list_of(rel_path, MAX_PREVIEWS),
    "preview_prompts": list_of(text(MAX_TEXT), 64),
    "training_prompts": list_of(optional(text(MAX_TEXT)), MAX_REFERENCES, keep_positions=True),
    "thumbnail": rel_path,
    "final_loss": optional(number(-1e12, 1e12)),
    "noise_prior": obj(NOISE_PRIOR),
    "parent": template_id,
    "round": integer(1, 10_000),
    "refine": obj(REFINE),
    "job_id": pattern(_ID_RE),
    "imported": boolean,
    "source_file": line(MAX_PATH_CHARS),
    "source_repo": pattern(_REPO_RE),
    "import_notes": list_of(text(MAX_TEXT), 16),  # what an import changed (e.g. a text-encoder part dropped)
}


def sanitize(meta: Any) -> dict:
    """template.json reduced to :data:`SCHEMA`: known fields with valid values only (a new dict).

    Never raises: a value that does not fit is left out, as if the file did not have it (the
    readers have defaults for every field; :class:`studio.store.templates.TemplateStore` requires
    ``style_prompt`` itself).
    """
    return _fields(meta, SCHEMA) if isinstance(meta, dict) else {}


def dropped(meta: Any, clean: dict) -> list[str]:
    """The top-level fields of ``meta`` that :func:`sanitize` left out entirely (for a log line)."""
    return sorted(str(k)[:40] for k in meta if k not in clean) if isinstance(meta, dict) else []
