"""Fusion / style-schedule sampling on the tiny backbones: the custom loop is the pipeline's, and
each option changes exactly the steps it claims to."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from studio.cli import main, publish
from studio.engine import fusion
from studio.engine.backbones.flux import unpack
from studio.engine.generation import GenerateOptions, activate_templates, generate
from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, prepare_run, train
from studio.errors import InputError
from studio.store.templates import TemplateStore

PROMPT = "a boat in blue poster style"
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def template(tiny_backbone, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fusion") / "run"
    ref = Image.new("RGB", (64, 64), (30, 160, 220))
    prepare_run(TrainRequest([ref], "blue poster", "blue", Recipe(steps=30, lr=5e-3, preview_every=0)),
                run_dir, "tiny", "flux", 64)
    result = train(tiny_backbone, run_dir)
    return result, json.loads((result / "template.json").read_text())


@contextmanager
def decoder_inputs(backbone):
    """Collect the latents handed to the VAE decoder (the sampler's final latents)."""
    seen = []
    handle = backbone.pipe.vae.decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.float32)


def test_step_weights():
    assert fusion.step_weights(4) == [1.0] * 4
    assert fusion.step_weights(4, 0.8) == [0.8] * 4
    assert fusion.step_weights(10, style_schedule=0.3) == [1.0] * 3 + [0.0] * 7  # not 4 from 0.3 * 10
    assert fusion.step_weights(28, 0.5, 0.3) == [0.5] * 8 + [0.0] * 20
    assert fusion.step_weights(5, style_schedule=1.0) == [1.0] * 5
    assert fusion.step_weights(5, style_schedule=0.0) == [0.0] * 5
    assert not fusion.is_active() and fusion.is_active(style_schedule=1.0) and fusion.is_active(0.9)


@pytest.mark.parametrize("with_template", [False, True])
def test_custom_loop_reproduces_the_flux_pipeline(tiny_backbone, template, with_template):
    """Same start, the pipeline's shifted sigmas, guidance embedding and Euler steps: identical latents."""
    activate_templates(tiny_backbone, [(template[0], 1.0)] if with_template else [])
    cond = tiny_backbone.encode_prompts([PROMPT])[0]
    with decoder_inputs(tiny_backbone) as seen:
        piped = tiny_backbone.generate(cond, seed=3, steps=6, **SIZE)
        looped = fusion.fused_generate(tiny_backbone, cond, [1.0] * 6, seed=3, steps=6, **SIZE)
    assert torch.equal(seen[0], seen[1])
    assert np.array_equal(np.asarray(piped), np.asarray(looped))


def test_custom_loop_reproduces_the_sd3_pipeline_with_cfg():
    """SD3 keeps classifier-free guidance (negative + positive in one batch) in the custom loop."""
    from studio.engine.backbones.sd3 import SD3Backbone
    from studio.engine.backbones.tiny import TINY_MAX_SEQUENCE_LENGTH, ensure_tiny_sd3

    sd3 = SD3Backbone.load("tiny-sd3", str(ensure_tiny_sd3()), device=torch.device("cpu"),
                           default_resolution=64, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH)
    cond, negative = sd3.encode_prompts(["a boat in blue poster style", ""])
    finals = {}
    for guidance in (7.0, 1.0):
        with decoder_inputs(sd3) as seen:
            sd3.generate(cond, seed=1, steps=4, guidance=guidance, negative=negative, **SIZE)
            fusion.fused_generate(sd3, cond, [1.0] * 4, seed=1, steps=4, guidance=guidance, negative=negative,
                                  **SIZE)
        assert torch.equal(seen[0], seen[1]), guidance
        finals[guidance] = seen[0]
    assert not torch.allclose(finals[7.0], finals[1.0])  # guidance 7 really ran CFG

    # A blended step on SD3 is the blend of the two guided predictions.
    from peft import LoraConfig

    sd3.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]), "probe")
    lora = sd3.transformer.transformer_blocks[0].attn.to_q
    with torch.no_grad():
        for name, p in sd3.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    trace = []
    fusion.fused_generate(sd3, cond, [0.5] * 3, seed=1, steps=3, guidance=7.0, negative=negative, **SIZE,
                          trace=trace)
    for step in trace:
        assert not torch.allclose(step.base, step.template)
        torch.testing.assert_close(step.velocity, step.base + 0.5 * (step.template - step.base))
    assert not lora.disable_adapters  # the LoRA is back on after the base predictions


def test_style_schedule_leaves_the_last_steps_to_the_base_model(tiny_backbone, template):
    """Ablation: with style_schedule 0.5 of 6 steps, steps 0-2 use the template's prediction and
    steps 3-5 exactly the base model's, checked against independent transformer calls."""
    folder, _ = template
    cond = tiny_backbone.encode_prompts([PROMPT])[0]
    activate_templates(tiny_backbone, [(folder, 1.0)])
    weights = fusion.step_weights(6, style_schedule=0.5)
    trace = []
    fusion.fused_generate(tiny_backbone, cond, weights, seed=5, steps=6, **SIZE, trace=trace)
    assert [s.weight for s in trace] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]

    channels, h, w = tiny_backbone.latent_shape(64, 64)

    def independent(step, templates):  # the training path's velocity: unpacked latents, t in 0..1
        activate_templates(tiny_backbone, templates)
        with torch.no_grad():
            v = tiny_backbone.predict_velocity(unpack(step.latents, channels, h, w), step.timestep[None] / 1000,
                                               cond, guidance=7.0)
        return tiny_backbone.pack_latents(v)

    for step in trace:
        base = independent(step, [])
        styled = independent(step, [(folder, 1.0)])
        if step.index < 3:
            torch.testing.assert_close(step.velocity, styled, rtol=1e-4, atol=1e-5)
            assert (step.velocity - base).abs().mean() > 1e-3  # the template is doing something
        else:
            torch.testing.assert_close(step.velocity, base, rtol=1e-4, atol=1e-5)
            assert (step.velocity - styled).abs().mean() > 1e-3
    # the cut-off steps ran one prediction each, with the LoRA off
    assert all(s.template is None for s in trace[3:]) and all(s.base is None for s in trace[:3])


def test_fusion_weight_ends_are_base_and_template(tiny_backbone, template, tmp_path):
    """fusion_weight 0 == the base model; fusion_weight 1 with schedule 1.0 == the plain template."""
    opts = dict(prompt="a boat", steps=6, seed=3)
    plain = pixels(generate(tiny_backbone, GenerateOptions(**opts), tmp_path / "plain", template)[0])
    base = pixels(generate(tiny_backbone, GenerateOptions(prompt=PROMPT, steps=6, seed=3), tmp_path / "base")[0])
    w0 = pixels(generate(tiny_backbone, GenerateOptions(**opts, fusion_weight=0.0), tmp_path / "w0", template)[0])
    w1 = pixels(generate(tiny_backbone, GenerateOptions(**opts, fusion_weight=1.0, style_schedule=1.0),
                         tmp_path / "w1", template)[0])
    half = generate(tiny_backbone, GenerateOptions(**opts, fusion_weight=0.5, style_schedule=0.5),
                    tmp_path / "half", template)[0]
    assert np.abs(plain - base).mean() > 0.5  # the template matters on this prompt and seed
    assert np.abs(w0 - base).max() <= 1.0
    assert np.abs(w1 - plain).max() <= 1.0
    mid = pixels(half)
    assert np.abs(mid - base).mean() > 0.1 and np.abs(mid - plain).mean() > 0.1
    params = json.loads(Image.open(half).text["studio"])
    assert params["fusion_weight"] == 0.5 and params["style_schedule"] == 0.5


def test_fusion_options_are_validated(tiny_backbone, tmp_path):
    for bad in (dict(style_schedule=1.5), dict(style_schedule=-0.1), dict(fusion_weight=-1.0),
                dict(fusion_weight=3.0)):
        with pytest.raises(InputError):
            GenerateOptions(prompt="x", **bad).validate()
    with pytest.raises(InputError, match="need a template"):
        generate(tiny_backbone, GenerateOptions(prompt="x", steps=2, style_schedule=0.3), tmp_path)


def test_cli_style_schedule_and_fusion_weight(template, tmp_path, capsys):
    store = TemplateStore(tmp_path / "store")
    info = publish(store, template[0], "blue")
    out = tmp_path / "out"
    code = main(["--store", str(store.root), "generate", "--template", info.id, "--prompt", "a cow",
                 "--steps", "4", "--style-schedule", "0.3", "--fusion-weight", "0.8", "--out", str(out)])
    first = capsys.readouterr()
    assert code == 0, first.err
    params = json.loads(Image.open(sorted(out.glob("*.png"))[0]).text["studio"])
    assert params["style_schedule"] == 0.3 and params["fusion_weight"] == 0.8
    assert main(["--store", str(store.root), "generate", "--template", info.id, "--prompt", "a cow",
                 "--style-schedule", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "style schedule" in err
