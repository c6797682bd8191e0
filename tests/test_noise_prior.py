"""Style noise prior (Diffusion in Style): statistics, training noise and the sampler's start."""

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from studio.cli import main
from studio.engine import fusion, snr
from studio.engine.backbones.flux import unpack
from studio.engine.generation import GenerateOptions, activate_templates, generate
from studio.engine.noise_prior import MIN_STD, PRIOR_FILE, NoisePrior, augmented_samples, compute_prior, start_latents
from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, flow_matching_loss, prepare_run, train
from studio.errors import InputError

COLORS = ((200, 40, 30), (30, 90, 200), (40, 160, 60), (120, 40, 160))


def reference(color, stripe) -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:] = color
    arr[stripe: stripe + 16] = (250, 220, 60)
    return Image.fromarray(arr)


REFS = [reference(c, s) for c, s in zip(COLORS, (8, 24, 40, 16), strict=True)]


@contextmanager
def transformer_inputs(backbone):
    """Record (hidden_states, timestep) of every sample the transformer sees (a batch: each of its samples)."""
    seen = []

    def hook(_module, _args, kwargs):
        states, steps = kwargs["hidden_states"].detach(), kwargs["timestep"].detach().reshape(-1)
        for k in range(states.shape[0]):
            seen.append((states[k:k + 1].clone(), steps[k:k + 1].clone() if steps.numel() > 1 else steps.clone()))

    handle = backbone.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def run_training(backbone, root, name, **recipe):
    run_dir = root / name
    prepare_run(TrainRequest(REFS, "poster", name, Recipe(steps=20, lr=5e-3, preview_every=0, **recipe)),
                run_dir, "tiny", "flux", 64)
    with transformer_inputs(backbone) as seen:
        result = train(backbone, run_dir)
    return result, seen


@pytest.fixture(scope="module")
def runs(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    with_prior = run_training(tiny_backbone, root, "prior", noise_prior=True)
    plain = run_training(tiny_backbone, root, "plain")
    return with_prior, plain


# -- the statistics ----------------------------------------------------------------------------


def test_stats_match_hand_computed_ones():
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(1, 4, 6, 6, generator=g) * 2 + 1 for _ in range(4)]
    # 4 references x (as is, flipped) = 8 samples: per element
    prior = compute_prior(lats)
    stack = torch.stack([x[0] for x in lats] + [x[0].flip(-1) for x in lats])
    assert prior.kind == "per_element" and prior.samples == 8 and prior.mean.shape == (4, 6, 6)
    torch.testing.assert_close(prior.mean, stack.mean(0))
    torch.testing.assert_close(prior.std, stack.std(0).clamp_min(MIN_STD))
    # 1 reference = 2 samples: per-channel statistics over every position
    one = compute_prior(lats[:1])
    values = torch.cat([lats[0][0], lats[0][0].flip(-1)], dim=-1).reshape(4, -1)
    assert one.kind == "per_channel" and one.mean.shape == (4, 1, 1)
    torch.testing.assert_close(one.mean.flatten(), values.mean(1))
    torch.testing.assert_close(one.std.flatten(), values.std(1))
    # flat references: the std floor keeps the noise from collapsing onto one latent
    assert (compute_prior([torch.ones(1, 4, 6, 6)] * 8).std == MIN_STD).all()


def test_crops_of_larger_references():
    small, wide = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 10)
    samples = augmented_samples([small, wide])  # grid 4x4; the wide one gives crops at 0, 1, ..., 6
    assert samples.shape == (2 * (1 + 7), 2, 4, 4)
    torch.testing.assert_close(samples[2], wide[0, :, :, 0:4])
    torch.testing.assert_close(samples[3], wide[0, :, :, 0:4].flip(-1))
    torch.testing.assert_close(samples[-2], wide[0, :, :, 6:10])
    assert compute_prior([small, wide]).kind == "per_element"


def test_other_sizes_and_file_round_trip(tmp_path):
    prior = NoisePrior(torch.randn(4, 8, 8), torch.rand(4, 8, 8) + 0.5, samples=8)
    mean, std = prior.stats(8, 12)
    torch.testing.assert_close(mean, F.interpolate(prior.mean[None], size=(8, 12), mode="bilinear")[0])
    assert std.shape == (4, 8, 12) and (std >= MIN_STD).all()
    prior.save(tmp_path)
    back = NoisePrior.load(tmp_path)
    assert torch.equal(back.mean, prior.mean) and torch.equal(back.std, prior.std) and back.samples == 8
    save_file({"mean": torch.zeros(4, 8, 8), "std": torch.zeros(4, 8, 8)}, tmp_path / PRIOR_FILE)
    with pytest.raises(InputError, match="damaged"):
        NoisePrior.load(tmp_path)
    (tmp_path / PRIOR_FILE).write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="damaged"):
        NoisePrior.load(tmp_path)
    with pytest.raises(InputError, match="no style noise prior"):
        NoisePrior.load(tmp_path / "elsewhere")


# -- training ----------------------------------------------------------------------------------


def test_loss_uses_the_prior_noise(tiny_backbone):
    """eps = mean + std * z with the same draws; the target stays eps - x0."""
    latent = tiny_backbone.encode_images([REFS[0]])[0]
    cond = tiny_backbone.encode_prompts(["a cat in poster style"])[0]
    sampler = snr.sampler_for("style_friendly", "flux")
    shape = latent.mean.shape[1:]
    prior = NoisePrior(torch.full(shape, 0.7), torch.full(shape, 0.3), samples=8)
    with torch.no_grad():
        plain, _ = flow_matching_loss(tiny_backbone, latent, cond, sampler, torch.Generator().manual_seed(5))
        styled, t = flow_matching_loss(tiny_backbone, latent, cond, sampler, torch.Generator().manual_seed(5),
                                       noise_prior=prior)
        g = torch.Generator().manual_seed(5)
        x0, t2 = latent.sample(g), sampler.sample(1, g)
        eps = 0.7 + 0.3 * torch.randn(x0.shape, generator=g)
        pred = tiny_backbone.predict_velocity((1 - t2) * x0 + t2 * eps, t2, cond)
    assert torch.equal(t, t2)
    assert styled.item() == pytest.approx(((pred - (eps - x0)) ** 2).mean().item(), rel=1e-5)
    assert abs(styled.item() - plain.item()) > 1e-3


def recovered_noise(backbone, seen, result) -> torch.Tensor:
    """eps = (x_t - (1 - t) x0) / t of every training forward (x0: the reference's posterior mean)."""
    latents = [lat.mean[0] for lat in backbone.encode_images(
        [Image.open(result / "references" / f"ref_{i:02d}.png") for i in range(len(REFS))])]
    c, h, w = latents[0].shape
    eps = []
    for n, (tokens, t) in enumerate(seen):
        x0 = latents[n % 4]  # grad_accum 4 over 4 references: micro-step k uses reference k
        x_t = unpack(tokens, c, h, w)[0]
        eps.append((x_t - (1 - t) * x0) / t)
    return torch.stack(eps)


def test_training_with_the_prior(tiny_backbone, runs):
    """Ablation: the stored prior is the references' statistics, the training noise follows it,
    and the standard run (same seeds) draws N(0, I) and ends with other losses."""
    (result, seen), (plain, plain_seen) = runs
    meta = json.loads((result / "template.json").read_text())
    assert meta["recipe"]["noise_prior"] is True
    assert meta["noise_prior"]["kind"] == "per_element" and meta["noise_prior"]["samples"] == 8
    assert not (plain / PRIOR_FILE).exists() and "noise_prior" not in json.loads((plain / "template.json").read_text())

    # stored stats == hand-computed: 4 references and their mirror images, per element
    latents = [lat.mean[0] for lat in tiny_backbone.encode_images(REFS)]
    stack = torch.stack(latents + [x.flip(-1) for x in latents])
    prior = NoisePrior.load(result)
    torch.testing.assert_close(prior.mean, stack.mean(0))
    torch.testing.assert_close(prior.std, stack.std(0).clamp_min(MIN_STD))

    # the noise the trainer used: per-element empirical mean/std over 80 draws match the prior
    assert len(seen) == 80
    eps, eps_plain = recovered_noise(tiny_backbone, seen, result), recovered_noise(tiny_backbone, plain_seen, plain)

    def mismatch(noise):
        mean_err = ((noise.mean(0) - prior.mean) / prior.std).pow(2).mean().sqrt().item()
        std_err = (noise.std(0) / prior.std).log().abs().mean().item()
        return mean_err, std_err

    mean_err, std_err = mismatch(eps)
    assert mean_err < 0.2 and std_err < 0.15  # sampling error of 80 draws: ~0.11 and ~0.06
    plain_mean_err, plain_std_err = mismatch(eps_plain)
    assert plain_mean_err > 2 * mean_err and plain_std_err > 2 * std_err
    assert abs(eps_plain.mean().item()) < 0.05 and abs(eps_plain.std().item() - 1) < 0.05  # N(0, I)
    losses = [json.loads(line)["loss"] for line in (result / "metrics.jsonl").read_text().splitlines()]
    plain_losses = [json.loads(line)["loss"] for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(a - b) > 1e-4 for a, b in zip(losses, plain_losses, strict=True))


# -- generation --------------------------------------------------------------------------------


def test_generation_starts_from_the_prior(tiny_backbone, runs, tmp_path):
    (result, _), _ = runs
    template = (result, json.loads((result / "template.json").read_text()))
    prior = NoisePrior.load(result)
    c, h, w = prior.mean.shape
    for size, (mean, std) in (((64, 64), (prior.mean, prior.std)), ((96, 64), prior.stats(h, w * 3 // 2))):
        with transformer_inputs(tiny_backbone) as seen:
            generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=3, seed=7, width=size[0], height=size[1],
                                                    noise_prior=True), tmp_path, template)
        start = unpack(seen[0][0], c, *mean.shape[-2:])[0]
        z = torch.randn((1, *mean.shape), generator=torch.Generator().manual_seed(7))[0]
        torch.testing.assert_close(start, mean + std * z)
    # many seeds: the start's per-element statistics are the prior's
    starts = torch.stack([unpack(start_latents(tiny_backbone, prior, s, 64, 64), c, h, w)[0] for s in range(400)])
    assert ((starts.mean(0) - prior.mean) / prior.std).abs().mean() < 0.1
    assert (starts.std(0) / prior.std).log().abs().mean() < 0.08
    # the fused sampler starts from the same latents
    activate_templates(tiny_backbone, [(result, 1.0)])
    cond = tiny_backbone.encode_prompts(["a cow in poster style"])[0]
    trace = []
    latents = start_latents(tiny_backbone, prior, 7, 64, 64)
    fusion.fused_generate(tiny_backbone, cond, [0.5] * 2, seed=7, steps=2, width=64, height=64, latents=latents,
                          trace=trace)
    assert torch.equal(trace[0].latents, latents)


def test_a_standard_prior_reproduces_the_usual_start(tiny_backbone, runs, tmp_path):
    """z is drawn like the pipeline's own start: mean 0, std 1 gives the very same image."""
    (result, _), _ = runs
    folder = tmp_path / "standard"
    shutil.copytree(result, folder)
    prior = NoisePrior.load(result)
    NoisePrior(torch.zeros_like(prior.mean), torch.ones_like(prior.std), samples=8).save(folder)
    template = (folder, json.loads((folder / "template.json").read_text()))
    opts = dict(prompt="a cow", steps=4, seed=2)
    usual = generate(tiny_backbone, GenerateOptions(**opts), tmp_path / "a", template)[0]
    standard = generate(tiny_backbone, GenerateOptions(**opts, noise_prior=True), tmp_path / "b", template)[0]
    styled = generate(tiny_backbone, GenerateOptions(**opts, noise_prior=True), tmp_path / "c",
                      (result, template[1]))[0]
    pixels = [np.asarray(Image.open(p), dtype=np.float32) for p in (usual, standard, styled)]
    assert np.array_equal(pixels[0], pixels[1])
    assert np.abs(pixels[2] - pixels[0]).mean() > 1.0


def test_template_without_a_prior_is_a_clear_error(tiny_backbone, runs, tmp_path, capsys):
    _, (plain, _) = runs
    template = (plain, json.loads((plain / "template.json").read_text()))
    with pytest.raises(InputError, match="no style noise prior.*--noise-prior"):
        generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=2, noise_prior=True), tmp_path, template)
    with pytest.raises(InputError, match="need a template"):
        generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=2, noise_prior=True), tmp_path)


def test_cli_noise_prior(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    store = tmp_path / "store"
    images = []
    for i, img in enumerate(REFS):
        img.save(tmp_path / f"r{i}.png")
        images.append(str(tmp_path / f"r{i}.png"))
    train_args = ["--store", str(store), "train", "--images", *images, "--backbone", "tiny",
                  "--steps", "2", "--preview-every", "0"]
    assert main([*train_args, "--style", "poster", "--name", "with", "--noise-prior",
                 "--run-dir", str(tmp_path / "run1")]) == 0
    assert main([*train_args, "--style", "poster", "--name", "without", "--run-dir", str(tmp_path / "run2")]) == 0
    capsys.readouterr()
    assert (store / "with" / PRIOR_FILE).is_file() and not (store / "without" / PRIOR_FILE).exists()
    out = tmp_path / "out"
    assert main(["--store", str(store), "generate", "--template", "with", "--prompt", "a cow", "--steps", "2",
                 "--noise-prior", "--out", str(out)]) == 0
    assert json.loads(Image.open(next(out.glob("*.png"))).text["studio"])["noise_prior"] is True
    capsys.readouterr()
    assert main(["--store", str(store), "generate", "--template", "without", "--prompt", "a cow",
                 "--noise-prior"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no style noise prior" in err


def test_previews_start_from_the_prior(tiny_backbone, tmp_path):
    from studio.engine.training import PREVIEW_SEED

    run_dir = tmp_path / "run"
    recipe = Recipe(steps=1, grad_accum=1, preview_every=1, preview_steps=2, noise_prior=True)
    prepare_run(TrainRequest(REFS, "poster", "p", recipe), run_dir, "tiny", "flux", 64)
    with transformer_inputs(tiny_backbone) as seen:
        result = train(tiny_backbone, run_dir)
    prior = NoisePrior.load(result)
    for k in range(3):  # the step-0 previews: 3 prompts x 2 denoising steps, seeds PREVIEW_SEED + k
        torch.testing.assert_close(seen[2 * k][0], start_latents(tiny_backbone, prior, PREVIEW_SEED + k, 64, 64))
