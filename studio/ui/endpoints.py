"""The public API for ``gradio_client`` (JSON in, JSON or files out), on invisible components.

The tabs' own events are private; these endpoints are the stable, documented surface:
``/train``, ``/job_status``, ``/cancel``, ``/templates``, ``/generate``, ``/export_template``,
``/import_template``, ``/import_hub``, ``/rename_template``, ``/delete_template``,
``/share_template``. Errors come back as ``gr.Error`` with a readable message.
"""

from __future__ import annotations

import gradio as gr

from ..api import StudioAPI
from .common import guard


def build(api: StudioAPI) -> None:
    """Add the API endpoints to the Blocks being built."""
    with gr.Column(visible=False):
        files = gr.File(file_count="multiple", label="images")
        one_file = gr.File(label="file")
        text_a, text_b, text_c, text_d = (gr.Textbox(label=n) for n in ("a", "b", "c", "d"))
        flag = gr.Checkbox(True, label="private")
        options = gr.JSON(label="options")
        out_text, out_json = gr.Textbox(label="result"), gr.JSON(label="result")
        out_file, out_files = gr.File(label="file"), gr.File(file_count="multiple", label="files")
        trigger = gr.Button()

    def endpoint(fn, inputs, output, name, **kw):
        trigger.click(guard(fn), inputs, output, api_name=name, api_visibility="public", **kw)

    def train(images, style_prompt, name=None, options=None):
        """Queue a training: images (1-20 files), style prompt, template name ("" = suggested),
        options (dict: preset, steps, lr, rank, sampler, mu, sigma, resolution, seed, offset_noise,
        preview_every, preview_prompt, backbone, captions). Returns the job id."""
        return api.train(images, style_prompt, name, options if isinstance(options, dict) else None)

    def job_status(job_id):
        """State of a job: state, step, total_steps, losses, t, previews, queue_position, template_id, error, ..."""
        return api.job_status(job_id)

    def cancel(job_id):
        """Cancel a queued or running job; returns its status."""
        return api.cancel(job_id)

    def templates(query=None):
        """Every template (newest first), optionally filtered by a search text."""
        return api.templates(query)

    def generate(template_id, prompt, mode=None, options=None):
        """Generate PNGs: template id ("" = base model), prompt, mode (text-to-image | multi-panel | meme),
        options (dict). Returns the image files."""
        return [str(p) for p in api.generate(template_id, prompt, mode or "text-to-image",
                                             options if isinstance(options, dict) else None)]

    def export_template(template_id, fmt=None):
        """Download a template as zip, safetensors (diffusers keys) or comfy (ComfyUI keys)."""
        return str(api.export(template_id, fmt or "zip"))

    def import_template(file, name=None):
        """Import a template .zip or a LoRA .safetensors; returns the new template."""
        return api.import_file(file, name)

    def import_hub(repo_id, token=None, name=None):
        """Import a LoRA from a Hugging Face model repo; returns the new template."""
        return api.import_hub(repo_id, token, name)

    def rename_template(template_id, name):
        return api.rename(template_id, name)

    def delete_template(template_id):
        """Delete a template for good."""
        return api.delete(template_id)

    def share_template(template_id, repo_id, token, private=True):
        """Upload a template with a model card to the Hugging Face Hub; returns {"url": ...}."""
        return api.share(template_id, repo_id, token, private)

    endpoint(train, [files, text_a, text_b, options], out_text, "train")
    endpoint(job_status, text_a, out_json, "job_status", concurrency_limit=None)
    endpoint(cancel, text_a, out_json, "cancel", concurrency_limit=None)
    endpoint(templates, text_a, out_json, "templates", concurrency_limit=None)
    endpoint(generate, [text_a, text_b, text_c, options], out_files, "generate", concurrency_limit=4)
    endpoint(export_template, [text_a, text_b], out_file, "export_template", concurrency_limit=2)
    endpoint(import_template, [one_file, text_a], out_json, "import_template")
    endpoint(import_hub, [text_a, text_b, text_c], out_json, "import_hub")
    endpoint(rename_template, [text_a, text_b], out_json, "rename_template")
    endpoint(delete_template, text_a, out_json, "delete_template")
    endpoint(share_template, [text_a, text_b, text_d, flag], out_json, "share_template")
