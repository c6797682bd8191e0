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

from studio.engine.backbones import tiny, tiny_pretrain
from studio.engine.backbones.tiny import (
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
def flux_folder(tiny_folder: Path) -> Path:
    """The shared tiny FLUX folder (conftest): pre-training takes ~1 min, so it is built once per cache."""
    return tiny_folder


@pytest.fixture
def quick_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds in this test run the full pipeline with a few seconds of pre-training instead of ~1 min."""
    monkeypatch.setattr(tiny_pretrain, "PRETRAIN_STEPS", 12)
    monkeypatch.setattr(tiny_pretrain, "_PRETRAIN_POOL", 96)
    monkeypatch.setattr(tiny_pretrain, "_ALIGN_STEPS", 4)


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


def test_cached_folder_is_reused(flux_folder: Path) -> None:
    stamp = (flux_folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_flux(flux_folder.parent) == flux_folder
    assert (flux_folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = [("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
             ("text_encoder", "model"), ("text_encoder_2", "model")]
    return {f"{part}/{k}": v for part, name in files
            for k, v in load_file(folder / part / f"{name}.safetensors").items()}


@pytest.mark.slow
def test_build_is_deterministic_keeps_caller_rng_and_threads(quick_build: None, tmp_path: Path) -> None:
    """Two builds give identical bytes (the same code path as the full build, with a shorter schedule)."""
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = ensure_tiny_flux(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_draw)  # building did not reseed the caller's generator
    assert torch.get_num_threads() == threads  # the build runs single-threaded, then restores
    second = ensure_tiny_flux(tmp_path / "b")
    ours, theirs = _weights(first), _weights(second)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for part in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        assert (first / part / "config.json").read_text() == (second / part / "config.json").read_text()
    # pre-training changed the transformer and the text encoders, not the constructed VAE
    with torch.random.fork_rng(devices=[]):
        untrained = tiny._tiny_flux_pipeline()
    assert not torch.equal(ours["transformer/proj_out.weight"], untrained.transformer.proj_out.weight)
    assert torch.equal(ours["vae/decoder.conv_out.weight"], untrained.vae.decoder.conv_out.weight)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp folder left


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


def test_invalid_folder_is_replaced(quick_build: None, tmp_path: Path) -> None:
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


# -- the pre-trained base model behaves like a text-to-image model in miniature ------------------------------


@pytest.fixture(scope="session")
def random_pipe(tmp_path_factory: pytest.TempPathFactory) -> FluxPipeline:
    """The same pipeline without pre-training: what v2 shipped (a random transformer)."""
    folder = tiny.build_tiny_flux(tmp_path_factory.mktemp("random-flux"), pretrain_steps=0)
    return FluxPipeline.from_pretrained(folder)


def _pictures(pipe: FluxPipeline, prompt: str, seeds=range(4), **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 28, "guidance_scale": 7.0, **kwargs}
    pipe.set_progress_bar_config(disable=True)
    return np.stack([
        pipe(prompt, height=64, width=64, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
             generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images[0]
        for seed in seeds
    ]) * 255.0


def _roughness(images: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels, 0..255: ~19 for colour noise."""
    return float((np.abs(np.diff(images, axis=1)).mean() + np.abs(np.diff(images, axis=2)).mean()) / 2)


def _tint(images: np.ndarray, channel: int) -> float:
    """How much one channel (0 red, 1 green, 2 blue) stands out from the other two, 0..255."""
    mean = images.reshape(-1, 3).mean(0)
    return float(mean[channel] - np.delete(mean, channel).mean())


CIRCLE, STRIPES = "a red circle on a blue background", "green stripes"


def test_base_model_draws_smooth_pictures_that_follow_the_prompt(flux_pipe, random_pipe) -> None:
    prompts = (CIRCLE, STRIPES, "an orange sunset gradient", "green hills under a blue sky", "a robot")
    ours = {p: _pictures(flux_pipe, p) for p in prompts}
    theirs = {p: _pictures(random_pipe, p) for p in (CIRCLE, STRIPES)}
    rough = _roughness(np.concatenate(list(ours.values())))
    random_rough = _roughness(np.concatenate(list(theirs.values())))
    print(f"roughness: pre-trained {rough:.2f}, random {random_rough:.2f}")
    assert rough < 0.35 * random_rough  # measured 2.6 vs 18.9
    # prompts matter: blue background vs green stripes (the random model gives both the same grey)
    blue = _tint(ours[CIRCLE], 2) - _tint(ours[STRIPES], 2)
    green = _tint(ours[STRIPES], 1) - _tint(ours[CIRCLE], 1)
    random_blue = _tint(theirs[CIRCLE], 2) - _tint(theirs[STRIPES], 2)
    print(f"blue-ness difference {blue:.0f} (random {random_blue:.0f}), green-ness difference {green:.0f}")
    assert blue > 60 and green > 30 and abs(random_blue) < 10  # measured 144, 71, ~1
    sunset, hills = (ours[p].reshape(-1, 3).mean(0) for p in prompts[2:4])
    assert sunset[0] > sunset[1] + 40 > sunset[2] + 80  # orange: red > green > blue
    assert (sunset[0] - sunset[1]) - (hills[0] - hills[1]) > 80  # red vs green: measured 185
    robot = ours["a robot"].reshape(-1, 3).mean(0)
    assert robot[2] > robot[0] + 50  # no background named: outdoors, under a blue sky


def test_guidance_embedding_is_neutral(flux_pipe) -> None:
    """Not guidance-distilled: the trainer's guidance 1.0 and generation's 7.0 give the same model."""
    one, seven = (_pictures(flux_pipe, "a tree", seeds=[0], num_inference_steps=4, guidance_scale=g)
                  for g in (1.0, 7.0))
    assert np.array_equal(one, seven)


def test_pretraining_data(flux_pipe) -> None:
    """Captions use the tokenizers' own words; the shortcut latents equal the VAE encoder's."""
    import random

    rng = random.Random(0)
    scenes = [tiny_pretrain._scene(rng) for _ in range(200)]
    words = set(tiny._word_list())
    for image, caption in scenes:
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert all(w.lower() in words for w in caption.replace(",", " ").split()), caption
    images = torch.stack([img for img, _ in scenes[:16]]) * 2 - 1
    with torch.no_grad():
        encoded = flux_pipe.vae.encode(images).latent_dist.mean
    assert (tiny_pretrain._colour_latents(images) - encoded).abs().max() < 1e-3


@pytest.mark.slow
def test_style_training_moves_previews_toward_the_reference(tiny_backbone, tmp_path: Path) -> None:
    """The paper's recipe (300 steps x 4, lr 1e-4, rank 32, style-friendly sampler) on the watercolour example:
    the previews the UI shows take on the reference's pale palette."""
    from PIL import Image

    from studio.engine.recipe import Recipe
    from studio.engine.training import TrainRequest, prepare_run, train

    reference = Image.open(Path(__file__).resolve().parent.parent / "assets" / "examples" / "watercolor.png")
    run_dir = tmp_path / "run"
    prepare_run(TrainRequest([reference], "watercolor painting", "watercolor", Recipe()), run_dir,
                tiny_backbone.backbone_id, tiny_backbone.family, tiny_backbone.default_resolution)
    train(tiny_backbone, run_dir)

    def mean_colour(paths) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64) for p in paths]).reshape(-1, 3).mean(0)

    target = mean_colour([run_dir / "references" / "ref_00.png"])
    distance = {step: float(np.linalg.norm(mean_colour(sorted((run_dir / "previews").glob(f"step_{step:04d}_p*.png")))
                                           - target)) for step in (0, 100, 300)}
    print(f"preview colour distance to the reference by step: {distance}")
    assert distance[300] < 0.5 * distance[0] and distance[100] < distance[0]  # measured 173 -> 37
