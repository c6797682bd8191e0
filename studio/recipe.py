"""The training recipe: every hyper-parameter, with the paper's defaults.

Seed 000, appendix A.4: Adam, lr 1e-4, 300 optimiser steps, batch 1 x gradient
accumulation 4, LoRA rank 32 with alpha = rank on the transformer only, gradient
checkpointing, bf16. Style-friendly sampler mu = -6 with sigma = 3 (FLUX) / 2 (SD3.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import InputError
from .snr import SAMPLERS, NoiseSampler, sampler_for

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe.
    "paper": {},
    # A fast look at whether a style is learnable at all.
    "quick": {"steps": 100, "preview_every": 25},
    # The paper's recipe at 1024 px (the pre-training resolution of FLUX.1-dev / SD3.5).
    "high_fidelity": {"resolution": 1024},
}


@dataclass
class Recipe:
    """How to fine-tune one style template. ``None`` means "the backbone's default"."""

    steps: int = 300
    grad_accum: int = 4
    lr: float = 1e-4
    rank: int = 32
    alpha: float | None = None  # None: alpha = rank, as in the paper
    sampler: str = "style_friendly"
    mu: float | None = None
    sigma: float | None = None
    shift: float | None = None
    offset_noise: float = 0.0
    noise_prior: bool = False  # Diffusion in Style: training noise ~ N(mean, std^2) of the references
    resolution: int | None = None  # pixel budget side; None: backbone default (512, tiny 64)
    seed: int = 0
    train_guidance: float = 1.0  # FLUX-dev's guidance embedding while training (paper: 1.0)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    tier: str = "auto"  # memory tier of the base weights (studio.memory): auto | bf16 | int8 | nf4
    gradient_checkpointing: bool | None = None  # None: on for GPUs
    preview_every: int = 50
    preview_steps: int | None = None  # denoising steps for previews; None: backbone default
    preview_prompt: str | None = None
    checkpoint_every: int = 50
    default_content: str = "an image"  # content part of "{content} in {style} style" without captions

    def validate(self) -> Recipe:
        """Check ranges; raise InputError with a readable message."""
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.grad_accum >= 1, "gradient accumulation must be at least 1"),
            (0 < self.lr < 1, "learning rate must be between 0 and 1"),
            (1 <= self.rank <= 512, "LoRA rank must be between 1 and 512"),
            (self.alpha is None or self.alpha > 0, "LoRA alpha must be positive"),
            (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}"),
            (self.sigma is None or self.sigma > 0, "sigma must be positive"),
            (self.shift is None or self.shift > 0, "shift must be positive"),
            (0 <= self.offset_noise <= 1, "offset noise must be between 0 and 1"),
            (isinstance(self.noise_prior, bool), "noise prior must be true or false"),
            (self.resolution is None or 32 <= self.resolution <= 2048,
             "resolution must be between 32 and 2048"),
            (self.precision in ("auto", "bf16", "fp16", "fp32"),
             "precision must be auto, bf16, fp16 or fp32"),
            (self.tier in ("auto", "bf16", "int8", "nf4"), "memory tier must be auto, bf16, int8 or nf4"),
            (self.preview_every >= 0 and self.checkpoint_every >= 0,
             "preview and checkpoint intervals must be >= 0 (0 turns them off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        return self

    def noise_sampler(self, family: str) -> NoiseSampler:
        """The noise-level sampler this recipe trains with on a model family."""
        return sampler_for(self.sampler, family, self.mu, self.sigma, self.shift)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Build from a dict, ignoring unknown keys (older/newer template.json files)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_preset(cls, preset: str = "paper", **overrides: Any) -> Recipe:
        """A preset (see :data:`PRESETS`) with explicit overrides on top."""
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = replace(cls(), **PRESETS[preset])
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
