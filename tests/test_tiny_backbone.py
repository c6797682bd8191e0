"""The tiny offline FLUX / SD3 pipelines: they load through the real diffusers code paths and behave."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from studio.backbones import tiny
from studio.backbones.tiny import (
    MARKER,
    TINY_DEFAULT_RESOLUTION,
    TINY_MAX_SEQUENCE_LENGTH,
    ensure_tiny_flux,
    ensure_tiny_sd3,
)

PROMPT = "a panda eating bamboo in watercolor painting style"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studio-cache")


@pytest.fixture(scope="session")
def flux_folder(cache_dir: Path) -> Path:
    return ensure_tiny_flux(cache_dir)


@pytest.fixture(scope="session")
def flux_pipe(flux_folder: Path) -> FluxPipeline:
    return FluxPipeline.from_pretrained(flux_folder)


def _generate(pipe, seed: int, **kwargs) -> np.ndarray:
    image = pipe(
        PROMPT, height=TINY_DEFAULT_RESOLUTION, width=TINY_DEFAULT_RESOLUTION,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images[0]
    return np.asarray(image)


def test_flux_generates_64px_reproducibly(flux_pipe: FluxPipeline) -> None:
    kwargs = {"num_inference_steps": 4, "guidance_scale": 7.0}
    first, again, other = (_generate(flux_pipe, seed, **kwargs) for seed in (0, 0, 1))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_flux_folder_mirrors_flux_dev_layout(flux_folder: Path, flux_pipe: FluxPipeline) -> None:
    scheduler = flux_pipe.scheduler.config
    expected = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096}
    assert {k: scheduler[k] for k in expected} == expected
    assert type(flux_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert flux_pipe.transformer.config.guidance_embeds
    assert flux_pipe.transformer.config.in_channels == 4 * flux_pipe.vae.config.latent_channels
    assert flux_pipe.vae_scale_factor == 4
    assert flux_pipe.vae.config.shift_factor is not None and flux_pipe.vae.config.scaling_factor > 0
    assert json.loads((flux_folder / MARKER).read_text())["version"] == tiny.TINY_VERSION


def test_cached_folder_is_reused_and_no_temp_left(flux_folder: Path, cache_dir: Path) -> None:
    stamp = (flux_folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_flux(cache_dir) == flux_folder
    assert (flux_folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]


def test_build_is_deterministic_and_keeps_caller_rng(flux_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    other = ensure_tiny_flux(tmp_path)
    assert torch.equal(torch.rand(3), expected_draw)  # building did not reseed the caller's generator
    for part in ("transformer", "vae"):
        ours = load_file(flux_folder / part / "diffusion_pytorch_model.safetensors")
        theirs = load_file(other / part / "diffusion_pytorch_model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (flux_folder / "vae" / "config.json").read_text() == (other / "vae" / "config.json").read_text()


def test_tokenizers_know_prompt_words(flux_pipe: FluxPipeline) -> None:
    words = PROMPT.split()
    clip_tokens = flux_pipe.tokenizer.tokenize(PROMPT.title())  # CLIP lowercases
    assert clip_tokens == [w + "</w>" for w in words]
    t5 = flux_pipe.tokenizer_2
    for text in (PROMPT, PROMPT.title()):
        ids = t5(text).input_ids
        assert t5.unk_token_id not in ids
        assert len(ids) == len(words) + 1  # one piece per word, then </s>
    # unknown words fall back to characters rather than <unk>
    assert flux_pipe.tokenizer.unk_token_id not in flux_pipe.tokenizer("zorblax qwuib").input_ids[1:-1]
    assert t5.model_max_length == TINY_MAX_SEQUENCE_LENGTH
    assert flux_pipe.tokenizer.model_max_length == 77


def _round_trip_error(vae, image: torch.Tensor) -> float:
    """Mean absolute error per pixel in [0, 1] units of decode(encode(image))."""
    with torch.no_grad():
        decoded = vae.decode(vae.encode(image * 2 - 1).latent_dist.mean).sample
    return (decoded.clamp(-1, 1) / 2 + 0.5 - image).abs().mean().item()


def test_vae_round_trip_keeps_colours(flux_pipe: FluxPipeline) -> None:
    red = torch.zeros(1, 3, 64, 64)
    red[:, 0] = 1.0
    gradient = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64).contiguous()
    assert _round_trip_error(flux_pipe.vae, red) < 0.005  # measured 0.0002
    assert _round_trip_error(flux_pipe.vae, gradient) < 0.03  # measured 0.016 (4x4 blocks)
    # FLUX-style normalisation makes latents of colourful images roughly standard
    images = torch.rand(16, 3, 1, 1) * torch.linspace(0, 1, 64).view(1, 1, 1, 64) + torch.rand(16, 3, 1, 1) * 0.5
    with torch.no_grad():
        latents = flux_pipe.vae.encode(images.expand(16, 3, 64, 64) * 2 - 1).latent_dist.mean
    config = flux_pipe.vae.config
    normalised = (latents - config.shift_factor) * config.scaling_factor
    assert abs(normalised.mean().item()) < 0.6 and 0.5 < normalised.std().item() < 2.0


def test_invalid_folder_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / f"tiny-flux-v{tiny.TINY_VERSION}"
    stale.mkdir()
    (stale / "model_index.json").write_text("{}")  # no marker: an interrupted or foreign folder
    assert ensure_tiny_flux(tmp_path) == stale
    assert (stale / MARKER).exists() and (stale / "transformer").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name]


def test_losing_a_build_race_uses_the_winners_folder(
    flux_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / flux_folder.name

    def build_while_another_process_wins(folder: Path) -> Path:
        (folder / "model_index.json").write_text("{}")
        shutil.copytree(flux_folder, final)  # the other process publishes its complete folder first
        return folder

    monkeypatch.setattr(tiny, "build_tiny_flux", build_while_another_process_wins)
    assert ensure_tiny_flux(tmp_path) == final
    assert (final / "transformer").is_dir()  # theirs, not our half-made stand-in
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # our temp folder is gone


def test_sd3_loads_and_generates(cache_dir: Path) -> None:
    pipe = StableDiffusion3Pipeline.from_pretrained(ensure_tiny_sd3(cache_dir))
    image = _generate(pipe, 0, num_inference_steps=2)
    assert image.shape == (64, 64, 3)
    blocks = pipe.transformer.transformer_blocks
    assert len(blocks) == 2
    assert blocks[0].attn.to_add_out is not None and blocks[-1].attn.to_add_out is None  # as in SD3.5-Large
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
