"""The training recipe: every hyper-parameter, with the paper's defaults.

Seed 000, appendix A.4: Adam, lr 1e-4, 300 optimiser steps, batch 1 x gradient
accumulation 4, LoRA rank 32 with alpha = rank on the transformer only, gradient
checkpointing, bf16. Style-friendly sampler mu = -6 with sigma = 3 (FLUX) / 2 (SD3.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from studio.checks import MAX_SEED, boolean, finite_float, shown, strict_int, text
from studio.engine.snr import SAMPLERS, NoiseSampler, sampler_for
from studio.errors import InputError

# Upper bounds of the recipe's numbers: far beyond any useful run, low enough that a typo
# (an extra zero or two) is refused at submit time instead of running for days or running out of memory.
MAX_STEPS = 100_000  # optimiser steps; also the largest preview / checkpoint interval
MAX_GRAD_ACCUM = 256
MAX_RANK = 512
MAX_ALPHA = 4096.0
MAX_MU = 20.0  # log-SNR mean: at -20 every t is ~1 (pure noise), at 20 ~0
MAX_SIGMA = 20.0
MAX_SHIFT = 100.0
MAX_GUIDANCE = 30.0  # FLUX's guidance embedding / classifier-free guidance; the UI goes to 15
MIN_RESOLUTION, MAX_RESOLUTION = 32, 2048  # pixel budget side, training and generation
MAX_SAMPLING_STEPS = 200  # denoising steps of a preview or a generation
MAX_PROMPT_CHARS = 1000
MAX_PREVIEW_PROMPTS = 4
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TIERS = ("auto", "bf16", "fp8", "int8", "nf4")

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
    tier: str = "auto"  # memory tier of the base weights (studio.engine.memory): auto | bf16 | fp8 | int8 | nf4
    gradient_checkpointing: bool | None = None  # None: on for GPUs
    # Samples of an optimiser step per forward pass (None: all of them on a CPU; on a GPU as many as
    # the memory plan allows). The gradient is the same as accumulating them one by one.
    micro_batch: int | None = None
    compile_blocks: bool = False  # torch.compile each transformer block (pays on long runs, see BENCHMARKS.md)
    preview_every: int = 50
    preview_steps: int | None = None  # denoising steps for previews; None: backbone default
    preview_prompt: str | None = None
    # The content prompts previewed during training (up to MAX_PREVIEW_PROMPTS); None: the paper's three.
    preview_prompts: list[str] | None = None
    checkpoint_every: int = 50
    default_content: str = "an image"  # content part of "{content} in {style} style" without captions

    def validate(self) -> Recipe:
        """Check every field's type and range (the ``MAX_*`` bounds above); InputError with a readable message.

        Whole-number fields given as integral floats (``300.0``) are normalised to ints in place.
        """
        self.steps = strict_int(self.steps, "steps", 1, MAX_STEPS)
        self.grad_accum = strict_int(self.grad_accum, "gradient accumulation (grad_accum)", 1, MAX_GRAD_ACCUM)
        self.lr = finite_float(self.lr, "learning rate (lr)", 0.0, 1.0, lo_open=True, hi_open=True)
        self.rank = strict_int(self.rank, "LoRA rank", 1, MAX_RANK)
        self.alpha = finite_float(self.alpha, "LoRA alpha", 0.0, MAX_ALPHA, optional=True, lo_open=True)
        self.sampler = text(self.sampler, "sampler", choices=SAMPLERS)
        self.mu = finite_float(self.mu, "mu (log-SNR mean)", -MAX_MU, MAX_MU, optional=True)
        self.sigma = finite_float(self.sigma, "sigma (log-SNR spread)", 0.0, MAX_SIGMA, optional=True, lo_open=True)
        self.shift = finite_float(self.shift, "shift", 0.0, MAX_SHIFT, optional=True, lo_open=True)
        self.offset_noise = finite_float(self.offset_noise, "offset noise", 0.0, 1.0)
        self.noise_prior = boolean(self.noise_prior, "noise prior")
        self.resolution = strict_int(self.resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION, optional=True)
        self.seed = strict_int(self.seed, "seed", 0, MAX_SEED)
        self.train_guidance = finite_float(self.train_guidance, "training guidance", 0.0, MAX_GUIDANCE)
        self.precision = text(self.precision, "precision", choices=PRECISIONS)
        self.tier = text(self.tier, "memory tier", choices=TIERS)
        self.gradient_checkpointing = boolean(self.gradient_checkpointing, "gradient checkpointing", optional=True)
        self.micro_batch = strict_int(self.micro_batch, "micro-batch (samples per forward pass)", 1, MAX_GRAD_ACCUM,
                                      optional=True)
        self.compile_blocks = boolean(self.compile_blocks, "compile blocks")
        self.preview_every = strict_int(self.preview_every, "preview interval (preview_every; 0 turns it off)",
                                        0, MAX_STEPS)
        self.preview_steps = strict_int(self.preview_steps, "preview denoising steps", 1, MAX_SAMPLING_STEPS,
                                        optional=True)
        self.preview_prompt = text(self.preview_prompt, "preview prompt", optional=True, max_chars=MAX_PROMPT_CHARS)
        if self.preview_prompt is not None:
            self.preview_prompt = self.preview_prompt.strip() or None
        self.preview_prompts = _prompt_list(self.preview_prompts)
        self.checkpoint_every = strict_int(self.checkpoint_every,
                                           "checkpoint interval (checkpoint_every; 0 turns it off)", 0, MAX_STEPS)
        self.default_content = text(self.default_content, "default content", max_chars=MAX_PROMPT_CHARS)
        if not self.default_content.strip():
            raise InputError("default content must not be empty (e.g. 'an image')")
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
        if not isinstance(preset, str) or preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = replace(cls(), **PRESETS[preset])
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _prompt_list(value: Any) -> list[str] | None:
    """The sample (preview) prompts: a list of 1-4 texts (blank ones dropped), or None for the defaults."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise InputError(f"preview prompts must be a list of texts (up to {MAX_PREVIEW_PROMPTS}), "
                         f"not {shown(value)}")
    prompts = [" ".join(p.split()) for p in value if p.strip()]
    if len(prompts) > MAX_PREVIEW_PROMPTS:
        raise InputError(f"at most {MAX_PREVIEW_PROMPTS} preview prompts, not {len(prompts)}")
    for p in prompts:
        text(p, "preview prompt", max_chars=MAX_PROMPT_CHARS)
    return list(dict.fromkeys(prompts)) or None


def check_recipe_dict(data: Any, where: str = "recipe") -> dict[str, Any]:
    """Check a stored recipe (template.json's ``recipe``, an imported template's) as strictly as a new one.

    Unknown keys are kept and ignored (older / newer files), missing ones take the defaults for the
    check; every known value must pass :meth:`Recipe.validate`. Returns a copy of ``data`` with the
    known values normalised (e.g. ``512.0`` -> ``512``); InputError naming ``where`` otherwise.
    """
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a JSON object, not {type(data).__name__} {shown(data)}")
    known = {f.name for f in fields(Recipe)}
    try:
        checked = Recipe.from_dict(data).validate().to_dict()
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return {**data, **{k: checked[k] for k in data if k in known}}


def stored_resolution(meta: dict[str, Any], name: str = "the template") -> int | None:
    """The training resolution recorded in a template.json dict (None if there is none).

    Generation uses it as the default size, so a bad stored value (an edited or imported file with
    ``"resolution": 100000`` or ``"abc"``) is refused here, before any memory is allocated.
    """
    recipe = meta.get("recipe") if isinstance(meta, dict) else None
    value = recipe.get("resolution") if isinstance(recipe, dict) else None
    if value is None:
        return None
    try:
        return strict_int(value, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)
    except InputError:
        raise InputError(f"{name} has an unusable stored training resolution {shown(value)} (allowed: "
                         f"{MIN_RESOLUTION} to {MAX_RESOLUTION}); give a resolution, or a width and height") from None
