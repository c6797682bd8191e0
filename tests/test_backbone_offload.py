"""What a training moves off the GPU, and that previews still work with the pipeline split.

On a GPU, training moves the text encoders to the CPU once prompts are encoded. Some diffusers
releases then take the pipeline's device from its alphabetically first component, the text
encoder, and would start the sampler on the CPU while the transformer sits on the GPU. On a
CPU-only machine the "meta" device stands in for "somewhere else": modules moved there have no
data, so any sampling code that touched them (or took its device from them) would fail.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from studio.engine import fusion
from studio.engine.backbones import load_backbone
from studio.engine.noise_prior import NoisePrior
from studio.engine.training import PREVIEW_SEED, PreviewWriter, detach_lora

PROMPTS = ["a friendly robot in blue poster style", "a baby penguin in blue poster style"]


def test_only_the_text_encoders_are_offloaded(tiny_backbone):
    offloaded = tiny_backbone.offload_modules()
    assert set(offloaded) == {"text_encoder", "text_encoder_2"}
    assert offloaded["text_encoder"] is tiny_backbone.pipe.text_encoder
    kept = [tiny_backbone.transformer, tiny_backbone.pipe.vae, tiny_backbone.pipe.vae.encoder,
            tiny_backbone.pipe.vae.decoder]
    assert not any(module is k for module in offloaded.values() for k in kept)
    before = {n: next(m.parameters()).device for n, m in offloaded.items()}
    tiny_backbone.offload_encoders()  # already on the CPU: nothing moves, nothing breaks
    assert {n: next(m.parameters()).device for n, m in offloaded.items()} == before


@pytest.fixture(scope="module")
def split(tiny_folder):
    """A second tiny backbone whose text encoders are gone elsewhere, after encoding the prompts."""
    backbone = load_backbone("tiny")
    conds = backbone.encode_prompts(PROMPTS)
    backbone.offload_encoders(to="meta")
    return backbone, conds


def test_the_split_pipeline_misreports_its_device(split):
    """The hazard is real: diffusers now reports the offloaded text encoder's device for the pipeline."""
    backbone, _ = split
    assert backbone.pipe.text_encoder.device.type == "meta" and backbone.pipe.text_encoder_2.device.type == "meta"
    assert backbone.pipe.device.type == "meta"  # nothing on an accelerator: the first component (text_encoder)
    for module in (backbone.transformer, backbone.pipe.vae.encoder, backbone.pipe.vae.decoder):
        assert next(module.parameters()).device.type == "cpu"


def test_previews_with_offloaded_encoders_equal_the_usual_ones(split, tiny_backbone, tmp_path):
    backbone, conds = split
    detach_lora(tiny_backbone)  # the shared backbone may carry other tests' templates: compare bare models
    usual = PreviewWriter(tiny_backbone, tmp_path / "usual", tiny_backbone.encode_prompts(PROMPTS), None, 64, 3)
    offloaded = PreviewWriter(backbone, tmp_path / "split", conds, None, 64, 3)
    for a, b in zip(usual.write(0), offloaded.write(0), strict=True):
        assert a.name == b.name
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_noise_prior_previews_and_fused_sampling_with_offloaded_encoders(split, tmp_path):
    backbone, conds = split
    c, h, w = backbone.latent_shape(64, 64)
    prior = NoisePrior(torch.full((c, 1, 1), 0.3), torch.full((c, 1, 1), 0.8), samples=2)
    files = PreviewWriter(backbone, tmp_path, conds, None, 64, 2, prior).write(5)
    assert [f.name for f in files] == ["step_0005_p0.png", "step_0005_p1.png"]
    image = fusion.fused_generate(backbone, conds[0], [1.0, 1.0], seed=PREVIEW_SEED, steps=2, width=64, height=64)
    assert image.size == (64, 64)
