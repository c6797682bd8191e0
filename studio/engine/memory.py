"""Memory tiers and text-encoder placements: what fits this GPU, in every phase of a job.

Most artists have a 12-24 GB card; FLUX.1-dev's transformer alone is 23.8 GB in bf16, its T5-XXL
text encoder 9.5 GB. A *tier* says how the frozen base weights are stored; the LoRA itself always
trains in fp32 on top:

========  ===================================================  ===========================================
tier      base weights                                         typical card (FLUX.1-dev, paper recipe)
========  ===================================================  ===========================================
``bf16``  full precision (bf16 on GPUs, fp32 on CPUs)          40 GB and more
``fp8``   8-bit float storage, bf16 compute (quanto qfloat8)   24-32 GB class (ai-toolkit's FLUX default)
``int8``  8-bit integer (bitsandbytes LLM.int8 / quanto int8)  by name only: as small as fp8, slower to train
``nf4``   4-bit NF4 (bitsandbytes; QLoRA) / quanto int4        12-16 GB class
========  ===================================================  ===========================================

``auto`` tries bf16, fp8, nf4 (common practice until measured on GPUs; quanto's float8 also runs on
CPUs, see tests/test_memory.py). A *text-encoder placement* says where the text encoders live and
compute (:data:`~studio.engine.memory_phases.PLACEMENTS`): ``gpu`` (on the GPU; on the CPU while a
training runs, moved back to encode), ``swap`` (stored on the CPU, moved to the GPU for each encode),
``gpu-8bit`` / ``gpu-4bit`` (T5 quantised with the tier's backend, staying on the GPU), and as the
last resort ``cpu-fp32`` (they encode on the CPU in fp32; never in bf16, which is ~9x slower there).
Prompt conditionings are cached (:class:`~studio.engine.backbones.base.PromptCache`), so each new
prompt is encoded once. Gradient checkpointing is on by default on GPUs; the VAE stays (it decodes).

A job goes through phases (:mod:`studio.engine.memory_phases`: load, encode, train, preview, a
generation between training steps, end of job, the next job on the warm model), each holding a
different set of tensors. :func:`choose_tier` picks, tier by tier, the first placement whose every
phase fits (``cpu-fp32`` only after every tier failed on the GPU), or checks the tier asked for, and
raises :class:`~studio.errors.InsufficientMemoryError` naming what would fit otherwise, so a run that
cannot fit is refused before any model is loaded, not mid-way.

The estimate is arithmetic on exact parameter counts, which come from the model configs by
instantiating the models on PyTorch's ``meta`` device (no weights, no memory), plus an activation model:

* base weights: ``Linear`` weights at the tier's bytes per weight (fp8 / int8: 1, NF4: 0.53 with the
  block scales); everything else (biases, norms, embeddings) in bf16; text encoders in bf16 (fp32 for
  ``cpu-fp32``, which counts in host RAM), T5's ``Linear`` weights at 1 / 0.53 bytes when quantised;
* LoRA: 16 bytes per parameter (fp32 weight, fp32 gradient, Adam's two fp32 moments);
* activations of one micro-step (batch 1): ``tokens = (side / 16)^2 + text tokens``. With gradient
  checkpointing each block keeps its input (``tokens x hidden x 2`` bytes) and one block at a time
  is recomputed; without it every block keeps ``ACT_BYTES[family] x tokens x hidden`` bytes. The
  per-block coefficients (FLUX 54, SD3 44 bytes per token per hidden unit) were measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on the full-size architectures on the meta device,
  with the paper's LoRA attached, not counting views of the weights nor the quadratic attention
  matrix (SDPA's flash kernel does not store it);
* a VAE decode (and a reference's encode): about 6 full-resolution tensors of the decoder's first
  width; a text-encoder forward: 0.25 GB;
* each phase's bytes, plus 7 % allocator fragmentation and 0.75 GB for the CUDA context and cuBLAS
  workspaces (outside PyTorch's allocator), must fit in 92 % of the card; the host must hold 4 GB
  plus the text encoders whenever they sit on the CPU.

Not modelled: ``from_pretrained`` assembles each component in host memory before it moves to the GPU,
so loading briefly needs host RAM for the largest component; generations between steps are planned
at the training resolution.

"GB" in messages is 2^30 bytes, which is what a card sold as "24 GB" holds.
The GPU benchmark (benchmarks/bench_train.py) prints this estimate beside the measured peak.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from studio.engine.memory_phases import (
    CPU_FP32_FLOPS,
    CUDA_CONTEXT,
    GB,
    GENERATION_PHASES,
    GPU_PLACEMENTS,
    HOST_BASELINE,
    PHASE_ESTIMATORS,
    PLACEMENT_ORDER,
    PLACEMENTS,
    TIER_ORDER,
    TIERS,
    TRAINING_PHASES,
    USABLE_FRACTION,
    ArchParams,
    Placement,
    Setting,
    Tier,
    encode_seconds,
    host_bytes,
    job_phases,
    parts,
    phase_peaks,
)
from studio.errors import InputError, InsufficientMemoryError

__all__ = ["CUDA_CONTEXT", "GB", "GENERATION_PHASES", "HOST_BASELINE", "PHASE_ESTIMATORS", "PLACEMENTS",
           "PLACEMENT_ORDER", "TIERS", "TIER_ORDER", "TRAINING_PHASES", "USABLE_FRACTION", "ArchParams", "MemoryPlan",
           "Placement", "Tier", "arch_params", "choose_tier", "estimate_peak", "job_phases", "plan_for",
           "plan_training"]
TIER_CHOICES = ("auto", "bf16", "fp8", "int8", "nf4")

# -- the full-size reference architectures (the configs of the released checkpoints) -----------------

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
VAE_16CH = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280)

REFERENCE_ARCHS = {  # name: (family, transformer config, [(text encoder class, config kwargs)], text tokens)
    "flux-dev": ("flux", FLUX_DEV_TRANSFORMER, [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)], 512),
    "sd3.5-large": ("sd3", SD35_LARGE_TRANSFORMER, [("CLIPTextModelWithProjection", CLIP_L),
                                                   ("CLIPTextModelWithProjection", CLIP_G),
                                                   ("T5EncoderModel", T5_XXL)], 77 + 256),
    "sd3.5-medium": ("sd3", SD35_MEDIUM_TRANSFORMER, [("CLIPTextModelWithProjection", CLIP_L),
                                                     ("CLIPTextModelWithProjection", CLIP_G),
                                                     ("T5EncoderModel", T5_XXL)], 77 + 256),
}
FAMILY_REFERENCE = {"flux": "flux-dev", "sd3": "sd3.5-large"}  # unknown checkpoints of a family: its largest
CLIP_TOKENS = 77

# -- parameter counts ---------------------------------------------------------------------------------------


def _count_transformer(family: str, config: dict) -> tuple[int, int, int, int, int]:
    """(linear weights, other params, LoRA params per rank, hidden, blocks) of a transformer config."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from studio.engine.backbones.flux import FLUX_LORA_TARGETS
    from studio.engine.backbones.sd3 import SD3_LORA_TARGETS

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    cls, targets = ((FluxTransformer2DModel, FLUX_LORA_TARGETS) if family == "flux"
                    else (SD3Transformer2DModel, SD3_LORA_TARGETS))
    with torch.device("meta"):  # shapes only: no memory, no time
        model = cls.from_config(config)
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            # peft's rule: a target matches the full name or its last dotted parts
            if any(name == t or name.endswith("." + t) for t in targets):
                lora += module.in_features + module.out_features
    total = sum(p.numel() for p in model.parameters())
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    blocks = len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", []))
    return linear, total - linear, lora, hidden, blocks


def _count_text_encoder(class_name: str, config: dict) -> tuple[int, int]:
    """(parameters, nn.Linear weights) of a transformers text-encoder config."""
    import torch
    import transformers

    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters()), linear


def _text_encoder_counts(encoders: list[tuple[str, dict]], family: str, text_tokens: int) -> tuple[int, int, float]:
    """(parameters of all text encoders, T5's Linear weights, FLOPs to encode one prompt)."""
    t5_tokens = text_tokens - (CLIP_TOKENS if family == "sd3" else 0)
    total = t5_linear = 0
    flops = 0.0
    for class_name, config in encoders:
        params, linear = _count_text_encoder(class_name, config)
        total += params
        is_t5 = class_name == "T5EncoderModel"
        t5_linear += linear if is_t5 else 0
        flops += 2.0 * linear * (t5_tokens if is_t5 else CLIP_TOKENS)  # a multiply-add per weight and token
    return total, t5_linear, flops


def _count_vae(config: dict) -> tuple[int, int, int]:
    """(parameters, downscale factor, first decoder width) of an AutoencoderKL config."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    channels = list(vae.config.block_out_channels)
    return sum(p.numel() for p in vae.parameters()), 2 ** (len(channels) - 1), channels[0]


@functools.lru_cache(maxsize=16)
def arch_params(arch: str) -> ArchParams:
    """Exact counts for a reference architecture name (``flux-dev``...) or a local pipeline folder."""
    if arch in REFERENCE_ARCHS:
        family, tconfig, encoders, text_tokens = REFERENCE_ARCHS[arch]
        name, vae_config = arch, VAE_16CH
    else:
        folder = Path(arch)
        index = json.loads((folder / "model_index.json").read_text())
        family = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}.get(index.get("_class_name"))
        if family is None:
            raise InputError(f"{arch}: not a FluxPipeline or StableDiffusion3Pipeline folder")
        tconfig = json.loads((folder / "transformer" / "config.json").read_text())
        encoders = []
        for sub in sorted(folder.glob("text_encoder*")):
            config = json.loads((sub / "config.json").read_text())
            encoders.append((config["architectures"][0], config))
        name, text_tokens = folder.name, _text_tokens(folder, family)
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
    linear, other, lora, hidden, blocks = _count_transformer(family, tconfig)
    text, t5_linear, flops = _text_encoder_counts(encoders, family, text_tokens)
    vae, factor, width = _count_vae(vae_config)
    return ArchParams(name, family, linear, other, lora, text, vae, hidden, blocks, text_tokens, factor * 2, width,
                      t5_linear, flops)


def _text_tokens(folder: Path, family: str) -> int:
    """Text tokens the transformer sees: T5's length (capped as the backbones cap it), plus CLIP's for SD3."""
    t5_dir = folder / ("tokenizer_2" if family == "flux" else "tokenizer_3")
    cap = 512 if family == "flux" else 256
    try:
        length = int(json.loads((t5_dir / "tokenizer_config.json").read_text()).get("model_max_length") or cap)
    except (OSError, ValueError):
        length = cap
    return min(length, cap) + (CLIP_TOKENS if family == "sd3" else 0)


def arch_for_backbone(backbone_id: str) -> str:
    """The architecture :func:`arch_params` counts for a backbone name, folder or hub id."""
    from studio.engine.backbones import KNOWN_BACKBONES, resolve

    if backbone_id in REFERENCE_ARCHS:
        return backbone_id
    if backbone_id == "tiny":
        from studio.engine.backbones.tiny import ensure_tiny_flux

        return str(ensure_tiny_flux())
    spec = resolve(backbone_id)
    if Path(spec.source).is_dir():
        return spec.source
    known = {source: name for name, (_, source) in KNOWN_BACKBONES.items()}
    return known.get(spec.source) if known.get(spec.source) in REFERENCE_ARCHS else FAMILY_REFERENCE[spec.family]


# -- the estimate ----------------------------------------------------------------------------------------


def estimate_peak(arch: ArchParams, tier: Tier, resolution: int, *, rank: int = 32, checkpointing: bool = True,
                  offload_text_encoders: bool = False, mode: str = "train", precision_bytes: int = 2,
                  placement: str | None = None) -> dict[str, int]:
    """Expected peak device memory in bytes (``"peak"``: the largest phase of the job) and its parts.

    ``mode`` is ``"train"`` (the paper's recipe: batch 1, LoRA of ``rank``) or ``"generate"``.
    ``precision_bytes`` is 2 for bf16 (GPUs) or 4 for fp32 (CPUs: one memory holds everything).
    ``placement`` is the text encoders' (default ``gpu``; ``offload_text_encoders`` is the older
    spelling of ``cpu-fp32``, the encoders never on the GPU). Each phase's peak is in
    ``"phase:<name>"``.
    """
    name = placement or ("cpu-fp32" if offload_text_encoders else "gpu")
    setting = Setting(arch, tier, PLACEMENTS[name], resolution, rank, checkpointing, on_gpu=precision_bytes == 2)
    phases = phase_peaks(setting, mode)
    out = {k: int(v) for k, v in parts(setting).items()}
    out.update({f"phase:{k}": v for k, v in phases.items()})
    out["peak"] = max(phases.values())
    return out


def host_memory_needed(arch: ArchParams, placement: str = "gpu") -> int:
    """Host RAM a GPU run needs: the baseline plus the text encoders whenever they sit on the CPU."""
    return host_bytes(Setting(arch, TIERS["bf16"], PLACEMENTS[placement], 512))


@dataclass(frozen=True)
class MemoryPlan:
    """The settings a run will use and what it is expected to need, phase by phase."""

    tier: Tier
    arch: str
    resolution: int
    peak_bytes: int  # expected peak GPU memory over every phase (host memory on a CPU)
    device_bytes: int | None  # the GPU's total memory; None on a CPU
    ram_bytes: int | None
    text_encoder_placement: str = "gpu"
    gradient_checkpointing: bool = True
    on_gpu: bool = True
    parts: dict[str, int] = field(default_factory=dict)
    phase_peaks: dict[str, int] = field(default_factory=dict)  # phase -> predicted peak bytes
    encode_seconds: float | None = None  # estimated CPU seconds per new prompt (cpu-fp32 only)
    micro_batch: int = 1  # samples per training forward pass that fit (train() takes it unless the recipe says)

    @property
    def placement(self) -> Placement:
        return PLACEMENTS[self.text_encoder_placement]

    @property
    def offload_text_encoders(self) -> bool:
        """Whether the text encoders rest on the CPU (the older flag: ``swap`` and ``cpu-fp32``)."""
        return self.on_gpu and self.placement.rest == "cpu"

    def load_kwargs(self) -> dict:
        """What :func:`studio.engine.backbones.load_backbone` needs to load the model this way."""
        return {"tier": self.tier.name, "text_encoder_placement": self.text_encoder_placement}

    def largest_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get) if self.phase_peaks else ""

    def describe(self) -> str:
        """A sentence or two for people: the tier, the expected peak, the text encoders, the phases."""
        if not self.on_gpu:
            kind = "quantised base on the CPU" if self.tier.quantized else "fp32 on the CPU"
            return (f"tier {self.tier.name} ({kind}), expected peak ~{gb(self.peak_bytes)} of host memory; "
                    "text encoders in fp32")
        levers = [self.placement.title + self._encode_note()]
        levers.append("gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing")
        if self.micro_batch > 1:
            levers.append(f"{self.micro_batch} samples per forward pass")
        phases = ", ".join(f"{name.replace('_', ' ')} {v / GB:.1f}" for name, v in self.phase_peaks.items())
        return (f"tier {self.tier.name} ({self.tier.title}), expected peak ~{gb(self.peak_bytes)} of "
                f"{gb(self.device_bytes or 0)} at {self.resolution} px; " + ", ".join(levers)
                + (f"; GB per phase: {phases}" if phases else ""))

    def _encode_note(self) -> str:
        if self.encode_seconds is None:
            return ""
        return (f" (~{self.encode_seconds:.0f} s per new prompt, an estimate at an assumed "
                f"{CPU_FP32_FLOPS / 1e9:.0f} GFLOP/s; repeated prompts are cached)")

    def to_dict(self) -> dict:
        return {"tier": self.tier.name, "expected_peak_bytes": self.peak_bytes, "device_bytes": self.device_bytes,
                "resolution": self.resolution, "text_encoder_placement": self.text_encoder_placement,
                "offload_text_encoders": self.offload_text_encoders, "phase_peaks": dict(self.phase_peaks),
                "encode_seconds_estimate": self.encode_seconds, "gradient_checkpointing": self.gradient_checkpointing,
                "micro_batch": self.micro_batch}


def gb(n: int) -> str:
    """Bytes as "12.3 GB" (2^30 bytes: the unit on the card's box)."""
    return f"{n / GB:.1f} GB"


@dataclass(frozen=True)
class _Candidate:
    """One (tier, placement) tried for a run: its phase peaks, and whether they and the host RAM fit."""

    setting: Setting
    phases: dict[str, int]
    fits: bool

    @property
    def peak(self) -> int:
        return max(self.phases.values())


def _candidate(params: ArchParams, tier: str, placement: str, resolution: int, gpu_bytes: int,
               ram_bytes: int | None, rank: int, checkpointing: bool, mode: str) -> _Candidate:
    setting = Setting(params, TIERS[tier], PLACEMENTS[placement], resolution, rank, checkpointing)
    phases = phase_peaks(setting, mode)
    ram_ok = ram_bytes is None or host_bytes(setting) <= ram_bytes
    return _Candidate(setting, phases, ram_ok and max(phases.values()) <= gpu_bytes * USABLE_FRACTION)


def _first_fit(params: ArchParams, tiers: list[str], resolution: int, gpu_bytes: int, ram_bytes: int | None,
               rank: int, checkpointing: bool, mode: str) -> _Candidate | None:
    """The first (tier, placement) whose every phase fits: GPU-computing placements in every tier
    first; a CPU encode (``cpu-fp32``) only when no tier fits otherwise."""
    for group in (GPU_PLACEMENTS, ("cpu-fp32",)):
        for tier in tiers:
            for placement in group:
                found = _candidate(params, tier, placement, resolution, gpu_bytes, ram_bytes, rank, checkpointing,
                                   mode)
                if found.fits:
                    return found
    return None


def _closest(params: ArchParams, tier: str, resolution: int, gpu_bytes: int, ram_bytes: int | None, rank: int,
             checkpointing: bool, mode: str) -> _Candidate:
    """The placement of ``tier`` with the smallest peak (among those the host RAM allows, if any)."""
    options = [_candidate(params, tier, p, resolution, gpu_bytes, ram_bytes, rank, checkpointing, mode)
               for p in PLACEMENT_ORDER]
    allowed = [c for c in options if ram_bytes is None or host_bytes(c.setting) <= ram_bytes] or options
    return min(allowed, key=lambda c: c.peak)


def choose_tier(gpu_bytes: int | None, ram_bytes: int | None, arch: str | ArchParams, resolution: int,
                override: str | None = None, *, rank: int = 32, checkpointing: bool | None = None,
                mode: str = "train", grad_accum: int = 4) -> MemoryPlan:
    """The memory plan for a run of ``arch`` at ``resolution`` on a GPU with ``gpu_bytes`` (None: no GPU).

    ``grad_accum`` (the recipe's samples per optimiser step) sets the largest micro-batch tried.

    ``override`` (``bf16`` / ``fp8`` / ``int8`` / ``nf4``; None or ``auto`` to choose) forces a tier.
    Every phase of the job (:func:`~studio.engine.memory_phases.job_phases`) must fit. Raises
    :class:`InsufficientMemoryError` when the chosen tier (or, with ``auto``, every tier) would not
    fit; its message says what would.
    """
    params = arch if isinstance(arch, ArchParams) else arch_params(arch)
    override = None if override in (None, "", "auto") else override
    if override is not None and override not in TIERS:
        raise InputError(f"unknown memory tier {override!r}; choose one of {', '.join(TIER_CHOICES)}")
    if gpu_bytes is None:
        return _cpu_plan(params, ram_bytes, resolution, override, rank, bool(checkpointing), mode)
    checkpointing = True if checkpointing is None else checkpointing
    found = _first_fit(params, [override] if override else list(TIER_ORDER), resolution, gpu_bytes, ram_bytes,
                       rank, checkpointing, mode)
    if found is None:
        raise InsufficientMemoryError(_refusal(params, gpu_bytes, ram_bytes, resolution, override, rank,
                                               checkpointing, mode))
    s = found.setting
    batch = largest_micro_batch(s, gpu_bytes, grad_accum) if mode == "train" else 1
    return MemoryPlan(s.tier, params.name, resolution, found.peak, gpu_bytes, ram_bytes, s.placement.name,
                      checkpointing, True, {k: int(v) for k, v in parts(s).items()}, found.phases, encode_seconds(s),
                      batch)


def largest_micro_batch(s: Setting, gpu_bytes: int, grad_accum: int) -> int:
    """How many of an optimiser step's ``grad_accum`` samples can go through the model at once.

    Batching them gives the same gradient as accumulating them one by one and keeps the GPU far
    busier at 512 px; it only costs activation memory, so the train phase is checked with each
    batch size from the whole step down to 1 (which the plan has already shown to fit).
    """
    for batch in range(max(1, grad_accum), 1, -1):
        peak = phase_peaks(dataclasses.replace(s, micro_batch=batch), "train")["train"]
        if peak <= gpu_bytes * USABLE_FRACTION:
            return batch
    return 1


def _cpu_plan(params: ArchParams, ram_bytes: int | None, resolution: int, override: str | None, rank: int,
              checkpointing: bool, mode: str) -> MemoryPlan:
    """No GPU: unquantised fp32 unless a tier is forced; everything (text encoders in fp32) in host memory."""
    setting = Setting(params, TIERS[override or "bf16"], PLACEMENTS["cpu-fp32"], resolution, rank, checkpointing,
                      on_gpu=False)
    phases = phase_peaks(setting, mode)
    peak = max(phases.values())
    if ram_bytes is not None and peak > ram_bytes:
        raise InsufficientMemoryError(
            f"{params.name} needs ~{gb(peak)} of memory at {resolution} px on the CPU; this machine has "
            f"{gb(ram_bytes)}: train on a GPU, or use the tiny backbone")
    return MemoryPlan(setting.tier, params.name, resolution, peak, None, ram_bytes, "cpu-fp32", checkpointing, False,
                      {k: int(v) for k, v in parts(setting).items()}, phases, encode_seconds(setting))


def _refusal(params: ArchParams, gpu_bytes: int, ram_bytes: int | None, resolution: int, override: str | None,
             rank: int, checkpointing: bool, mode: str) -> str:
    """E.g. "needs ~17.0 GB at 1024 px in tier fp8 (...; largest phase: train); this GPU has 16.0 GB - use tier nf4"."""
    def fit(tiers: list[str], res: int, lora_rank: int = rank) -> _Candidate | None:
        return _first_fit(params, tiers, res, gpu_bytes, ram_bytes, lora_rank, checkpointing, mode)

    asked = override or TIER_ORDER[-1]  # auto: the smallest tier is the one that came closest
    closest = _closest(params, asked, resolution, gpu_bytes, ram_bytes, rank, checkpointing, mode)
    phase = max(closest.phases, key=closest.phases.get).replace("_", " ")
    what = "in" if override else "even in its smallest tier,"
    head = (f"{params.name} needs ~{gb(closest.peak)} at {resolution} px {what} tier {asked} ({TIERS[asked].title}; "
            f"largest phase: {phase}); this GPU has {gb(gpu_bytes)} (a run may use {USABLE_FRACTION:.0%} of it)")
    if ram_bytes is not None and host_bytes(closest.setting) > ram_bytes:
        head += f" and the text encoders need more than this machine's {gb(ram_bytes)} of RAM"
    options = []
    other = fit([t for t in TIER_ORDER if t != asked], resolution) if override else None
    if other is not None:  # another tier at the same size
        options.append(f"tier {other.setting.tier.name} (~{gb(other.peak)})")
    for res in (1024, 768, 512):  # the largest smaller size (below 512 px the models lose the style) that fits
        smaller = fit([asked] if override else list(TIER_ORDER), res) if res < resolution else None
        if smaller is not None:
            options.append(f"{res} px" + ("" if override else f" in tier {smaller.setting.tier.name}")
                           + f" (~{gb(smaller.peak)})")
            break
    if mode == "train" and rank > 8:
        small_rank = fit([asked], resolution, 8)
        if small_rank is not None:
            options.append(f"LoRA rank 8 (~{gb(small_rank.peak)})")
    if not options:
        return head + ": nothing fits this GPU; use a larger GPU or the tiny backbone"
    return head + " - use " + " or ".join(options)


# -- detection and the quantisation backends --------------------------------------------------------------


def detect_memory(device=None) -> tuple[int | None, int]:
    """(total memory of the GPU that will run the job, or None without one; total system RAM), in bytes."""
    import psutil
    import torch

    ram = int(psutil.virtual_memory().total)
    if (device is not None and str(device) == "cpu") or not torch.cuda.is_available():
        return None, ram
    _, total = torch.cuda.mem_get_info(torch.device(device) if device is not None else None)
    return int(total), ram


def requested_tier(recipe_tier: str | None) -> str:
    """The recipe's tier, or ``STUDIO_TIER`` when the recipe leaves it on ``auto``."""
    tier = (recipe_tier or "auto").strip()
    if tier == "auto":
        tier = (os.environ.get("STUDIO_TIER") or "auto").strip() or "auto"
    if tier not in TIER_CHOICES:
        raise InputError(f"unknown memory tier {tier!r} (STUDIO_TIER?); choose one of {', '.join(TIER_CHOICES)}")
    return tier


def plan_for(backbone_id: str, *, tier: str | None = "auto", resolution: int | None = None, rank: int = 32,
             checkpointing: bool | None = None, mode: str = "train", device=None, grad_accum: int = 4) -> MemoryPlan:
    """The memory plan for a backbone on this machine (detected GPU memory and RAM)."""
    from studio.engine.backbones import resolve

    spec = resolve(backbone_id)
    gpu, ram = detect_memory(device)
    return choose_tier(gpu, ram, arch_for_backbone(spec.backbone_id), resolution or spec.default_resolution,
                       requested_tier(tier), rank=rank, checkpointing=checkpointing, mode=mode,
                       grad_accum=grad_accum)


def plan_training(backbone_id: str, recipe, device=None) -> MemoryPlan:
    """:func:`plan_for` with a :class:`~studio.engine.recipe.Recipe` (or its dict)."""
    data = recipe if isinstance(recipe, dict) else recipe.to_dict()
    return plan_for(backbone_id, tier=data.get("tier"), resolution=data.get("resolution"),
                    rank=int(data.get("rank") or 32), checkpointing=data.get("gradient_checkpointing"), device=device,
                    grad_accum=int(data.get("grad_accum") or 4))

