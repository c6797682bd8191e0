"""Template mixing (StyleDrop's style + content adapters): several template LoRAs at once.

Generation activates the main template at ``lora_scale`` and each mixed-in template at its own
scale through peft's multi-adapter ``set_adapters``; the LoRA deltas add up,
``W + sum_k scale_k * B_k A_k``. Options carry JSON-friendly references
(``{"template": id or folder, "scale": 0.6}``); the caller resolves ids with its template
store (:func:`resolve_mix`) and hands the resolved folders to ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

MixedTemplate = tuple[Path, dict, float]  # (template folder, template.json dict, LoRA scale)
MAX_MIX = 4


def validate_mix(entries: Any) -> list[dict]:
    """Normalise ``[{"template": str, "scale": number}, ...]``; InputError on anything else."""
    if entries is None:
        return []
    if not isinstance(entries, list | tuple):
        raise InputError("mix must be a list of {template, scale} entries")
    if len(entries) > MAX_MIX:
        raise InputError(f"at most {MAX_MIX} templates can be mixed in")
    out = []
    for entry in entries:
        ref = entry.get("template") if isinstance(entry, dict) else None
        scale = entry.get("scale", 1.0) if isinstance(entry, dict) else None
        if not isinstance(ref, str) or not ref.strip():
            raise InputError("each mix entry needs a template id")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not -4.0 <= scale <= 4.0:
            raise InputError(f"mix strength of {ref!r} must be a number between -4 and 4")
        out.append({"template": ref.strip(), "scale": float(scale)})
    refs = [e["template"] for e in out]
    if len(set(refs)) != len(refs):
        raise InputError("a template is mixed in twice")
    return out


def parse_mix_arg(text: str) -> dict:
    """``ID:SCALE`` (the CLI's ``--mix``) as a mix entry; a bare ``ID`` means scale 1."""
    ref, sep, scale = text.rpartition(":")
    if not sep:
        return {"template": text, "scale": 1.0}
    try:
        return {"template": ref, "scale": float(scale)}
    except ValueError:
        raise InputError(f"--mix takes TEMPLATE:SCALE, e.g. ink-wash:0.5 (got {text!r})") from None


def resolve_mix(store, entries: list[dict]) -> list[MixedTemplate]:
    """Resolve mix entries to (folder, template.json dict, scale).

    An entry naming a template folder (with template.json) is read directly; anything else is
    a template id looked up in ``store`` (a :class:`studio.templates.TemplateStore`, or None
    when only folders are expected).
    """
    out = []
    for entry in validate_mix(entries):
        ref, folder = entry["template"], Path(entry["template"]).expanduser()
        if (folder / "template.json").is_file():
            try:
                meta = json.loads((folder / "template.json").read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"template folder {ref!r} has an unreadable template.json: {exc}") from None
            out.append((folder, meta if isinstance(meta, dict) else {}, entry["scale"]))
        elif store is None:
            raise InputError(f"mix template {ref!r} must be resolved with the template store first")
        else:
            info = store.get(ref)
            out.append((info.path, info.meta, entry["scale"]))
    return out
