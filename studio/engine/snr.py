"""Noise-level samplers: the Style-friendly SNR sampler and its baselines.

Rectified flow mixes data and noise as ``x_t = (1 - t) * x_0 + t * eps`` with ``t = 1`` pure
noise, and its log signal-to-noise ratio is ``lambda_t = 2 * log((1 - t) / t)``.

Style (colours, layout, brush strokes) is decided in the first, high-noise steps of
denoising. The Style-friendly sampler (Choi et al., "Style-Friendly SNR Sampler for
Style-Driven Generation") therefore draws the log-SNR from ``Normal(mu, sigma^2)`` with a low
mean (``mu = -6``) and a wide spread (``sigma = 2..3``) and maps it to a continuous ``t``:

    lambda ~ N(mu, sigma^2),  t = sigmoid(-lambda / 2)

with no time-step shift and no quantisation. The SD3 sampler, kept as the baseline, draws
``logit(t) ~ N(0, 1)`` and shifts it, ``t' = k t / (1 + (k - 1) t)`` with ``k = 3``; that
equals ``lambda ~ N(-2 ln 3, 2^2)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SAMPLERS = ("style_friendly", "sd3", "uniform")

# Paper defaults (seed 000, section 4.1): sigma 3 is best for FLUX-dev, sigma 2 for SD3.5.
DEFAULT_MU = -6.0
DEFAULT_SIGMA = {"flux": 3.0, "sd3": 2.0}
SD3_SHIFT = 3.0


def log_snr(t: torch.Tensor) -> torch.Tensor:
    """Log-SNR of rectified flow: ``2 * log((1 - t) / t)``."""
    return 2.0 * torch.log((1.0 - t) / t)


def t_from_log_snr(lam: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`log_snr`: ``t = sigmoid(-lambda / 2)``."""
    return torch.sigmoid(-lam / 2.0)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time-step shift ``k t / (1 + (k - 1) t)`` (moves samples toward noise)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass(frozen=True)
class NoiseSampler:
    """Draws the noise level ``t`` in (0, 1) of each training sample.

    ``name`` is one of :data:`SAMPLERS`. ``mu``/``sigma`` parameterise the style-friendly
    sampler's log-SNR normal; ``shift`` is the SD3 sampler's shift.
    """

    name: str = "style_friendly"
    mu: float = DEFAULT_MU
    sigma: float = DEFAULT_SIGMA["flux"]
    shift: float = SD3_SHIFT

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if not self.sigma > 0 or not self.shift > 0:
            raise ValueError("sigma and shift must be positive")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return ``n`` float32 noise levels ``t`` in the open interval (0, 1)."""
        if self.name == "style_friendly":
            lam = torch.randn(n, generator=generator) * self.sigma + self.mu
            t = t_from_log_snr(lam)
        elif self.name == "sd3":
            t = shift_t(torch.sigmoid(torch.randn(n, generator=generator)), self.shift)
        else:
            t = torch.rand(n, generator=generator)
        # float32 sigmoid saturates to exactly 1.0 beyond lambda ~ -33; keep t strictly inside
        # (0, 1) so x_t always keeps a trace of the data and log_snr stays finite.
        eps = 1e-6
        return t.float().clamp(eps, 1.0 - eps)

    def quantile(self, q: float) -> float:
        """Closed-form quantile of ``t`` (used by tests and the UI's histogram)."""
        z = math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * q - 1.0)).item()
        if self.name == "style_friendly":
            # t is decreasing in lambda, so the q-quantile of t is at the (1-q)-quantile of lambda.
            lam = self.mu - self.sigma * z
            return 1.0 / (1.0 + math.exp(lam / 2.0))
        if self.name == "sd3":
            u = 1.0 / (1.0 + math.exp(-z))
            return self.shift * u / (1.0 + (self.shift - 1.0) * u)
        return q

    def describe(self) -> dict:
        """Parameters as a plain dict (stored in template.json)."""
        return asdict(self)


def sampler_for(name: str, family: str, mu: float | None = None, sigma: float | None = None,
                shift: float | None = None) -> NoiseSampler:
    """Build a sampler with the paper's defaults for a model family ("flux" or "sd3")."""
    return NoiseSampler(
        name=name,
        mu=DEFAULT_MU if mu is None else mu,
        sigma=DEFAULT_SIGMA.get(family, 2.0) if sigma is None else sigma,
        shift=SD3_SHIFT if shift is None else shift,
    )


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = (1 - t) x_0 + t eps`` with ``t`` broadcast per sample."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity ``eps - x_0``: the plain, unweighted loss target (paper Eq. 3)."""
    return noise - x0


def offset_noise(shape: tuple[int, ...], strength: float, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise plus ``strength`` times a per-(sample, channel) constant (offset noise)."""
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if strength:
        noise = noise + strength * torch.randn(shape[:2] + (1,) * (len(shape) - 2),
                                               generator=generator, dtype=dtype)
    return noise
