"""The Generate tab's Advanced settings, as pure functions: what the controls say and send.

Kept apart from :mod:`studio.ui.generate_tab` (wiring only) and free of Gradio, so the mapping
from slider positions to :class:`studio.engine.generation.GenerateOptions` fields is testable alone.
The sliders speak the artist's language (percentages, "blend"); the options the engine's
(``style_schedule`` as a fraction, ``fusion_weight`` as the template's weight).
"""

from __future__ import annotations

NO_MIX = ""  # the mix dropdown's "don't mix" value

ACCORDION = "Advanced: mix two styles, style timing, blending, noise prior"
MIX_INFO = ("Combine two styles, e.g. one template's colours with another's brushwork. "
            "Set how strongly each one counts with the two sliders.")
MAIN_STRENGTH_INFO = "The same setting as “Style strength” in the settings above; moving one moves the other."
SCHEDULE_LABEL = "Apply the style only during the first part of the steps (%)"
SCHEDULE_INFO = ("A picture is made in steps, from noise to detail. Colours, layout and brushwork are settled in "
                 "the first steps, details in the later ones. Lower this to keep the style's look while the base "
                 "model draws the subject and its details more faithfully. 100 % = the whole time (off).")
BLEND_LABEL = "Blend with the base model (%)"
BLEND_INFO = ("Mixes the base model's own picture (no style) into every step: 0 % = your style alone (off), "
              "50 % = half and half, 100 % = no style at all.")
PRIOR_ON = ("Starts each picture from noise with your reference images' average colours and layout instead "
            "of plain random noise, so colours and composition stay closer to the references.")
PRIOR_NO_TEMPLATE = "Not available: pick a style template first."
PRIOR_MISSING = ("Not available for this template: it was trained without it. To get it, train again with "
                 "“Style noise prior” ticked under Advanced settings on the Train tab.")


def mix_choices(templates: list[dict], main_id: str | None) -> list[tuple[str, str]]:
    """Choices for "Mix with a second template": every template except the main one."""
    return [("Don't mix", NO_MIX)] + [(f"{t['name']} — {t['style_prompt']}"[:90], t["id"])
                                      for t in templates if t["id"] != (main_id or None)]


def main_label(name: str | None) -> str:
    """The main template's strength slider in the mix section, named after the template."""
    return f"Strength of “{name}” (main template)" if name else "Strength of the main template"


def mixed_label(name: str | None) -> str:
    """The second template's strength slider, named after it."""
    return f"Strength of “{name}” (mixed in)" if name else "Strength of the second template"


def prior_state(template: dict | None) -> tuple[bool, str]:
    """(whether "Start from the style's noise prior" can be ticked, the text under it)."""
    if not template:
        return False, PRIOR_NO_TEMPLATE
    if not template.get("noise_prior"):
        return False, PRIOR_MISSING
    return True, PRIOR_ON


def advanced_options(mix_with: str | None, mix_scale: float, schedule_pct: float, blend_pct: float,
                     noise_prior: bool) -> dict:
    """GenerateOptions fields for the Advanced settings; each control at its "off" position adds nothing.

    ``schedule_pct`` 100 means every step (no schedule); ``blend_pct`` is the base model's share,
    so the template's weight per step is ``1 - blend_pct / 100`` (0 % = the template alone).
    """
    options: dict = {}
    if mix_with:
        options["mix"] = [{"template": mix_with, "scale": round(float(mix_scale), 4)}]
    if schedule_pct is not None and float(schedule_pct) < 100:
        options["style_schedule"] = round(float(schedule_pct) / 100, 4)
    if blend_pct:
        options["fusion_weight"] = round(1 - float(blend_pct) / 100, 4)
    if noise_prior:
        options["noise_prior"] = True
    return options
