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

from studio.errors import InputError, NotFoundError

MixedTemplate = tuple[Path, dict, float]  # (template folder, template.json dict, LoRA scale)
MAX_MIX = 4
ENTRY_KEYS = ("template", "scale")


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
        extra = sorted(set(entry) - set(ENTRY_KEYS)) if isinstance(entry, dict) else []
        if extra:  # e.g. "weight" or "strength": silently using scale 1 instead would surprise
            raise InputError(f"a mix entry takes 'template' (an id) and 'scale' (its strength, -4 to 4), "
                             f"not {', '.join(map(repr, extra))}")
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

    With a ``store`` (a :class:`studio.store.templates.TemplateStore`) a plain id names a template in
    it; an entry naming a template folder (with template.json) is read directly. Without a
    store only folders resolve. A plain id wins over a same-named folder in the working
    directory, so a worker's cwd can never change which template a job mixes in.
    """
    out = []
    for entry in validate_mix(entries):
        ref, folder = entry["template"], Path(entry["template"]).expanduser()
        if store is not None and not any(sep in ref for sep in "/\\") and not ref.startswith((".", "~")):
            try:
                info = store.get(ref)
            except NotFoundError as exc:
                if not (folder / "template.json").is_file():
                    raise InputError(f"cannot mix in {ref!r}: {exc}") from None
            else:
                out.append((info.path, info.meta, entry["scale"]))
                continue
        if (folder / "template.json").is_file():
            try:
                meta = json.loads((folder / "template.json").read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"template folder {ref!r} has an unreadable template.json: {exc}") from None
            out.append((folder, meta if isinstance(meta, dict) else {}, entry["scale"]))
        elif store is None:
            raise InputError(f"mix template {ref!r} must be resolved with the template store first")
        else:
            try:
                info = store.get(ref)
            except NotFoundError as exc:
                raise InputError(f"cannot mix in {ref!r}: {exc}") from None
            out.append((info.path, info.meta, entry["scale"]))
    return out
