"""The studio's actions as plain, JSON-friendly functions: what the web UI, ``gradio_client`` and tests call.

:class:`StudioAPI` (:mod:`studio.api.studio_api`: training, references and captions, the jobs, templates,
finding styles, refining; :mod:`studio.api.generation`: pictures, comics, memes and their history) wraps
:class:`studio.jobs.jobs.Jobs` and the template store. No Gradio here; every user mistake raises
:class:`studio.errors.StudioError` with a message meant for the user.
"""

from studio.api.generation import MODES, read_png_params
from studio.api.studio_api import (
    STATUS_KEYS,
    StudioAPI,
    aspect_ratios,
    backbone_family,
    preview_prompts_of,
    sampler_draws,
    suggest_name,
)

__all__ = ["MODES", "STATUS_KEYS", "StudioAPI", "aspect_ratios", "backbone_family", "preview_prompts_of",
           "read_png_params", "sampler_draws", "suggest_name"]
