"""The public API for ``gradio_client`` (JSON in, JSON or files out), on invisible components.

The tabs' own events are private; these endpoints are the stable, documented surface:
``/train``, ``/job_status``, ``/cancel``; the Jobs view: ``/jobs``, ``/resume_job``, ``/save_checkpoint``,
``/retry_job``, ``/delete_job``, ``/job_settings``; ``/generation_history``; ``/templates`` (a page),
``/template``, ``/generate``, ``/export_template``, ``/import_template``, ``/import_hub``, ``/rename_template``,
``/delete_template``, ``/share_template``; finding styles: ``/search_templates``, ``/similar_templates``,
``/template_scores``; refining a template (StyleDrop's round 2): ``/refine_candidates``, ``/refine``;
references as a dataset: ``/inspect_references``, ``/auto_caption``, ``/caption_status``, ``/captioner_status``.
Errors come back as ``gr.Error`` with a readable message.
"""

from __future__ import annotations

import gradio as gr

from studio.api import StudioAPI
from studio.ui.common import guard


def build(api: StudioAPI) -> None:
    """Add the API endpoints to the Blocks being built."""
    with gr.Column(visible=False):
        files = gr.File(file_count="multiple", label="images")
        one_file = gr.File(label="file")
        text_a, text_b, text_c, text_d = (gr.Textbox(label=n) for n in ("a", "b", "c", "d"))
        flag = gr.Checkbox(True, label="private")
        count = gr.Number(None, label="k", precision=0)
        threshold = gr.Number(None, label="min_similarity")
        offset, limit = gr.Number(0, label="offset", precision=0), gr.Number(None, label="limit", precision=0)
        options = gr.JSON(label="options")
        out_text, out_json = gr.Textbox(label="result"), gr.JSON(label="result")
        out_file, out_files = gr.File(label="file"), gr.File(file_count="multiple", label="files")
        trigger = gr.Button()

    def endpoint(fn, inputs, output, name, **kw):
        trigger.click(guard(fn), inputs, output, api_name=name, api_visibility="public", **kw)

    def train(images, style_prompt, name=None, options=None):
        """Queue a training: images (1-20 files), style prompt, template name ("" = suggested),
        options (dict: preset, steps, lr, rank, sampler, mu, sigma, resolution, seed, offset_noise,
        noise_prior (true: learn the style's noise prior), preview_every, preview_prompt, preview_prompts (up to 4
        sample prompts), backbone, captions (one per image), crops (one [left, top, right, bottom] or null per
        image), auto_caption (true: caption the uncaptioned images first)).
        Returns the job id."""
        return api.train(images, style_prompt, name, options)

    def job_status(job_id):
        """State of a job: state, step, total_steps, losses, t, previews, queue_position, template_id, error, ..."""
        return api.job_status(job_id)

    def cancel(job_id):
        """Cancel a queued or running job; returns its status."""
        return api.cancel(job_id)

    def jobs(kind=None, limit=None):
        """Jobs newest first (kind: train | generate | "" for all; limit 1-500, default 100): id, kind, state,
        name, step, total_steps, created, started, finished, duration_s, checkpoint_step (last saved step),
        template_id, error, message, queue_position, cancel_requested."""
        return api.jobs_list(kind, limit)

    def resume_job(job_id):
        """Queue a cancelled or failed training again; it goes on from its last checkpoint. Returns its status."""
        return api.resume_job(job_id)

    def save_checkpoint(job_id):
        """Save a cancelled or failed training's last checkpoint as a template (follow /job_status until done:
        its template_id). Returns the job's status."""
        return api.save_checkpoint(job_id)

    def retry_job(job_id):
        """Run an ended job again with the same settings; returns the new job id."""
        return api.retry_job(job_id)

    def delete_job(job_id):
        """Delete an ended job's folder (a template it made stays): {"deleted", "name", "kind", "freed_bytes"}."""
        return api.delete_job(job_id)

    def job_settings(job_id):
        """A training's settings: name, style_prompt, backbone, recipe, captions, references (files)."""
        return api.job_settings(job_id)

    def generation_history(template_id=None, limit=None):
        """Pictures made before, newest first (template_id: only that template's; "" for all; limit 1-200,
        default 24): [{"image" (file), "prompt", "template_id", "job_id", "created"}]."""
        return api.generation_history(template_id, limit)

    def templates(query=None, offset=0, limit=None):
        """One page of templates (newest first), optionally filtered by a search text: {"templates": [id, name,
        style_prompt, backbone, family, created, thumbnail, imported, round, parent], "total", "offset", "limit"}.
        limit: 48 by default, at most 200. Details of one template: /template."""
        return api.templates(query, offset, limit)

    def template(template_id):
        """One template in full: previews, references, preview_prompts, steps, sampler, noise_prior, lineage, ..."""
        return api.template(template_id)

    def generate(template_id, prompt, mode=None, options=None):
        """Generate PNGs: template id ("" = base model), prompt, mode (text-to-image | multi-panel | meme),
        options (dict: lora_scale, seed, steps, guidance, aspect, resolution, width, height, num_images,
        wrap_style; mix ([{"template": id, "scale": 0.5}], more templates on top), style_schedule (0-1: the
        template only in that first fraction of the steps), fusion_weight (0-2: per step base + w * (template -
        base)), noise_prior (true: start from the template's stored noise prior); multi-panel: panels, layout,
        gutter, border, captions, single_shot; meme: top, bottom, meme_style). Returns the image files."""
        return [str(p) for p in api.generate(template_id, prompt, mode or "text-to-image", options)]

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

    def search_templates(query=None, image=None, k=None):
        """Find templates by text (name and style prompt first, then by look in CLIP space) or by an image
        (by look; it wins over the text). k: how many (default 8). Returns {"results": [template +
        "similarity" + "matched"], "mode": "text" | "names" (no metric models) | "image", "note"}."""
        return api.search_templates(query, image, k)

    def similar_templates(images, k=None, min_similarity=None):
        """Templates that look like these images (e.g. references before training): at most k (default 3), at
        least min_similarity (default 0.8) alike, best first. Same shape as /search_templates; without the
        metric models: no results, mode "unavailable" and the reason in "note"."""
        return api.similar_templates(images, k, min_similarity)

    def template_scores(template_id):
        """A template's style scores on its final previews: dino, clip_i (style, against its references),
        clip_t (prompt), n_images, step, per_image; or {"available": false, "reason": ...}."""
        return api.template_scores(template_id)

    def refine_candidates(template_id, n=None, options=None):
        """Candidates to pick favourites from: n pictures (default 8) of different subjects made with the
        template. options: seed, offset, steps, lora_scale, prompts. Returns the PNG files (each carries its
        content prompt); send the favourites back to /refine."""
        return [str(p) for p in api.refine_candidates(template_id, int(n) if n else None, options)]

    def refine(template_id, images=None, feedback=None, options=None):
        """Queue round 2 of a template (a new template linked to it). feedback "human": train on its references
        plus images (your favourite candidates); "auto" (default without images): CLIP makes `candidates` (8)
        and keeps the `top_k` (3) best by style x text score. options: name, captions, candidates, top_k,
        candidate_seed, candidate_steps, prompts, style_metric (clip_i | dino), steps, lr, seed, preview_every.
        Returns the job id (follow it with /job_status)."""
        return api.refine(template_id, images, feedback, options)

    def inspect_references(images, options=None):
        """Check reference files as they will be trained, one tile each: {file, name, ok, error (one line),
        thumbnail, width, height, caption (from a .txt beside it)}. options: resolution, crops ([left, top,
        right, bottom] fractions or null per file). A dataset zip (images + .txt captions) gives one tile per image."""
        return api.inspect_references(images, options)

    def auto_caption(images, style_prompt=None, options=None):
        """Queue auto-captioning (content only: the style prompt's words are removed) of these pictures on the
        worker; options: crops. Returns the job id; follow it with /caption_status, stop it with /cancel."""
        return api.auto_caption(images, style_prompt, options)

    def caption_status(job_id):
        """A caption job: {id, state, message, error, done, total, captions (filled in as it goes)}."""
        return api.caption_status(job_id)

    def captioner_status():
        """Whether auto-captioning can run here: {available, model, size, note (why not / how to get it)}."""
        return api.captioner_status()

    endpoint(train, [files, text_a, text_b, options], out_text, "train")
    endpoint(inspect_references, [files, options], out_json, "inspect_references", concurrency_limit=4)
    endpoint(auto_caption, [files, text_a, options], out_text, "auto_caption")
    endpoint(caption_status, text_a, out_json, "caption_status", concurrency_limit=None)
    endpoint(captioner_status, None, out_json, "captioner_status", concurrency_limit=None)
    endpoint(job_status, text_a, out_json, "job_status", concurrency_limit=None)
    endpoint(cancel, text_a, out_json, "cancel", concurrency_limit=None)
    endpoint(jobs, [text_a, limit], out_json, "jobs", concurrency_limit=None)
    endpoint(generation_history, [text_a, limit], out_json, "generation_history", concurrency_limit=None)
    endpoint(resume_job, text_a, out_json, "resume_job")
    endpoint(save_checkpoint, text_a, out_json, "save_checkpoint")
    endpoint(retry_job, text_a, out_text, "retry_job")
    endpoint(delete_job, text_a, out_json, "delete_job")
    endpoint(job_settings, text_a, out_json, "job_settings", concurrency_limit=None)
    endpoint(templates, [text_a, offset, limit], out_json, "templates", concurrency_limit=None)
    endpoint(template, text_a, out_json, "template", concurrency_limit=None)
    endpoint(generate, [text_a, text_b, text_c, options], out_files, "generate", concurrency_limit=4)
    endpoint(export_template, [text_a, text_b], out_file, "export_template", concurrency_limit=2)
    endpoint(import_template, [one_file, text_a], out_json, "import_template")
    endpoint(import_hub, [text_a, text_b, text_c], out_json, "import_hub")
    endpoint(rename_template, [text_a, text_b], out_json, "rename_template")
    endpoint(delete_template, text_a, out_json, "delete_template")
    endpoint(share_template, [text_a, text_b, text_d, flag], out_json, "share_template")
    endpoint(search_templates, [text_a, one_file, count], out_json, "search_templates", concurrency_limit=2)
    endpoint(similar_templates, [files, count, threshold], out_json, "similar_templates", concurrency_limit=2)
    endpoint(template_scores, text_a, out_json, "template_scores", concurrency_limit=2)
    endpoint(refine_candidates, [text_a, count, options], out_files, "refine_candidates", concurrency_limit=4)
    endpoint(refine, [text_a, files, text_b, options], out_text, "refine")
