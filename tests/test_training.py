"""The trainer on the tiny backbone: LoRA targets, loss target, samplers, resume, learning."""

import json
import time

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file
from scipy import stats

from studio.engine import snr
from studio.engine.recipe import Recipe
from studio.engine.training import (
    ADAPTER,
    Observer,
    TrainRequest,
    attach_lora,
    detach_lora,
    flow_matching_loss,
    prepare_run,
    train,
)
from studio.errors import CancelledError

FLUX_DOUBLE = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}
FLUX_SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"}


def lora_modules(transformer) -> set[str]:
    return {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")
            and ADAPTER in getattr(module, "lora_A", {})}


def reference(color=(220, 60, 40), size=64) -> Image.Image:
    """A reference with a strong, simple style: one dominant colour and a soft stripe."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = color
    arr[size // 3: size // 2] = (250, 200, 60)
    return Image.fromarray(arr)


def run(backbone, tmp_path, name="run", observer=None, **recipe):
    run_dir = tmp_path / name
    prepare_run(TrainRequest([reference()], "red poster", "demo", Recipe(**recipe)), run_dir,
                backbone.backbone_id, backbone.family, backbone.default_resolution)
    return run_dir, train(backbone, run_dir, observer)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_flux_lora_targets_are_the_papers(tiny_backbone):
    transformer = tiny_backbone.transformer
    attach_lora(tiny_backbone, Recipe(rank=4))
    try:
        got = lora_modules(transformer)
        expected = {"proj_out"}  # the bare name also hits the final projection, as in the paper
        expected |= {f"transformer_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks))
                     for m in FLUX_DOUBLE}
        expected |= {f"single_transformer_blocks.{i}.{m}"
                     for i in range(len(transformer.single_transformer_blocks)) for m in FLUX_SINGLE}
        assert got == expected
        assert not any(".ff" in n or "to_add_out" in n or "norm" in n for n in got)
    finally:
        detach_lora(tiny_backbone)
    assert not lora_modules(transformer)


def test_sd3_lora_targets_are_the_papers(tmp_path_factory):
    from studio.engine.backbones.sd3 import SD3Backbone
    from studio.engine.backbones.tiny import ensure_tiny_sd3

    backbone = SD3Backbone.load("tiny-sd3", str(ensure_tiny_sd3()), device=torch.device("cpu"))
    attach_lora(backbone, Recipe(rank=4))
    got = lora_modules(backbone.transformer)
    blocks = backbone.transformer.transformer_blocks
    expected = set()
    for i, block in enumerate(blocks):
        names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
        if not block.context_pre_only:
            names.append("to_add_out")
        expected |= {f"transformer_blocks.{i}.attn.{m}" for m in names}
    assert got == expected
    assert blocks[-1].context_pre_only and f"transformer_blocks.{len(blocks) - 1}.attn.to_add_out" not in got
    assert "proj_out" not in got and not any(".ff" in n for n in got)

    # One step of the SD3 loss: time steps go in on the 0..1000 scale, target eps - x0.
    latent = backbone.encode_images([reference()])[0]
    cond = backbone.encode_prompts(["a cat in red poster style"])[0]
    sampler = snr.sampler_for("style_friendly", "sd3")
    loss, t = flow_matching_loss(backbone, latent, cond, sampler, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x0, t2 = latent.sample(g), sampler.sample(1, g)
    eps = torch.randn(x0.shape, generator=g)
    pred = backbone.transformer(hidden_states=(1 - t2) * x0 + t2 * eps, timestep=t2 * 1000,
                                encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    assert torch.equal(t, t2)
    assert loss.item() == pytest.approx(((pred - (eps - x0)) ** 2).mean().item(), rel=1e-5)
    loss.backward()  # gradients reach the LoRA


def test_flux_loss_is_plain_velocity_mse(tiny_backbone):
    """Against a hand-written FLUX call: pack, guidance 1.0, timestep t, target eps - x0."""
    latent = tiny_backbone.encode_images([reference()])[0]
    cond = tiny_backbone.encode_prompts(["a cat in red poster style"])[0]
    sampler = snr.sampler_for("style_friendly", "flux")
    with torch.no_grad():
        loss, t = flow_matching_loss(tiny_backbone, latent, cond, sampler, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        x0, t2 = latent.sample(g), sampler.sample(1, g)
        eps = torch.randn(x0.shape, generator=g)
        b, c, h, w = x0.shape
        packed = FluxPipeline._pack_latents((1 - t2) * x0 + t2 * eps, b, c, h, w)
        packed_target = FluxPipeline._pack_latents(eps - x0, b, c, h, w)
        pred = tiny_backbone.transformer(
            hidden_states=packed, timestep=t2, guidance=torch.ones(1),
            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"], img_ids=FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu",
                                                                                     torch.float32),
            return_dict=False)[0]
    assert torch.equal(t, t2)
    assert loss.item() == pytest.approx(((pred - packed_target) ** 2).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_default_run_is_fast_samples_the_style_friendly_distribution_and_learns(tiny_backbone, tmp_path):
    """The paper's recipe (300 steps x 4) on tiny: timing, the 1,200 t values, and learning."""
    start = time.perf_counter()
    run_dir, result = run(tiny_backbone, tmp_path, preview_every=100)
    elapsed = time.perf_counter() - start
    assert elapsed < 90, f"300-step tiny run took {elapsed:.0f} s"

    rows = metrics(result)
    assert [r["step"] for r in rows] == list(range(1, 301))
    t = np.array([v for r in rows for v in r["t"]])
    assert t.size == 1200
    lam = 2 * np.log((1 - t) / t)
    assert stats.kstest(lam, "norm", args=(-6.0, 3.0)).pvalue > 1e-3  # FLUX default sigma 3
    # ...and clearly not the SD3 sampler's distribution
    assert stats.kstest(lam, "norm", args=(-2 * np.log(3), 2.0)).pvalue < 1e-6

    # The template folder is complete.
    meta = json.loads((result / "template.json").read_text())
    assert meta["sampler"] == {"name": "style_friendly", "mu": -6.0, "sigma": 3.0, "shift": 3.0}
    assert meta["steps_done"] == 300 and meta["recipe"]["rank"] == 32 and meta["recipe"]["lr"] == 1e-4
    for rel in meta["previews"] + meta["references"] + ["thumbnail.png", "lora.safetensors"]:
        assert (result / rel).is_file(), rel
    assert {p.split("_")[1] for p in meta["previews"]} == {"0000", "0100", "0200", "0300"}

    # Training pulls generations toward the reference: the model's one-step prediction of x0
    # from pure noise moves toward the reference latent.
    keys = load_file(result / "lora.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert not any(".ff." in k or "ff_context" in k or "to_add_out" in k for k in keys)
    assert lora_weights_move_generation_toward(tiny_backbone, result)


def lora_weights_move_generation_toward(backbone, template) -> bool:
    from studio.engine.generation import activate_templates

    ref_latent = backbone.encode_images([Image.open(template / "references" / "ref_00.png")])[0].mean
    cond = backbone.encode_prompts(["A friendly robot in red poster style"])[0]

    def distance() -> float:
        total = 0.0
        for seed in range(4):
            image = backbone.generate(cond, seed=seed, steps=8, width=64, height=64)
            latent = backbone.encode_images([image])[0].mean
            total += (latent - ref_latent).pow(2).mean().item()
        return total / 4

    activate_templates(backbone, [])
    before = distance()
    activate_templates(backbone, [(template, 1.0)])
    after = distance()
    activate_templates(backbone, [])
    print(f"latent distance to reference: base {before:.4f}, with LoRA {after:.4f}")
    return after < 0.8 * before


class StopAt(Observer):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, report):
        self.seen = report.step

    def should_stop(self):
        return self.seen >= self.step


def test_resume_reproduces_the_uninterrupted_run(tiny_backbone, tmp_path):
    opts = dict(steps=12, checkpoint_every=4, preview_every=0, lr=1e-3, seed=7)
    _, full = run(tiny_backbone, tmp_path, "full", **opts)
    with pytest.raises(CancelledError):
        run(tiny_backbone, tmp_path, "cut", observer=StopAt(6), **opts)
    cut = tmp_path / "cut"
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed = train(tiny_backbone, cut)  # picks up at the step-4 checkpoint
    a, b = load_file(full / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in metrics(full)] == pytest.approx([r["loss"] for r in metrics(resumed)], rel=1e-5)
    assert [r["t"] for r in metrics(full)] == [r["t"] for r in metrics(resumed)]


@pytest.mark.slow
def test_sd3_sampler_option(tiny_backbone, tmp_path):
    _, result = run(tiny_backbone, tmp_path, sampler="sd3", steps=150, preview_every=0)
    t = np.array([v for r in metrics(result) for v in r["t"]])
    lam = 2 * np.log((1 - t) / t)
    assert stats.kstest(lam, "norm", args=(-2 * np.log(3), 2.0)).pvalue > 1e-3
    assert json.loads((result / "template.json").read_text())["sampler"]["name"] == "sd3"


def test_lora_loads_with_plain_diffusers(tiny_folder, tiny_backbone, tmp_path):
    from studio.engine.backbones.tiny import TINY_MAX_SEQUENCE_LENGTH

    _, result = run(tiny_backbone, tmp_path, steps=20, lr=1e-2, preview_every=0)
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a boat in red poster style", num_inference_steps=4, height=64, width=64,
                  guidance_scale=7.0, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipe.load_lora_weights(str(result), weight_name="lora.safetensors")
    styled = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(base - styled).mean() > 1e-3
    # the weights diffusers loaded are the ones we saved
    saved = load_file(result / "lora.safetensors")
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    module = pipe.transformer.transformer_blocks[0].attn.to_q
    loaded = next(iter(module.lora_B.values())).weight
    torch.testing.assert_close(loaded, saved[key])
