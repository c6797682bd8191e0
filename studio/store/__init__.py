"""The template store: one atomic folder per style template, the template.json schema, LoRA key
formats for other tools (kohya / ComfyUI), export / import, and sharing on the Hugging Face Hub.

May import: ``studio.engine`` (backbone registry, recipe), ``studio.media`` and the bottom modules
(config, errors, checks, diskspace). Never the styles features, jobs, API or UI.
"""
