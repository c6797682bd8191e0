"""Benchmark: our trainer against a bare training loop on the same backbone and settings.

Prints a table of seconds per optimiser step and peak memory for both, and their ratio,
measured side by side in one run (the bare loop first, then ours, then the bare loop again to
expose drift). Not a test.

    python benchmarks/bench_train.py                      # tiny backbone on the CPU
    python benchmarks/bench_train.py --arch flux-dev      # full-size FLUX.1-dev architecture (GPU)
    python benchmarks/bench_train.py --arch sd3.5-large   # full-size SD3.5-Large architecture (GPU)

Full-size architectures are built from their configs with random weights (no download): the
transformer and VAE at their real sizes, the text encoders shrunk to one layer with the real
output widths (they run once before the loop and are then moved off the GPU, so they do not
change the per-step numbers).
"""

from __future__ import annotations

import argparse
import os
import platform
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

from studio.recipe import Recipe  # noqa: E402
from studio.training import Observer, TrainRequest, prepare_run, train  # noqa: E402

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
VAE_16CH = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
)


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

    from studio.backbones.tiny import build_clip_tokenizer, build_t5_tokenizer  # built locally, no download

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


class Timer(Observer):
    def __init__(self):
        self.times: list[float] = []

    def on_step(self, report):
        self.times.append(report.sec_per_step)


def bare_loop(backbone, image: Image.Image, prompt: str, recipe: Recipe, steps: int) -> tuple[list[float], int]:
    """The smallest loop that trains the same LoRA: cached inputs, sample t, MSE, Adam."""
    transformer = backbone.transformer
    device = backbone.device
    cond = backbone.encode_prompts([prompt])[0]
    latent = backbone.encode_images([image])[0]
    backbone.offload_encoders()
    transformer.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
                                       target_modules=list(backbone.lora_targets)), adapter_name="bare")
    transformer.set_adapter("bare")
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    on_gpu = device.type == "cuda"
    if on_gpu:
        transformer.enable_gradient_checkpointing()
        torch.cuda.reset_peak_memory_stats()
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
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if on_gpu else 0
    if on_gpu:
        transformer.disable_gradient_checkpointing()
    transformer.delete_adapters(["bare"])
    backbone.restore_encoders()
    return times, peak


def ours(backbone, image: Image.Image, prompt: str, recipe: Recipe, steps: int, tmp: Path) -> tuple[list[float], int]:
    run_dir = tmp / f"run-{time.time_ns()}"
    recipe = Recipe(**{**recipe.to_dict(), "steps": steps, "preview_every": 0, "checkpoint_every": 0})
    prepare_run(TrainRequest([image], prompt, "bench", recipe), run_dir, backbone.backbone_id, backbone.family,
                backbone.default_resolution)
    timer = Timer()
    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(backbone, run_dir, timer)
    peak = torch.cuda.max_memory_allocated() if backbone.device.type == "cuda" else 0
    return timer.times, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "flux-dev", "sd3.5-large", "sd3.5-medium"])
    parser.add_argument("--steps", type=int, default=None, help="timed optimiser steps per loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="one block per kind: check the script on a CPU")
    args = parser.parse_args()

    from studio.backbones import load_backbone
    from studio.backbones.flux import FluxBackbone
    from studio.backbones.sd3 import SD3Backbone

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.arch == "tiny":
        backbone = load_backbone("tiny")
        steps = args.steps or 30
    else:
        folder = build_random_pipeline(args.arch, tmp, smoke=args.smoke)
        cls = FluxBackbone if args.arch == "flux-dev" else SD3Backbone
        backbone = cls.load(args.arch + "-random", str(folder))
        steps = args.steps or 10
    resolution = args.resolution or backbone.default_resolution
    recipe = Recipe(rank=args.rank, resolution=resolution)
    image = Image.new("RGB", (resolution, resolution), (200, 80, 40))
    prompt = "watercolor painting"
    n = args.warmup + steps

    rows = []
    for label, fn in (("bare loop", lambda: bare_loop(backbone, image, "an image in " + prompt + " style",
                                                      recipe, n)),
                      ("studio trainer", lambda: ours(backbone, image, prompt, recipe, n, tmp)),
                      ("bare loop (again)", lambda: bare_loop(backbone, image, "an image in " + prompt + " style",
                                                              recipe, n))):
        times, peak = fn()
        rows.append((label, statistics.median(times[args.warmup:]), peak))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"\n{args.arch} @ {resolution}x{resolution}, LoRA rank {args.rank}, batch 1 x accumulation "
          f"{recipe.grad_accum}, {steps} timed steps (median), on {device}, torch {torch.__version__}\n")
    reference = (rows[0][1] + rows[2][1]) / 2
    ref_mem = max(rows[0][2], rows[2][2])
    print("| loop | s / optimiser step | ratio to bare | peak GPU memory (GiB) |")
    print("|---|---|---|---|")
    for label, sec, peak in rows:
        mem = f"{peak / 2**30:.2f}" if peak else "n/a (CPU)"
        print(f"| {label} | {sec:.4f} | {sec / reference:.2f} | {mem} |")
    if ref_mem:
        print(f"\nmemory ratio (studio / bare): {rows[1][2] / ref_mem:.2f}")
    print(f"paper recipe (300 steps) at this speed: studio {rows[1][1] * 300 / 60:.1f} min, "
          f"bare {reference * 300 / 60:.1f} min")


if __name__ == "__main__":
    main()
