"""Style noise prior (Diffusion in Style, seed 003): a style-specific N(mean, std^2) for the noise.

Diffusion in Style observes that the initial latent decides much of an image's colours and
layout, and replaces N(0, I) by a per-element normal fitted to the reference latents, both for
the forward-process noise while fine-tuning and for the sampler's start.

Here the statistics come from the references' (normalised) VAE posterior means. Each sample is
a window of the common latent grid (the smallest reference latent; larger references give
several crops) and its horizontal flip. With at least :data:`MIN_SAMPLES` samples the prior is
per element (C, h, w); with fewer, per-element statistics would be mostly noise, so it falls
back to per-channel statistics (C, 1, 1) over all positions. The std is floored at
:data:`MIN_STD`: near-identical references would otherwise collapse the noise onto one latent.
At other sizes a per-element prior is resized bilinearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from studio.engine import snr
from studio.errors import InputError

if TYPE_CHECKING:
    from studio.engine.backbones.base import Backbone

PRIOR_FILE = "noise_prior.safetensors"
MIN_SAMPLES = 8  # fewer samples (references x crops x flips): per-channel statistics
MIN_STD = 0.05


@dataclass
class NoisePrior:
    """Per-element (C, h, w) or per-channel (C, 1, 1) mean and std of the style's noise."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: int  # how many (augmented) latents the statistics came from

    @property
    def kind(self) -> str:
        return "per_channel" if self.mean.shape[-2:] == (1, 1) else "per_element"

    def stats(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std for a (h, w) latent: as stored, broadcast, or resized bilinearly."""
        if self.kind == "per_channel" or tuple(self.mean.shape[-2:]) == (height, width):
            return self.mean, self.std
        mean, std = (F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
                     for x in (self.mean, self.std))
        return mean, std.clamp_min(MIN_STD)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Turn standard noise ``z`` (B, C, h, w) into the prior's ``mean + std * z``."""
        mean, std = self.stats(z.shape[-2], z.shape[-1])
        return mean.to(z) + std.to(z) * z

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
               offset: float = 0.0) -> torch.Tensor:
        """Draw noise of ``shape`` (B, C, h, w), optionally with offset noise on the standard part."""
        return self.apply(snr.offset_noise(tuple(shape), offset, generator))

    def describe(self) -> dict:
        """The note stored in template.json."""
        return {"file": PRIOR_FILE, "kind": self.kind, "samples": self.samples,
                "shape": list(self.mean.shape), "min_std": MIN_STD}

    def save(self, folder: Path) -> Path:
        path = Path(folder) / PRIOR_FILE
        save_file({"mean": self.mean.float().contiguous(), "std": self.std.float().contiguous()}, path,
                  metadata={"samples": str(self.samples)})
        return path

    @classmethod
    def load(cls, folder: Path) -> NoisePrior:
        """Read a template's prior; InputError if it is missing or damaged."""
        path = Path(folder) / PRIOR_FILE
        if not path.is_file():
            raise InputError(f"template {Path(folder).name!r} has no style noise prior: it was trained without "
                             "one. Train it again with the noise prior option (--noise-prior, or \"Style noise "
                             "prior\" in the Train tab's advanced settings) to use one")
        try:
            with safe_open(str(path), framework="pt") as f:
                mean, std = f.get_tensor("mean").float(), f.get_tensor("std").float()
                samples = int((f.metadata() or {}).get("samples", 0))
        except (SafetensorError, KeyError, OSError, ValueError) as exc:
            raise InputError(f"the noise prior of template {Path(folder).name!r} is damaged: {exc}") from None
        ok = (mean.dim() == 3 and mean.shape == std.shape and bool(torch.isfinite(mean).all())
              and bool(torch.isfinite(std).all()) and bool((std > 0).all()))
        if not ok:
            raise InputError(f"the noise prior of template {Path(folder).name!r} is damaged")
        return cls(mean, std, samples)


def augmented_samples(latents: list[torch.Tensor], stride: int | None = None) -> torch.Tensor:
    """Crops of the common grid (the smallest h and w) of every latent, and their flips: (N, C, h, w).

    ``latents`` are (1, C, h_i, w_i) or (C, h_i, w_i). Crops of larger latents start every
    ``stride`` positions (default: a quarter of the grid side), always including the far edge.
    """
    lats = [x[0] if x.dim() == 4 else x for x in latents]
    gh, gw = min(x.shape[-2] for x in lats), min(x.shape[-1] for x in lats)
    stride = stride or max(1, min(gh, gw) // 4)
    out = []
    for x in lats:
        h, w = x.shape[-2:]
        for top in _starts(h - gh, stride):
            for left in _starts(w - gw, stride):
                crop = x[:, top:top + gh, left:left + gw].float().cpu()
                out += [crop, crop.flip(-1)]
    return torch.stack(out)


def _starts(room: int, stride: int) -> list[int]:
    return sorted(set(range(0, room + 1, stride)) | {room})


def compute_prior(latents: list[torch.Tensor]) -> NoisePrior:
    """Fit the prior to reference latents (their posterior means), see the module docstring."""
    samples = augmented_samples(latents)
    if len(samples) >= MIN_SAMPLES:
        mean, std = samples.mean(0), samples.std(0)
    else:  # pool every position of every sample per channel
        per_channel = samples.transpose(0, 1).reshape(samples.shape[1], -1)
        mean, std = per_channel.mean(1)[:, None, None], per_channel.std(1)[:, None, None]
    return NoisePrior(mean, std.clamp_min(MIN_STD), samples=len(samples))


def start_latents(backbone: Backbone, prior: NoisePrior, seed: int, width: int, height: int) -> torch.Tensor:
    """The sampler's start ``mean + std * z`` for one image, in the pipeline's latent layout.

    ``z`` is drawn as the pipeline draws its own start (same seed, shape and CPU generator,
    fp32), so on an fp32 backbone a prior of mean 0 and std 1 reproduces the usual image.
    """
    shape = (1, *backbone.latent_shape(width, height))
    z = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(int(seed)))
    return backbone.pack_latents(prior.apply(z))
