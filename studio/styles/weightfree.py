"""Weight-free style metrics: quick, offline companions to DINO / CLIP (issue 16), not replacements.

Three distances, each 0 for identical images, deterministic (fixed sizes, fixed seeds, CPU, float64 /
float32 with one thread's reductions), and needing no downloaded model:

* **colour** (:func:`colour_distance`): sliced Wasserstein-1 distance between the pixel colour
  distributions in CIE Lab (D65), in Lab units (about one just-noticeable difference each). It ignores
  where colours are, so a picture of a moose can match a reference of a house in palette alone.
* **texture** (:func:`texture_distance`): relative distance of Gram matrices of a fixed, seeded
  random-weight three-stage convolutional network (random shallow networks are a known texture
  descriptor: Ustyuzhaninov et al. 2017; Gram matrices: Gatys et al. 2015). The first stage's filters
  are zero-mean, so flat colour alone gives no response: the features are strokes, edges, dots and
  their orientations and colours, pooled over the image. In [0, 1].
* **content** (:func:`content_distance`): 1 - SSIM between colour-edge maps (Sobel magnitude over the
  Lab channels after a light blur) of a generated image and the *base model's* image for the same
  prompt and seed, at 64 px. It tells how much of the base model's layout a template kept, so that "style"
  cannot be won by pasting the reference. In [0, 2], 0 = the same edges.

:class:`WeightFreeScorer` scores a unit's images: colour and texture against the style's
references (the mean over references, as DINO / CLIP-I do), content against the base images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from studio.errors import InputError

METRIC_VERSION = 1  # bump when any number below would change: stored scores are recomputed
WEIGHTFREE_METRICS = (("colour", "colour (Lab SWD)"), ("texture", "texture (Gram)"), ("content", "content (edge)"))

_COLOUR_SIDE = 64  # colour statistics need no detail: 4096 pixels per image
_TEXTURE_SIDE = 128  # tiny's 64 px images are doubled; big images lose only sub-2-px texture
_CONTENT_SIDE = 64  # content is layout: compared at the tiny model's own size, where pixel noise fades
_PROJECTIONS = 64  # sliced Wasserstein directions
_QUANTILES = 128
_SEED = 16  # the random network's and the projections' seed (never change without a METRIC_VERSION bump)
_MAX_IMAGES = 10_000


def _check_image(img: object, what: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise InputError(f"{what} must be a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise InputError(f"{what} is empty")
    return img


def _check_side(side: object) -> int:
    if isinstance(side, bool) or not isinstance(side, int) or not 16 <= side <= 1024:
        raise InputError(f"analysis side must be a whole number from 16 to 1024, got {side!r}")
    return side


def _square(img: Image.Image, side: int) -> np.ndarray:
    """RGB in [0, 1], shape (side, side, 3): shorter side to ``side`` (Lanczos), centre crop."""
    img = _check_image(img, "image").convert("RGB")
    scale = side / min(img.size)
    w, h = max(side, round(img.width * scale)), max(side, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img, dtype=np.float64) / 255.0


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIE Lab (D65 white), L in [0, 100]."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape[-1] != 3 or not np.isfinite(rgb).all():
        raise InputError("rgb_to_lab expects finite values with a last axis of 3")
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


# -- colour ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _directions() -> np.ndarray:
    d = np.random.default_rng(_SEED).normal(size=(_PROJECTIONS, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _colour_signature(img: Image.Image) -> np.ndarray:
    """Quantiles of the Lab pixels projected on fixed directions: (projections, quantiles)."""
    lab = rgb_to_lab(_square(img, _COLOUR_SIDE)).reshape(-1, 3)
    levels = (np.arange(_QUANTILES) + 0.5) / _QUANTILES
    return np.quantile(lab @ _directions().T, levels, axis=0).T


def _colour_between(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def colour_distance(a: Image.Image, b: Image.Image) -> float:
    """Sliced Wasserstein-1 distance between two images' Lab colour distributions (Lab units, >= 0)."""
    return _colour_between(_colour_signature(a), _colour_signature(b))


# -- texture --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _texture_net() -> list:
    """Three 3x3 conv layers (3 -> 24 -> 48 -> 48 channels) with seeded Gaussian weights, no biases."""
    import torch

    g = torch.Generator().manual_seed(_SEED)
    widths = (3, 24, 48, 48)
    weights = []
    for k, (c_in, c_out) in enumerate(zip(widths, widths[1:], strict=False)):
        w = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2.0 / (c_in * 9))
        if k == 0:  # zero-mean first filters: a flat colour gives no response (colour has its own metric)
            w -= w.mean(dim=(1, 2, 3), keepdim=True)
        weights.append(w)
    return weights


def _grams(img: Image.Image) -> list[np.ndarray]:
    """The Gram matrix (channels x channels, mean over positions) after each stage of the network."""
    import torch

    x = torch.from_numpy(_square(img, _TEXTURE_SIDE)).float().permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.25
    grams = []
    with torch.no_grad():
        for k, w in enumerate(_texture_net()):
            if k:
                x = torch.nn.functional.avg_pool2d(x, 2)
            x = torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
            f = x[0].reshape(x.shape[1], -1)
            grams.append((f @ f.T / f.shape[1]).double().numpy())
    return grams


def _texture_between(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    parts = []
    for ga, gb in zip(a, b, strict=True):
        scale = np.linalg.norm(ga) + np.linalg.norm(gb)
        parts.append(0.0 if scale < 1e-12 else float(np.linalg.norm(ga - gb) / scale))
    return float(np.mean(parts))


def texture_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean over the network's stages of ``|G_a - G_b| / (|G_a| + |G_b|)`` (Frobenius), in [0, 1]."""
    return _texture_between(_grams(a), _grams(b))


# -- content --------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _filter(img: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Separable 2-D filter of (H, W, C) or (H, W) with edge padding, same size out."""
    rx, ry = len(kx) // 2, len(ky) // 2
    pad = [(ry, ry), (rx, rx)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="edge")
    h, w = img.shape[:2]
    rows = sum(kx[i] * p[:, i: i + w] for i in range(len(kx)))
    return sum(ky[i] * rows[i: i + h] for i in range(len(ky)))


def _edges(img: Image.Image) -> np.ndarray:
    """Colour-edge magnitude at 64 px: Sobel over L/100, a/100, b/100 after a 1-px Gaussian blur."""
    lab = rgb_to_lab(_square(img, _CONTENT_SIDE)) / 100.0
    g = _gaussian_kernel(1.0)
    lab = _filter(lab, g, g)
    smooth, diff = np.array([1.0, 2.0, 1.0]) / 4, np.array([1.0, 0.0, -1.0]) / 2
    gx, gy = _filter(lab, diff, smooth), _filter(lab, smooth, diff)
    return np.sqrt((gx**2 + gy**2).sum(axis=-1))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5) of two edge maps on a ~[0, 1] range.

    Both constants are 0.03^2: an edge weaker than ~0.03 (a step of about 3 Lab units, near a
    just-noticeable difference) counts as flat, so grain does not read as a change of layout.
    """
    g = _gaussian_kernel(1.5)
    c1 = c2 = 0.03**2

    def blur(x: np.ndarray) -> np.ndarray:
        return _filter(x, g, g)

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(s.mean())


def content_distance(a: Image.Image, b: Image.Image) -> float:
    """1 - SSIM of the two images' colour-edge maps, in [0, 2]; 0 when the edges are the same."""
    return _content_between(_edges(a), _edges(b))


def _content_between(a: np.ndarray, b: np.ndarray) -> float:
    return min(2.0, max(0.0, 1.0 - _ssim(a, b)))


# -- scoring a unit -------------------------------------------------------------------------------


class WeightFreeScorer:
    """Scores generated images with the three weight-free distances (always available)."""

    version = METRIC_VERSION

    def score(self, images: Sequence[Image.Image], references: Sequence[Image.Image],
              base_images: Sequence[Image.Image] | None = None) -> dict[str, Any]:
        """Colour and texture distances of ``images`` to ``references`` (mean over references) and,
        when ``base_images`` (one per image: the base model, same prompt and seed) are given, the
        content distance to them. Returns ``{"colour", "texture", "content", "per_image": {...}}``
        (``content`` None without base images); lower is closer for all three.
        """
        images, references = list(images), list(references)
        if not images or not references:
            raise InputError("give at least one image and one reference image to score")
        if len(images) > _MAX_IMAGES or len(references) > _MAX_IMAGES:
            raise InputError(f"at most {_MAX_IMAGES} images per call")
        if base_images is not None and len(base_images) != len(images):
            raise InputError(f"give one base image per image ({len(images)}), got {len(base_images)}")
        for k, img in enumerate([*images, *references, *(base_images or [])]):
            _check_image(img, f"image {k}")
        ref_colour = [_colour_signature(r) for r in references]
        ref_grams = [_grams(r) for r in references]
        per_image: dict[str, list[float] | None] = {"colour": [], "texture": [], "content": None}
        for img in images:
            c, g = _colour_signature(img), _grams(img)
            per_image["colour"].append(float(np.mean([_colour_between(c, r) for r in ref_colour])))
            per_image["texture"].append(float(np.mean([_texture_between(g, r) for r in ref_grams])))
        if base_images is not None:
            per_image["content"] = [content_distance(img, base) for img, base in zip(images, base_images, strict=True)]
        result: dict[str, Any] = {k: (float(np.mean(v)) if v is not None else None) for k, v in per_image.items()}
        result["per_image"] = per_image
        return result
