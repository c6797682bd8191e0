"""Benchmark: the studio trainer against a diffusers-style training loop, per memory tier; generation.

For each memory tier and resolution it prints, measured side by side in one run:

* seconds per optimiser step (batch 1 x accumulation 4) and peak GPU memory of
  - a loop written the way diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` (and
    ``..._sd3.py``) trains: reference VAE-encoded every step, ``t`` drawn on the scheduler's
    1000-step grid and looked up with ``nonzero()``, loss read with ``.item()`` every micro-step,
    AdamW + gradient clipping, LoRA weights in the model's dtype; same LoRA targets, rank and size;
  - the smallest loop that trains the same LoRA (cached inputs, no logging): a lower bound;
  - the studio trainer (``studio.engine.training.train``), and with ``--compile`` the same with each
    transformer block compiled (``torch.compile``, regional);
  - the diffusers-style loop again, to expose drift (thermal, clocks, caches);
  the ratio to the diffusers-style loop, the expected peak from ``studio.engine.memory``, and the
  arithmetic floor: FLOPs per optimiser step (counted with ``torch.utils.flop_counter`` on the
  real model) divided by the measured matmul rate of this device;
* the paper's recipe wall time (300 steps x 4, plus the previews the studio renders);
* generation on the warm pipeline: seconds per image at 28 steps (and its floor), and LoRA swap
  times (``load_lora_weights`` / ``set_adapters`` / ``delete_adapters``) against reloading the
  base pipeline.

    python benchmarks/bench_train.py                                  # tiny backbone on the CPU
    python benchmarks/bench_train.py --arch flux-dev                  # full-size FLUX.1-dev (GPU): 512, 1024, all tiers
    python benchmarks/bench_train.py --arch sd3.5-large --tier nf4    # one tier
    python benchmarks/bench_train.py --arch flux-dev --smoke          # the full-size code paths on a CPU

Full-size architectures are built from their configs with random weights (no download): the
transformer and VAE at their real sizes, the text encoders shrunk to one layer with the real
output widths (they run once before the loop and then leave the GPU, so they do not change the
per-step numbers). ``--smoke`` keeps every width but one block of each kind, a short text and a
small image, so a CPU can run every code path in minutes; its timings mean nothing.
Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402

from studio.engine import memory
from studio.engine.memory import FLUX_DEV_TRANSFORMER, SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, VAE_16CH
from studio.engine.recipe import Recipe
from studio.engine.training import Observer, TrainRequest, prepare_run, preview_prompts, train
from studio.errors import InsufficientMemoryError

PAPER_STEPS, PAPER_PREVIEW_EVERY = 300, 50


def build_random_pipeline(arch: str, folder: Path, smoke: bool = False) -> Path:
    """Save a random-weight pipeline of a full-size architecture (see module docstring).

    ``smoke`` keeps every width but only one block of each kind, to check the plumbing on a CPU.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from studio.engine.backbones.tiny import build_clip_tokenizer, build_t5_tokenizer

    torch.manual_seed(0)
    tok, tok2 = build_clip_tokenizer(), build_t5_tokenizer()
    tok2.model_max_length = 512
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=4096, d_kv=64, d_ff=1024, num_layers=1,
                                 num_heads=4))
    if arch == "flux-dev":
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=256, num_hidden_layers=1,
                                            num_attention_heads=4, vocab_size=len(tok), projection_dim=768, **ids))
        vae = AutoencoderKL(**VAE_16CH, shift_factor=0.1159, scaling_factor=0.3611)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            cfg = {**FLUX_DEV_TRANSFORMER, **({"num_layers": 1, "num_single_layers": 1} if smoke else {})}
            transformer = FluxTransformer2DModel(**cfg).to(torch.bfloat16)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                            tokenizer_2=tok2, transformer=transformer)
    else:
        cfg = SD35_LARGE_TRANSFORMER if arch == "sd3.5-large" else SD35_MEDIUM_TRANSFORMER
        if smoke:
            cfg = {**cfg, "num_layers": 2, "dual_attention_layers": (0,) if "dual_attention_layers" in cfg else ()}

        def clip_with_projection(hidden: int):
            return CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=hidden, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(tok), projection_dim=hidden, **ids))

        vae = AutoencoderKL(**VAE_16CH, shift_factor=0.0609, scaling_factor=1.5305)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            transformer = SD3Transformer2DModel(**cfg).to(torch.bfloat16)
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_with_projection(768),
            tokenizer=tok, text_encoder_2=clip_with_projection(1280), tokenizer_2=tok,
            text_encoder_3=t5, tokenizer_3=tok2, transformer=transformer)
    pipe.save_pretrained(folder / "pipe")
    del pipe, transformer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder / "pipe"


# -- measuring -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def read_peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0


class PhaseMeter:
    """Peak device memory per named phase of a loop, measured the same way for every loop.

    ``mark(name)`` closes the phase that ran since the previous mark, records its peak allocated and
    peak reserved bytes (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) under ``name``
    (``None``: not recorded) and resets the peak counters for the next phase. A phase marked more
    than once (every training step) keeps its largest peak. On a CPU nothing is measured: a recorded
    phase reads ``(0, 0)``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, tuple[int, int]] = {}

    def mark(self, name: str | None) -> None:
        if self.device.type != "cuda":
            if name is not None:
                self.peaks.setdefault(name, (0, 0))
            return
        torch.cuda.synchronize()
        if name is not None:
            allocated, reserved = self.peaks.get(name, (0, 0))
            self.peaks[name] = (max(allocated, int(torch.cuda.max_memory_allocated())),
                                max(reserved, int(torch.cuda.max_memory_reserved())))
        torch.cuda.reset_peak_memory_stats()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device in the training dtype (the floor's denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class Timer(Observer):
    """Seconds per step, and the peak memory of the training loop read at each step's end: the same
    point where the other loops read theirs (before the job's clean-up brings the encoders back)."""

    def __init__(self, device: torch.device):
        self.times: list[float] = []
        self.device = device
        self.peak = 0

    def on_step(self, report):
        self.times.append(report.sec_per_step)  # the trainer syncs once per step when it reads the loss
        self.peak = max(self.peak, read_peak(self.device))


def add_lora(backbone, recipe: Recipe, name: str, dtype: torch.dtype | None = torch.float32) -> list:
    transformer = backbone.transformer
    transformer.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
                                       target_modules=list(backbone.lora_targets)), adapter_name=name)
    transformer.set_adapter(name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        if dtype is not None:
            p.data = p.data.to(dtype)
        p.requires_grad_(True)
    return params


def checkpointing_on(backbone) -> bool:
    return backbone.device.type == "cuda"


def bare_loop(backbone, image: Image.Image, prompt: str, recipe: Recipe, steps: int) -> tuple[list[float], int]:
    """The smallest loop that trains the same LoRA: cached inputs, sample t, MSE, Adam."""
    transformer, device = backbone.transformer, backbone.device
    cond = backbone.encode_prompts([prompt])[0]
    latent = backbone.encode_images([image])[0]
    backbone.offload_encoders()
    params = add_lora(backbone, recipe, "bare")
    on_gpu = device.type == "cuda"
    if checkpointing_on(backbone):
        transformer.enable_gradient_checkpointing()
    reset_peak(device)
    opt = torch.optim.Adam(params, lr=recipe.lr)
    sampler = recipe.noise_sampler(backbone.family)
    times = []
    transformer.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        for _ in range(recipe.grad_accum):
            x0 = latent.mean
            t = sampler.sample(1).to(device)
            eps = torch.randn_like(x0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                pred = backbone.predict_velocity((1 - t) * x0 + t * eps, t, cond, 1.0)
            loss = F.mse_loss(pred.float(), (eps - x0).float()) / recipe.grad_accum
            loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = read_peak(device)
    finish_loop(backbone, "bare")
    return times, peak


def finish_loop(backbone, adapter: str) -> None:
    transformer = backbone.transformer
    if checkpointing_on(backbone):
        transformer.disable_gradient_checkpointing()
    transformer.eval()
    transformer.delete_adapters([adapter])
    backbone.restore_encoders()
    if backbone.device.type == "cuda":
        torch.cuda.empty_cache()


def diffusers_style_loop(backbone, image: Image.Image, prompt: str, recipe: Recipe,
                         steps: int, phases: PhaseMeter | None = None) -> tuple[list[float], int]:
    """The training loop of diffusers' train_dreambooth_lora_flux.py / _sd3.py, same LoRA and size.

    What it keeps from those scripts (diffusers 0.3x-0.4x, default arguments): prompt embeddings
    computed once and the text encoders moved away; the reference VAE-encoded at every step
    (``--cache_latents`` is off by default); ``u ~ U(0, 1)`` (``weighting_scheme="none"``) indexing
    the scheduler's 1000 shifted time steps, the sigma looked up with ``nonzero().item()``; FLUX's
    latent ids rebuilt every step; the loss read with ``.item()`` for the progress bar at every
    micro-step; AdamW (weight decay 1e-4) with gradient clipping at 1.0; LoRA weights in the
    model's dtype (the scripts upcast them only for fp16); bf16 autocast, gradient checkpointing.
    ``phases`` (optional) gets the peaks of its phases: ``encode`` (the prompt), ``train`` (LoRA and
    steps) and ``end_of_job`` (adapter removed, text encoders back).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from studio.engine.backbones.flux import unpack

    transformer, device, family = backbone.transformer, backbone.device, backbone.family
    if phases:
        phases.mark(None)
    cond = backbone.encode_prompts([prompt])[0]
    if phases:
        phases.mark("encode")
    backbone.offload_encoders()
    vae = backbone.pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    import numpy as np

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backbone.pipe.scheduler.config)
    weight_dtype = transformer.dtype
    params = add_lora(backbone, recipe, "diffusers", dtype=None if device.type == "cuda" else torch.float32)
    on_gpu = device.type == "cuda"
    if checkpointing_on(backbone):
        transformer.enable_gradient_checkpointing()
    reset_peak(device)
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    times, losses = [], []
    transformer.train()

    def get_sigmas(timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        schedule = scheduler.timesteps.to(device)
        timesteps = timesteps.to(device)
        indices = [(schedule == t).nonzero().item() for t in timesteps]
        return sigmas[indices].flatten().view(-1, 1, 1, 1)

    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(recipe.grad_accum):
            with torch.no_grad():
                x0 = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample()
                x0 = ((x0 - shift) * scale).to(weight_dtype)
            noise = torch.randn_like(x0)
            u = torch.rand(1, device="cpu")
            indices = (u * scheduler.config.num_train_timesteps).long()
            timesteps = scheduler.timesteps[indices].to(device=device)
            sigmas = get_sigmas(timesteps).to(x0.dtype)
            noisy = (1.0 - sigmas) * x0 + sigmas * noise
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                if family == "flux":
                    b, c, h, w = noisy.shape
                    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
                    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, weight_dtype)
                    guidance = (torch.tensor([recipe.train_guidance], device=device)
                                if transformer.config.guidance_embeds else None)
                    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                       pooled_projections=cond["pooled_prompt_embeds"],
                                       encoder_hidden_states=cond["prompt_embeds"], txt_ids=cond["text_ids"],
                                       img_ids=img_ids, return_dict=False)[0]
                    pred = unpack(pred, c, h, w)
                else:
                    pred = transformer(hidden_states=noisy, timestep=timesteps,
                                       encoder_hidden_states=cond["prompt_embeds"],
                                       pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
            target = noise - x0
            loss = torch.mean(((pred.float() - target.float()) ** 2).reshape(1, -1), 1).mean()
            (loss / recipe.grad_accum).backward()  # accelerator.backward divides by the accumulation
            losses.append(loss.detach().item())  # progress_bar.set_postfix(loss=...) at every micro-step
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = read_peak(device)
    if phases:
        phases.mark("train")
    finish_loop(backbone, "diffusers")
    if phases:
        phases.mark("end_of_job")
    return times, peak


def studio_loop(backbone, image: Image.Image, prompt: str, recipe: Recipe, steps: int,
                tmp: Path, micro_batch: int = 1) -> tuple[list[float], int, Path]:
    """The studio trainer; ``micro_batch`` samples per forward pass (1: accumulation, like the other loops)."""
    run_dir = tmp / f"run-{time.time_ns()}"
    recipe = Recipe(**{**recipe.to_dict(), "steps": steps, "preview_every": 0, "checkpoint_every": 0,
                       "micro_batch": micro_batch})
    prepare_run(TrainRequest([image], prompt, "bench", recipe), run_dir, backbone.backbone_id, backbone.family,
                recipe.resolution)
    timer = Timer(backbone.device)
    reset_peak(backbone.device)
    result = train(backbone, run_dir, timer)
    return timer.times, timer.peak, result


def compile_blocks(backbone, **options) -> None:
    """Regional compilation: each transformer block on its own (short compile, same graph for all blocks).

    ``options`` go to ``Module.compile`` (e.g. ``backend="eager"`` to check the code path on a CPU).
    """
    transformer = backbone.transformer
    for blocks in (transformer.transformer_blocks, getattr(transformer, "single_transformer_blocks", [])):
        for block in blocks:
            block.compile(**options)


def step_flops(backbone, image: Image.Image, prompt: str, recipe: Recipe) -> int:
    """FLOPs of one optimiser step of the studio trainer: micro-step forward + backward (with the
    checkpointing recompute when it is on), counted on the real model, times the accumulation."""
    from torch.utils.flop_counter import FlopCounterMode

    from studio.engine.training import flow_matching_loss

    cond = backbone.encode_prompts([prompt])[0]
    latent = backbone.encode_images([image])[0]
    params = add_lora(backbone, recipe, "flops")
    if checkpointing_on(backbone):
        backbone.transformer.enable_gradient_checkpointing()
    backbone.transformer.train()
    generator = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=backbone.device.type == "cuda"):
            loss, _ = flow_matching_loss(backbone, latent, cond, recipe.noise_sampler(backbone.family), generator)
        loss.backward()
    del params
    finish_loop(backbone, "flops")
    return counter.get_total_flops() * recipe.grad_accum


def forward_flops(backbone, cond, negative, size: int) -> int:
    """FLOPs of one denoising step of the pipeline (one transformer forward; two with SD3's CFG)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = backbone.prepare_sampling(cond, seed=0, steps=2, width=size, height=size, negative=negative)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run.velocity(run.latents, run.timesteps[0])
    return counter.get_total_flops()


def generation_bench(backbone, size: int, steps: int, reps: int, lora_dirs: list[Path], reload=None,
                     count_flops: bool = True) -> dict:
    """Seconds per image at ``steps`` on the warm pipeline, and LoRA swap times.

    ``reload`` (optional) reloads the base pipeline and returns its seconds (``reload_pipeline``);
    ``count_flops`` adds ``flops_per_image`` (one more forward, under the FLOP counter).
    """
    from studio.engine.generation import activate_templates

    device = backbone.device
    cond = backbone.encode_prompts(["a wood cabin in watercolor painting style"])[0]
    negative = backbone.encode_prompts([backbone.negative_prompt()])[0] if backbone.negative_prompt() is not None \
        else None
    out: dict = {}
    activate_templates(backbone, [(lora_dirs[0], 1.0)])
    backbone.generate(cond, seed=0, steps=steps, width=size, height=size, negative=negative)  # warm-up
    times = []
    for k in range(reps):
        sync(device)
        t0 = time.perf_counter()
        backbone.generate(cond, seed=k, steps=steps, width=size, height=size, negative=negative)
        sync(device)
        times.append(time.perf_counter() - t0)
    out["s_per_image"] = statistics.median(times)
    if count_flops:
        out["flops_per_image"] = forward_flops(backbone, cond, negative, size) * steps
    activate_templates(backbone, [])
    pipe = backbone.pipe

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    out["load_lora"] = statistics.median(  # pipe.load_lora_weights (the transformer's loader on quanto)
        [timed(lambda: backbone.load_lora(lora_dirs[0], "a"))]
        + [timed(lambda: (pipe.delete_adapters(["a"]), backbone.load_lora(lora_dirs[0], "a"))) for _ in range(2)])
    backbone.load_lora(lora_dirs[1], "b")
    out["set_adapters"] = statistics.median(
        [timed(lambda name=name: pipe.set_adapters([name], adapter_weights=[1.0])) for name in ("a", "b", "a", "b")])
    out["mix_two"] = timed(lambda: pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5]))
    out["delete"] = timed(lambda: pipe.delete_adapters(["a", "b"]))
    if reload is not None:
        out["reload_pipeline"] = reload()
    return out


def second_lora(first: Path, folder: Path) -> Path:
    """Another template-shaped LoRA (same keys, other weights) to swap with."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = load_file(first / "lora.safetensors")
    save_file({k: (-v if "lora_B" in k else v) for k, v in weights.items()}, folder / "lora.safetensors")
    return folder


# -- the run ------------------------------------------------------------------------------------------


def training_rows(backbone, image: Image.Image, prompt: str, recipe: Recipe, n: int, warmup: int, compiled: bool,
                  tmp: Path) -> tuple[list[tuple[str, float, int]], Path]:
    """(label, median s / step, peak bytes) per loop, run one after the other; and the studio's template."""
    caption = f"an image in {prompt} style"  # what the studio trains on without captions
    runs = [("diffusers-style loop", lambda: diffusers_style_loop(backbone, image, caption, recipe, n)),
            ("bare loop (lower bound)", lambda: bare_loop(backbone, image, caption, recipe, n)),
            ("studio trainer", lambda: studio_loop(backbone, image, prompt, recipe, n, tmp)),
            (f"studio trainer, {recipe.grad_accum} samples per pass",
             lambda: studio_loop(backbone, image, prompt, recipe, n, tmp, micro_batch=recipe.grad_accum)),
            ("diffusers-style loop (again)", lambda: diffusers_style_loop(backbone, image, caption, recipe, n))]
    if compiled:  # last: compiled blocks stay compiled for whatever runs after them
        def compiled_run():
            compile_blocks(backbone)
            return studio_loop(backbone, image, prompt, recipe, n, tmp)

        runs.append(("studio trainer + compiled blocks", compiled_run))
    rows, result = [], None
    for label, fn in runs:
        out = fn()
        if label == "studio trainer":
            result = out[2]
        rows.append((label, statistics.median(out[0][warmup:]), out[1]))
    return rows, result


def fmt_s(seconds: float) -> str:
    return f"{seconds:.4f}" if seconds < 10 else f"{seconds:.1f}"


def fmt_flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def fmt_gb(n: int) -> str:
    return f"{n / 2**30:.2f}" if n else "n/a (CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "flux-dev", "sd3.5-large", "sd3.5-medium"])
    parser.add_argument("--tier", default=None,
                        help="comma-separated memory tiers (bf16,fp8,int8,nf4; default: all on a GPU, bf16 on a CPU)")
    parser.add_argument("--resolution", default=None, help="comma-separated sizes (default 512,1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimiser steps per loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--gen-steps", type=int, default=28, help="denoising steps per image (paper: 28)")
    parser.add_argument("--gen-reps", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add a row: the studio trainer, blocks compiled")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="one block per kind, short text, small image: check the full-size code paths on a CPU")
    args = parser.parse_args()

    from studio.engine.backbones import load_backbone
    from studio.engine.backbones.flux import FluxBackbone
    from studio.engine.backbones.sd3 import SD3Backbone

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    tiers = (args.tier or ("bf16,fp8,int8,nf4" if on_gpu else "bf16")).split(",")
    if args.arch == "tiny":
        sizes = [int(r) for r in (args.resolution or "64").split(",")]
        from studio.engine.backbones.tiny import ensure_tiny_flux

        steps, reps, folder = args.steps or 30, args.gen_reps or 5, None
        arch_name = str(ensure_tiny_flux())
    else:
        sizes = [int(r) for r in (args.resolution or ("128" if args.smoke else "512,1024")).split(",")]
        steps, reps = args.steps or (1 if args.smoke else 10), args.gen_reps or (1 if args.smoke else 3)
        folder = build_random_pipeline(args.arch, tmp, smoke=args.smoke)
        arch_name = str(folder) if args.smoke else args.arch
    gpu_bytes, ram_bytes = memory.detect_memory()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rate = 0.0  # measured after the first load: loading tiny sets the CPU thread count the runs use

    def load(tier: str, plan):
        if args.arch == "tiny":
            return load_backbone("tiny", tier=tier)
        cls = FluxBackbone if args.arch == "flux-dev" else SD3Backbone
        backbone = cls.load(args.arch + "-random", str(folder), tier=tier,
                            text_encoder_placement=plan.text_encoder_placement if plan else None)
        if args.smoke:
            backbone.max_sequence_length = 32  # a short prompt: the smoke run checks code paths, not speed
        return backbone

    prompt = "watercolor painting"
    for tier in tiers:
        try:
            plans = {size: memory.choose_tier(gpu_bytes, ram_bytes, arch_name, size, tier,
                                              rank=args.rank) for size in sizes}
        except InsufficientMemoryError as exc:
            print(f"\n## tier {tier}: does not fit ({exc})")
            continue
        t0 = time.perf_counter()
        backbone = load(tier, plans[sizes[0]])
        load_s = time.perf_counter() - t0
        if not rate:
            rate = matmul_rate(device, dtype)
            machine = (f"{torch.cuda.get_device_name()} ({gpu_bytes / 2**30:.0f} GiB)" if on_gpu else
                       f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} torch threads)")
            print(f"# {args.arch}{' (smoke: one block per kind, 32 text tokens)' if args.smoke else ''} - "
                  f"{datetime.date.today().isoformat()}, {machine}, RAM {ram_bytes / 2**30:.0f} GiB, "
                  f"torch {torch.__version__}, matmul rate {rate / 1e12:.3f} TFLOP/s ({str(dtype).split('.')[-1]})")
        print(f"\n## tier {tier} ({memory.TIERS[tier].title}; backend {backbone.quant_backend or 'none'}), "
              f"loaded in {load_s:.1f} s")
        for size in sizes:
            plan = plans[size]
            recipe = Recipe(rank=args.rank, resolution=size, grad_accum=args.grad_accum)
            image = Image.new("RGB", (size, size), (200, 80, 40))
            n = args.warmup + steps
            flops = step_flops(backbone, image, f"an image in {prompt} style", recipe)
            floor = flops / rate
            rows, result = training_rows(backbone, image, prompt, recipe, n, args.warmup, args.compile, tmp)
            reference = statistics.mean(sec for label, sec, _ in rows if label.startswith("diffusers-style"))
            print(f"\n### {size}x{size}, LoRA rank {args.rank}, batch 1 x accumulation {recipe.grad_accum}, "
                  f"{steps} timed steps (median of each loop)\n")
            where = f"GPU memory, {plan.placement.title}" if plan.on_gpu else "host memory"
            print(f"expected peak (studio.engine.memory): {plan.peak_bytes / 2**30:.2f} GiB {where}; "
                  f"FLOPs per optimiser step {fmt_flops(flops)} -> floor {fmt_s(floor)} s\n")
            print("| loop | s / optimiser step | ratio to diffusers-style | x floor | peak GPU memory (GiB) |")
            print("|---|---|---|---|---|")
            for label, sec, peak in rows:
                print(f"| {label} | {fmt_s(sec)} | {sec / reference:.2f} | {sec / floor:.1f} | {fmt_gb(peak)} |")
            gen = None
            if not args.no_generate and result is not None:
                lora_b = second_lora(result, tmp / f"lora-b-{size}")

                def reload(tier=tier, plan=plan) -> float:
                    sync(device)
                    t0 = time.perf_counter()
                    fresh = load(tier, plan)
                    sync(device)
                    elapsed = time.perf_counter() - t0
                    del fresh
                    if on_gpu:
                        torch.cuda.empty_cache()
                    return elapsed

                gen = generation_bench(backbone, size, args.gen_steps, reps, [result, lora_b], reload)
            studio_step = rows[2][1]
            previews = len(range(0, PAPER_STEPS + 1, PAPER_PREVIEW_EVERY)) * len(preview_prompts(Recipe()))
            preview_s = previews * gen["s_per_image"] if gen else 0.0
            print(f"\npaper recipe ({PAPER_STEPS} steps x {recipe.grad_accum}) wall time at these speeds: "
                  f"studio {(studio_step * PAPER_STEPS + preview_s) / 60:.1f} min "
                  f"(of which {previews} previews {preview_s / 60:.1f} min), diffusers-style "
                  f"{reference * PAPER_STEPS / 60:.1f} min (no previews), floor {floor * PAPER_STEPS / 60:.1f} min")
            if gen:
                gen_floor = gen["flops_per_image"] / rate
                print(f"\ngeneration, warm pipeline, {args.gen_steps} steps at {size}x{size}, median of {reps}:\n")
                print("| what | seconds |")
                print("|---|---|")
                print(f"| one image ({fmt_flops(gen['flops_per_image'])}; floor {fmt_s(gen_floor)} s) | "
                      f"{fmt_s(gen['s_per_image'])} |")
                print(f"| load a template LoRA (load_lora_weights) | {fmt_s(gen['load_lora'])} |")
                print(f"| switch between two loaded LoRAs (set_adapters) | {fmt_s(gen['set_adapters'])} |")
                print(f"| mix two LoRAs (set_adapters with weights) | {fmt_s(gen['mix_two'])} |")
                print(f"| unload both (delete_adapters) | {fmt_s(gen['delete'])} |")
                print(f"| instead: reload the base pipeline (from_pretrained + to device) | "
                      f"{fmt_s(gen['reload_pipeline'])} |")
        backbone = None
        if on_gpu:
            torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
