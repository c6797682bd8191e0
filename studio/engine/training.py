"""Fine-tune a style LoRA with the Style-friendly SNR sampler.

Read top to bottom: prepare the run folder (normalised references, request), encode the
prompts and reference latents once, attach the LoRA, then loop over optimiser steps. Each
micro-step draws ``t`` from the recipe's sampler, noises a reference latent
``x_t = (1 - t) x_0 + t eps`` and regresses the transformer's velocity on ``eps - x_0``
(plain MSE: no weighting, no preconditioning). Every step is reported to an observer;
previews and checkpoints are written every N steps, and a resumed run repeats the
uninterrupted one because every random draw is seeded from (seed, step).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from studio import diskspace
from studio.engine import snr
from studio.engine.backbones import clean
from studio.engine.backbones.base import Backbone, LatentDist, host_to_device
from studio.engine.checkpoints import (  # noqa: F401 (ADAPTER, write_json: used by the worker and generation)
    ADAPTER,
    checkpoint_folder,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
    write_json,
)
from studio.engine.noise_prior import NoisePrior, compute_prior, start_latents
from studio.engine.recipe import Recipe
from studio.errors import CancelledError, NotFoundError, StudioError
from studio.media.images import fit_to_budget, make_thumbnail

# A few of the paper's evaluation prompts (appendix C.2), wrapped in the style prompt.
PREVIEW_PROMPTS = ("A friendly robot", "A baby penguin", "An espresso machine")
PREVIEW_SEED = 1234


@dataclass
class TrainRequest:
    """What the user asked for: references, style prompt, template name and recipe."""

    images: list[Image.Image]
    style_prompt: str
    name: str
    recipe: Recipe = field(default_factory=Recipe)
    captions: list[str | None] | None = None  # optional content caption per reference image
    # A refined template (studio.styles.refine): parent id, round, and the synthetic images, which are the
    # last len(lineage["synthetic"]) of ``images``.
    lineage: dict | None = None


@dataclass
class StepReport:
    """Progress after one optimiser step, handed to the observer and written to metrics.jsonl."""

    step: int
    total: int
    loss: float
    t: list[float]
    lr: float
    sec_per_step: float
    eta_s: float
    peak_mem: int  # bytes: GPU peak on CUDA, process peak RSS on the CPU


class NonFiniteLossError(StudioError):
    """The loss became NaN or infinite: the run stops (failed) before the LoRA or a checkpoint is spoiled."""


class Observer:
    """Receives training progress. Subclass and override what you need."""

    def on_step(self, report: StepReport) -> None: ...

    def on_preview(self, step: int, files: list[Path]) -> None: ...

    def on_checkpoint(self, step: int) -> None: ...

    def should_stop(self) -> bool:
        return False


def style_caption(content: str, style_prompt: str) -> str:
    """The paper's prompt template: ``"{content} in {style prompt} style"``."""
    return f"{content} in {style_prompt} style"


def preview_prompts(recipe: Recipe) -> list[str]:
    """Content prompts previewed during training: the user's own (``preview_prompts``, else the paper's
    three), with the extra ``preview_prompt`` first."""
    extra = [recipe.preview_prompt] if recipe.preview_prompt else []
    return list(dict.fromkeys(extra + list(recipe.preview_prompts or PREVIEW_PROMPTS)))


def prepare_run(request: TrainRequest, run_dir: Path, backbone_id: str, family: str,
                default_resolution: int) -> None:
    """Write the normalised references and the request into ``run_dir`` (once per run)."""
    if (run_dir / "request.json").exists():
        return
    recipe = request.recipe
    resolution = recipe.resolution or default_resolution
    refs = run_dir / "references"
    refs.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(request.images):
        name = f"ref_{i:02d}.png"
        fit_to_budget(img, resolution).save(refs / name)
        names.append(name)
    data = {
        "name": request.name,
        "style_prompt": request.style_prompt,
        "backbone": backbone_id,
        "family": family,
        "recipe": {**recipe.to_dict(), "resolution": resolution},
        "captions": request.captions or [None] * len(names),
        "references": names,
    }
    if request.lineage:
        synthetic = request.lineage.get("synthetic") or []
        first = len(names) - len(synthetic)
        data["lineage"] = {**request.lineage, "synthetic": [{**entry, "file": f"references/{names[first + j]}"}
                                                            for j, entry in enumerate(synthetic)]}
    write_json(run_dir / "request.json", data)


def train(backbone: Backbone, run_dir: Path, observer: Observer | None = None, micro_batch: int | None = None,
          ) -> Path:
    """Run (or resume) the training described by ``run_dir/request.json``.

    ``micro_batch``: samples per forward pass the memory plan allows on a GPU
    (:attr:`studio.engine.memory.MemoryPlan.micro_batch`); the recipe's own ``micro_batch`` wins.

    Returns ``run_dir/result``: a complete template folder ready for the store.
    Raises :class:`CancelledError` if the observer asks to stop (the last checkpoint stays).
    """
    observer = observer or Observer()
    request = json.loads((run_dir / "request.json").read_text())
    recipe = Recipe.from_dict(request["recipe"])
    sampler = recipe.noise_sampler(backbone.family)
    try:
        return _train(backbone, run_dir, observer, request, recipe, sampler, micro_batch)
    except BaseException as exc:
        # The frames of a failed step hold the optimiser, the gradients and the activations; free
        # them before the text encoders come back below, or both would be on the GPU at once.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        # Whatever happened (done, cancelled, an error inside peft or a step), the warm model goes
        # back to how it was loaded: no LoRA or peft state, no checkpointing, encoders back in place
        # (the LoRA's memory is released before the encoders return: no end-of-job spike).
        clean.restore(backbone)
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()


def result_from_checkpoint(backbone: Backbone, run_dir: Path) -> Path:
    """Make ``run_dir/result`` from the run's last checkpoint, without training further.

    For a cancelled or failed run whose checkpoint is worth keeping: the template holds the LoRA as
    it was at that step (``steps_done``), with the previews drawn up to then. NotFoundError when the
    run has no checkpoint.
    """
    request = json.loads((run_dir / "request.json").read_text())
    recipe = Recipe.from_dict(request["recipe"])
    folder = checkpoint_folder(run_dir)
    if folder is None:
        raise NotFoundError("this run has no checkpoint yet (one is written every "
                            f"{recipe.checkpoint_every} steps); train again instead")
    step = int(json.loads((folder / "state.json").read_text())["step"])
    try:
        attach_lora(backbone, recipe)
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(backbone.transformer, load_file(folder / "lora.safetensors"), adapter_name=ADAPTER)
        # metrics and previews after the checkpoint belong to steps the template does not hold
        truncate_metrics(run_dir / "metrics.jsonl", step)
        return write_result(backbone, run_dir, request, recipe, recipe.noise_sampler(backbone.family),
                            _prior_of(backbone, run_dir, request, recipe), steps_done=step)
    finally:
        clean.restore(backbone)


def _prior_of(backbone: Backbone, run_dir: Path, request: dict, recipe: Recipe) -> NoisePrior | None:
    """The run's style noise prior again (deterministic in the references), if the recipe learns one."""
    if not recipe.noise_prior:
        return None
    images = [Image.open(run_dir / "references" / n).convert("RGB") for n in request["references"]]
    return compute_prior([lat.mean for lat in backbone.encode_images(images)])


def _train(backbone: Backbone, run_dir: Path, observer: Observer, request: dict, recipe: Recipe,
           sampler: snr.NoiseSampler, planned_batch: int | None = None) -> Path:
    """The body of :func:`train`; the caller restores the model whatever happens here."""
    transformer = backbone.transformer

    # 1. Encode everything once: prompts (training + previews) and reference latents.
    images = [Image.open(run_dir / "references" / n).convert("RGB") for n in request["references"]]
    style = request["style_prompt"]
    train_prompts = [style_caption(c or recipe.default_content, style) for c in request["captions"]]
    preview_texts = [style_caption(p, style) for p in preview_prompts(recipe)]
    conds = backbone.encode_prompts(train_prompts + preview_texts)
    train_conds, preview_conds = conds[: len(train_prompts)], conds[len(train_prompts):]
    negative = None
    if backbone.negative_prompt() is not None:
        negative = backbone.encode_prompts([backbone.negative_prompt()])[0]
    latents = backbone.encode_images(images)
    backbone.offload_encoders()  # the text encoders are not needed any more (the VAE stays for previews)
    # Diffusion in Style: the forward-process noise comes from the references' statistics.
    # Deterministic in the references, so a resumed run computes the same prior again.
    prior = compute_prior([lat.mean for lat in latents]) if recipe.noise_prior else None

    # 2. Attach the LoRA (paper: rank 32, alpha = rank, gaussian init, transformer only).
    params = attach_lora(backbone, recipe)
    check_training_space(run_dir, request, recipe, sum(p.numel() for p in params))
    optimizer = torch.optim.Adam(params, lr=recipe.lr)
    del params  # the optimiser holds them; no other reference outlives the job
    on_gpu = backbone.device.type == "cuda"
    checkpointing = on_gpu if recipe.gradient_checkpointing is None else recipe.gradient_checkpointing
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    if recipe.compile_blocks:
        compile_blocks(transformer)
    autocast = torch.autocast("cuda", dtype=backbone.dtype, enabled=on_gpu and backbone.dtype != torch.float32)
    # fp16 (cards without bf16) overflows where bf16 does not: scale the loss, and skip a step whose
    # gradients overflowed. The LoRA weights are fp32, so unscaling is exact. Off for bf16 / fp32.
    scaler = torch.amp.GradScaler(backbone.device.type, enabled=backbone.dtype == torch.float16)
    micro_batch = micro_batch_size(recipe, backbone, planned_batch)

    start = load_checkpoint(run_dir, transformer, optimizer)
    metrics_path = run_dir / "metrics.jsonl"
    truncate_metrics(metrics_path, start)
    resolution = request["recipe"]["resolution"]
    preview = PreviewWriter(backbone, run_dir / "previews", preview_conds, negative, resolution,
                            recipe.preview_steps, prior, should_stop=observer.should_stop)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    transformer.eval()
    if start == 0 and recipe.preview_every:
        observer.on_preview(0, preview.write(0))  # the base model, before any training
    transformer.train()
    loop_start, steps_this_session = time.perf_counter(), 0
    for step in range(start + 1, recipe.steps + 1):
        if observer.should_stop():
            raise CancelledError(f"cancelled at step {step - 1} of {recipe.steps}")
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, ts = torch.zeros((), device=backbone.device), []
        indices = [(step * recipe.grad_accum + micro) % len(latents) for micro in range(recipe.grad_accum)]
        for chunk in micro_batches(indices, latents, micro_batch):
            with autocast:
                loss, t = flow_matching_loss(backbone, [latents[i] for i in chunk], [train_conds[i] for i in chunk],
                                             sampler, generator, recipe.offset_noise, recipe.train_guidance, prior)
            # ``loss`` is the chunk's mean: weighted by its size, the gradient equals accumulation's
            scaler.scale(loss * (len(chunk) / recipe.grad_accum)).backward()
            loss_sum += loss.detach() * len(chunk)  # summed on the device: one sync per step, not per micro-step
            ts.extend(t.tolist())  # t was drawn on the host: no sync
        step_loss = loss_sum.item() / recipe.grad_accum
        if not math.isfinite(step_loss):  # before the optimiser step: the LoRA and checkpoint stay finite
            raise NonFiniteLossError(
                f"training stopped at step {step} of {recipe.steps}: the loss became "
                f"{'NaN' if math.isnan(step_loss) else 'infinite'}; try a lower learning rate "
                f"(this run: {recipe.lr:g}) or the default sampler settings")
        scaler.step(optimizer)
        scaler.update()

        steps_this_session += 1
        elapsed = time.perf_counter() - loop_start
        report = StepReport(
            step=step, total=recipe.steps, loss=step_loss, t=ts, lr=recipe.lr,
            sec_per_step=time.perf_counter() - t0,
            eta_s=elapsed / steps_this_session * (recipe.steps - step),
            peak_mem=peak_memory(on_gpu),
        )
        with metrics_path.open("a") as f:
            f.write(json.dumps(asdict(report)) + "\n")
        observer.on_step(report)
        if recipe.preview_every and (step % recipe.preview_every == 0 or step == recipe.steps):
            transformer.eval()
            observer.on_preview(step, preview.write(step))
            transformer.train()
        if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < recipe.steps:
            save_checkpoint(run_dir, transformer, optimizer, step)
            observer.on_checkpoint(step)
    return write_result(backbone, run_dir, request, recipe, sampler, prior)


def attach_lora(backbone: Backbone, recipe: Recipe) -> list[torch.nn.Parameter]:
    """Add a fresh trainable LoRA on the backbone's paper targets; return its parameters."""
    detach_lora(backbone)
    transformer = backbone.transformer
    torch.manual_seed(recipe.seed)  # gaussian init of lora_A is drawn from the global RNG
    from peft import LoraConfig  # here, not at the top: the web process imports this module, never peft

    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.lora_alpha, init_lora_weights="gaussian",
                        target_modules=list(backbone.lora_targets))
    transformer.add_adapter(config, adapter_name=ADAPTER)
    transformer.set_adapter(ADAPTER)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:  # LoRA weights train in fp32 even when the base model is bf16
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def flow_matching_loss(backbone: Backbone, latent: LatentDist | list[LatentDist], cond, sampler: snr.NoiseSampler,
                       generator: torch.Generator, offset_noise: float = 0.0,
                       guidance: float = 1.0, noise_prior: NoisePrior | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss ``|| (eps - x0) - v(x_t, t) ||^2`` (paper Eq. 3) and the host tensor of ``t``.

    One sample, or a batch (lists of latents and conditionings of the same latent shape): then
    the loss is the mean of the samples' losses, each drawn exactly as it would be alone.
    Draw order (x0, t, eps per sample) is fixed so a seeded generator reproduces the exact
    samples whichever way they are batched. With a style ``noise_prior`` eps is ``mean + std * z``
    instead of ``z`` (same draws), and the target stays ``eps - x0`` with that eps.
    """
    latents = latent if isinstance(latent, list) else [latent]
    x0s, ts, noises = [], [], []
    for one in latents:
        x0 = one.sample(generator)
        ts.append(sampler.sample(1, generator))
        noise = snr.offset_noise(tuple(x0.shape), offset_noise, generator)
        noises.append(noise_prior.apply(noise) if noise_prior is not None else noise)
        x0s.append(x0)
    x0, t = torch.cat(x0s), torch.cat(ts)
    noise, t_device = host_to_device(torch.cat(noises), x0.device), host_to_device(t, x0.device)  # no GPU sync
    x_t = snr.add_noise(x0, t_device, noise)
    pred = backbone.predict_velocity(x_t, t_device, stack_conds(cond) if isinstance(cond, list) else cond, guidance)
    # Mean over each sample's elements, then over the batch: equal to the mean of the single losses.
    return F.mse_loss(pred.float(), snr.velocity_target(x0, noise).float()), t


def stack_conds(conds: list) -> dict[str, torch.Tensor]:
    """One conditioning for a batch: per-sample tensors (batch dimension 1) joined along it.

    Tensors without a batch dimension (FLUX's text position ids) are shared, and a batch of one
    prompt keeps its batch of 1 (the backbones broadcast it).
    """
    first = conds[0]
    if all(c is first for c in conds):
        return first
    return {key: torch.cat([c[key] for c in conds]) if value.dim() > 1 and value.shape[0] == 1 else value
            for key, value in first.items()}


def micro_batches(indices: list[int], latents: list[LatentDist], size: int) -> list[list[int]]:
    """The optimiser step's samples in forward passes of at most ``size`` consecutive ones.

    Only neighbours with the same latent shape share a pass (references of other aspect ratios
    have other shapes); consecutive, so every sample draws its noise in the same order as in
    plain accumulation and the gradient is the same.
    """
    chunks: list[list[int]] = []
    for i in indices:
        last = chunks[-1] if chunks else None
        if last and len(last) < size and latents[last[0]].mean.shape == latents[i].mean.shape:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


def micro_batch_size(recipe: Recipe, backbone: Backbone, planned: int | None = None) -> int:
    """Samples per forward pass: the recipe's ``micro_batch``; else on a GPU what the memory plan allows
    (one at a time, the paper's accumulation, without a plan), and on a CPU the whole step."""
    if recipe.micro_batch is not None:
        return min(recipe.micro_batch, recipe.grad_accum)
    if backbone.device.type != "cuda":
        return recipe.grad_accum
    return max(1, min(recipe.grad_accum, planned or 1))


def compile_blocks(transformer: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (regional compilation: one block's graph is
    compiled once and reused by its repeats); :func:`studio.engine.backbones.clean.restore` undoes it."""
    backend = os.environ.get("STUDIO_COMPILE_BACKEND") or "inductor"
    for block in clean.transformer_blocks(transformer):
        block.compile(backend=backend, dynamic=False)


@contextmanager
def training_paused(backbone: Backbone):
    """Lets a worker generate between training steps with the warm model, then resumes training.

    Inside the block the transformer is in eval mode and generation may switch adapters (the
    training adapter is never deleted by :func:`studio.engine.generation.activate_templates`); on exit
    the training adapter is the only active one again and trainable.
    """
    transformer = backbone.transformer
    transformer.eval()
    try:
        yield
    finally:
        backbone.pipe.enable_lora()
        transformer.set_adapter(ADAPTER)
        transformer.train()


def detach_lora(backbone: Backbone) -> None:
    """Remove every LoRA adapter (layers and peft state, also half-made ones) from the warm model."""
    clean.remove_adapters(backbone)


def check_training_space(run_dir: Path, request: dict, recipe: Recipe, lora_params: int) -> None:
    """Refuse (:class:`studio.diskspace.DiskFullError`) a run whose checkpoints and result would not fit."""
    previews = 0
    if recipe.preview_every:
        previews = len(preview_prompts(recipe)) * (recipe.steps // recipe.preview_every + 2)
    needed = diskspace.training_bytes(
        lora_params, checkpoints=bool(recipe.checkpoint_every and recipe.checkpoint_every < recipe.steps),
        previews=previews, resolution=int(request["recipe"]["resolution"]),
        references_bytes=diskspace.folder_bytes(run_dir / "references"))
    diskspace.require_free(run_dir, needed, "train (checkpoints and the result)")


def peak_memory(on_gpu: bool) -> int:
    """Peak memory in bytes: allocated GPU memory, or the process's peak RSS on the CPU."""
    if on_gpu:
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class PreviewWriter:
    """Renders the preview prompts at fixed seeds with the LoRA as it currently is.

    With a style noise prior the previews start from it, as the finished template will.
    """

    def __init__(self, backbone: Backbone, folder: Path, conds, negative, resolution: int,
                 steps: int | None, noise_prior: NoisePrior | None = None, should_stop=None):
        self.backbone, self.folder, self.conds, self.negative = backbone, folder, conds, negative
        self.resolution, self.steps, self.noise_prior = resolution, steps, noise_prior
        self.should_stop = should_stop or (lambda: False)
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, step: int) -> list[Path]:
        files = []
        for i, cond in enumerate(self.conds):
            if self.should_stop():  # a cancel waits for one picture at most, not for the whole set
                raise CancelledError(f"cancelled while rendering the previews of step {step}")
            seed, size = PREVIEW_SEED + i, self.resolution
            latents = None
            if self.noise_prior is not None:
                latents = start_latents(self.backbone, self.noise_prior, seed, size, size)
            image = self.backbone.generate(cond, seed=seed, steps=self.steps, width=size, height=size,
                                           negative=self.negative, latents=latents, should_stop=self.should_stop)
            path = self.folder / f"step_{step:04d}_p{i}.png"
            image.save(path.with_suffix(".tmp.png"))
            os.replace(path.with_suffix(".tmp.png"), path)
            files.append(path)
        return files


# -- the result ------------------------------------------------------------------------------


def write_result(backbone: Backbone, run_dir: Path, request: dict, recipe: Recipe,
                 sampler: snr.NoiseSampler, noise_prior: NoisePrior | None = None,
                 steps_done: int | None = None) -> Path:
    """Assemble the finished template folder in ``run_dir/result`` (moved into the store later).

    ``steps_done``: the step the LoRA is at, when it is not the recipe's last (a saved checkpoint).
    """
    steps_done = recipe.steps if steps_done is None else steps_done
    result = run_dir / "result.tmp"
    shutil.rmtree(result, ignore_errors=True)
    result.mkdir()
    transformer = backbone.transformer
    from peft.utils import get_peft_model_state_dict

    lora = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    spoiled = [k for k, v in lora.items() if not bool(torch.isfinite(v).all())]
    if spoiled:  # never hand a NaN template to the store (it refuses one too)
        raise NonFiniteLossError(f"the trained LoRA has NaN/inf values in {len(spoiled)} of {len(lora)} tensors; "
                                 f"nothing was saved; try a lower learning rate (this run: {recipe.lr:g})")
    backbone.pipeline_class.save_lora_weights(
        result, transformer_lora_layers={k: v.detach().float().contiguous() for k, v in lora.items()},
        weight_name="lora.safetensors",
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER].to_dict(),
    )
    shutil.copytree(run_dir / "references", result / "references")
    previews = sorted(p for p in (run_dir / "previews").glob("step_*.png")
                      if int(p.name[5:9]) <= steps_done) if (run_dir / "previews").exists() else []
    if previews:
        (result / "previews").mkdir()
        for p in previews:
            shutil.copy(p, result / "previews" / p.name)
    shutil.copy(run_dir / "metrics.jsonl", result / "metrics.jsonl")
    thumb_source = previews[-1] if previews else result / "references" / request["references"][0]
    make_thumbnail(Image.open(thumb_source).convert("RGB")).save(result / "thumbnail.png")
    meta = {
        "format_version": 1,
        "name": request["name"],
        "style_prompt": request["style_prompt"],
        "backbone": backbone.backbone_id,
        "family": backbone.family,
        "base_model": backbone.source if backbone.backbone_id != "tiny" else "tiny",
        "recipe": request["recipe"],
        "sampler": sampler.describe(),
        "lora_targets": list(backbone.lora_targets),
        "memory_tier": backbone.tier,  # the LoRA loads into the unquantised model whatever the tier
        "steps_done": steps_done,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "references": [f"references/{n}" for n in request["references"]],
        "captions": request["captions"],
        "training_prompts": [style_caption(c or recipe.default_content, request["style_prompt"])
                             for c in request["captions"]],
        "previews": [f"previews/{p.name}" for p in previews],
        "preview_prompts": preview_prompts(recipe),
        "thumbnail": "thumbnail.png",
        "final_loss": last_loss(run_dir / "metrics.jsonl"),
    }
    if noise_prior is not None:
        noise_prior.save(result)
        meta["noise_prior"] = noise_prior.describe()
    lineage = request.get("lineage")
    if lineage:  # a refined template: its synthetic training images are kept, but are not style references
        synthetic = {entry["file"] for entry in lineage.get("synthetic") or []}
        meta["references"] = [r for r in meta["references"] if r not in synthetic]
        meta["parent"], meta["round"] = lineage["parent"], lineage["round"]
        meta["refine"] = {k: v for k, v in lineage.items() if k not in ("parent", "round")}
    write_json(result / "template.json", meta)
    final = run_dir / "result"
    shutil.rmtree(final, ignore_errors=True)
    os.rename(result, final)
    return final


def publish_run(store, result: Path, name: str, job_id: str | None = None):
    """Copy a finished run's ``result`` folder into ``store`` (a TemplateStore) as template ``name``.

    Once per job: a template already carrying this ``job_id`` (published, then the process died
    before recording it) is returned instead of a second copy. The store's file system must have
    room for the copy first (:class:`studio.diskspace.DiskFullError` with the numbers); any
    failure leaves ``result`` where it is and nothing half-copied in the store.
    """
    if job_id:
        for info in store.list():
            if info.meta.get("job_id") == job_id:
                return info
    diskspace.require_free(store.root, diskspace.folder_bytes(result), "save the template")
    staging = store.new_staging()
    try:
        shutil.copytree(result, staging, dirs_exist_ok=True)
        if job_id:
            meta = json.loads((staging / "template.json").read_text())
            write_json(staging / "template.json", {**meta, "job_id": job_id})
        return store.create(staging, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def last_loss(path: Path) -> float | None:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["loss"] if lines else None
