"""Memory tiers: which precision of the base weights fits this GPU, and how much memory a run needs.

Most artists have a 12-24 GB card; FLUX.1-dev's transformer alone is 23.8 GB in bf16. A *tier*
says how the frozen base weights are stored; the LoRA itself always trains in fp32 on top:

========  ============================================  ==========================================
tier      base weights                                  typical card (FLUX.1-dev, paper recipe)
========  ============================================  ==========================================
``bf16``  full precision (bf16 on GPUs, fp32 on CPUs)   40 GB and more (32 GB with the levers)
``int8``  8-bit (bitsandbytes LLM.int8 / quanto qint8)  24 GB class
``nf4``   4-bit NF4 (bitsandbytes; QLoRA)               12-16 GB class
========  ============================================  ==========================================

Levers that stack with every tier: the text encoders run once and leave the GPU (always, see
:mod:`studio.engine.training`); when the encoding phase itself would not fit, they never come onto the GPU
and run on the CPU instead (``offload_text_encoders``); gradient checkpointing (on by default on
GPUs); the VAE stays (it decodes previews) and is small.

:func:`choose_tier` picks the best tier whose estimated peak fits (``auto``), or checks the one
asked for, and raises :class:`~studio.errors.InsufficientMemoryError` naming what would fit
otherwise, so a run that cannot fit is refused before any model is loaded, not mid-way.

The estimate (:func:`estimate_peak`) is arithmetic on exact parameter counts, which come from the
model configs by instantiating the models on PyTorch's ``meta`` device (no weights, no memory),
plus an activation model:

* base weights: ``Linear`` weights at the tier's bytes per weight (int8: 1, NF4: 0.53 with the
  block scales); everything else (biases, norms, embeddings) in bf16;
* LoRA: 16 bytes per parameter (fp32 weight, fp32 gradient, Adam's two fp32 moments);
* activations of one micro-step (batch 1): ``tokens = (side / 16)^2 + text tokens``. With gradient
  checkpointing each block keeps its input (``tokens x hidden x 2`` bytes) and one block at a time
  is recomputed; without it every block keeps ``ACT_BYTES[family] x tokens x hidden`` bytes. The
  per-block coefficients (FLUX 54, SD3 44 bytes per token per hidden unit) were measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on the full-size architectures on the meta device,
  with the paper's LoRA attached, not counting views of the weights nor the quadratic attention
  matrix (SDPA's flash kernel does not store it);
* the phases do not overlap: encoding prompts (text encoders on the GPU unless offloaded), a
  training step, a preview (VAE decode: about 6 full-resolution tensors of the decoder's first width);
* the peak of the largest phase, plus 7 % allocator fragmentation and 0.75 GB for the CUDA context
  and cuBLAS workspaces (outside PyTorch's allocator), must fit in 92 % of the card.

"GB" in messages is 2^30 bytes, which is what a card sold as "24 GB" holds.
The GPU benchmark (benchmarks/bench_train.py) prints this estimate beside the measured peak.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import InputError, InsufficientMemoryError

GB = 2**30
TIER_CHOICES = ("auto", "bf16", "int8", "nf4")

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

# -- the activation and overhead model (see the module docstring) ----------------------------------------

ACT_BYTES = {"flux": 54.0, "sd3": 44.0}  # per block, per token and hidden unit, bf16, no checkpointing
DECODE_TENSORS = 6  # full-resolution tensors of the VAE decoder's first width alive at its peak
INFERENCE_ACT_BYTES = 16.0  # per token and hidden unit: a no-grad forward keeps a few tensors of one block
LORA_STATE_BYTES = 16  # fp32 weight + fp32 gradient + Adam exp_avg + exp_avg_sq
FRAGMENTATION = 0.07
CUDA_CONTEXT = 0.75 * GB
USABLE_FRACTION = 0.92  # of the card's total memory: other processes and the desktop need some
HOST_BASELINE = 4 * GB  # Python, torch, diffusers and the data a worker holds in host memory


@dataclass(frozen=True)
class Tier:
    """How the frozen base weights are stored."""

    name: str  # "bf16" | "int8" | "nf4"
    title: str
    linear_bytes: float | None  # bytes per base Linear weight; None: the run's precision (bf16 / fp32)
    card_class: str  # the cards it is meant for (FLUX.1-dev), for people

    @property
    def quantized(self) -> bool:
        return self.linear_bytes is not None


TIERS: dict[str, Tier] = {
    "bf16": Tier("bf16", "full-precision base weights", None, "40 GB and more"),
    "int8": Tier("int8", "8-bit base weights", 1.0, "24 GB class"),
    # NF4: 4 bits + an 8-bit block scale per 64 weights (double quantisation); quanto's int4: 4 bits +
    # a bf16 scale and shift per 128. Both round up to ~0.53 bytes per weight.
    "nf4": Tier("nf4", "4-bit NF4 base weights, QLoRA", 0.53, "12-16 GB class"),
}
TIER_ORDER = ("bf16", "int8", "nf4")  # best fidelity first; auto takes the first that fits


# -- parameter counts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchParams:
    """What the estimate needs to know about a model, counted exactly from its configs."""

    name: str
    family: str  # "flux" | "sd3"
    linear_weights: int  # weights of the transformer's nn.Linear layers: what the 8/4-bit tiers quantise
    other_params: int  # the transformer's other parameters (biases, norms, embeddings): kept in bf16
    lora_per_rank: int  # LoRA parameters per unit of rank on the paper's targets
    text_encoder_params: int
    vae_params: int
    hidden: int
    blocks: int  # transformer blocks: the gradient-checkpointing granularity
    text_tokens: int
    pixels_per_token: int  # image side per token side: VAE downscale x 2 (FLUX packing / SD3 patches)
    vae_width: int  # the VAE decoder's full-resolution channel count

    @property
    def transformer_params(self) -> int:
        return self.linear_weights + self.other_params

    def lora_params(self, rank: int) -> int:
        return self.lora_per_rank * rank


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


def _count_text_encoder(class_name: str, config: dict) -> int:
    import torch
    import transformers

    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config))
    return sum(p.numel() for p in model.parameters())


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
        linear, other, lora, hidden, blocks = _count_transformer(family, tconfig)
        text = sum(_count_text_encoder(cls, cfg) for cls, cfg in encoders)
        vae, factor, width = _count_vae(VAE_16CH)
        return ArchParams(arch, family, linear, other, lora, text, vae, hidden, blocks, text_tokens, factor * 2, width)
    folder = Path(arch)
    index = json.loads((folder / "model_index.json").read_text())
    family = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}.get(index.get("_class_name"))
    if family is None:
        raise InputError(f"{arch}: not a FluxPipeline or StableDiffusion3Pipeline folder")
    linear, other, lora, hidden, blocks = _count_transformer(
        family, json.loads((folder / "transformer" / "config.json").read_text()))
    text = 0
    for sub in sorted(folder.glob("text_encoder*")):
        config = json.loads((sub / "config.json").read_text())
        text += _count_text_encoder(config["architectures"][0], config)
    vae, factor, width = _count_vae(json.loads((folder / "vae" / "config.json").read_text()))
    return ArchParams(folder.name, family, linear, other, lora, text, vae, hidden, blocks,
                      _text_tokens(folder, family), factor * 2, width)


def _text_tokens(folder: Path, family: str) -> int:
    """Text tokens the transformer sees: T5's length (capped as the backbones cap it), plus CLIP's for SD3."""
    t5_dir = folder / ("tokenizer_2" if family == "flux" else "tokenizer_3")
    cap = 512 if family == "flux" else 256
    try:
        length = int(json.loads((t5_dir / "tokenizer_config.json").read_text()).get("model_max_length") or cap)
    except (OSError, ValueError):
        length = cap
    return min(length, cap) + (77 if family == "sd3" else 0)


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
                  ) -> dict[str, int]:
    """Expected peak device memory in bytes (``"peak"``) and its parts, for one run.

    ``mode`` is ``"train"`` (the paper's recipe: batch 1, LoRA of ``rank``) or ``"generate"``.
    ``precision_bytes`` is 2 for bf16 (GPUs) or 4 for fp32 (CPUs). Unquantised tiers store the
    Linear weights at that precision too.
    """
    linear_bytes = precision_bytes if tier.linear_bytes is None else tier.linear_bytes
    base = arch.linear_weights * linear_bytes + arch.other_params * precision_bytes
    vae = arch.vae_params * precision_bytes
    tokens = (resolution // arch.pixels_per_token) ** 2 + arch.text_tokens
    per_block = ACT_BYTES[arch.family] * tokens * arch.hidden * precision_bytes / 2
    parts = {"base_weights": base, "vae": vae,
             "text_encoders": 0 if offload_text_encoders else arch.text_encoder_params * precision_bytes}
    decode = resolution * resolution * arch.vae_width * precision_bytes * DECODE_TENSORS
    inference = INFERENCE_ACT_BYTES * tokens * arch.hidden * precision_bytes / 2
    encode_phase = base + vae + parts["text_encoders"]
    if mode == "train":
        parts["lora_and_adam"] = arch.lora_params(rank) * LORA_STATE_BYTES
        if checkpointing:
            parts["activations"] = arch.blocks * tokens * arch.hidden * precision_bytes + per_block
        else:
            parts["activations"] = arch.blocks * per_block
        train_phase = base + vae + parts["lora_and_adam"] + parts["activations"]
        preview_phase = base + vae + parts["lora_and_adam"] + decode + inference
        phases = (encode_phase, train_phase, preview_phase)
    else:
        phases = (encode_phase, base + vae + decode + inference)
    parts["decode"] = decode
    parts["peak"] = max(phases) * (1 + FRAGMENTATION) + CUDA_CONTEXT
    return {k: int(v) for k, v in parts.items()}


def host_memory_needed(arch: ArchParams, offload_text_encoders: bool, precision_bytes: int = 2) -> int:
    """Host RAM a GPU run needs: the baseline plus the text encoders when they live on the CPU."""
    return int(HOST_BASELINE + (arch.text_encoder_params * precision_bytes if offload_text_encoders else 0))


@dataclass(frozen=True)
class MemoryPlan:
    """The settings a run will use and what it is expected to need."""

    tier: Tier
    arch: str
    resolution: int
    peak_bytes: int  # expected peak GPU memory (host memory on a CPU)
    device_bytes: int | None  # the GPU's total memory; None on a CPU
    ram_bytes: int | None
    offload_text_encoders: bool = False
    gradient_checkpointing: bool = True
    on_gpu: bool = True
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for people: the tier, the expected peak and the levers."""
        if not self.on_gpu:
            kind = "quantised base on the CPU" if self.tier.quantized else "fp32 on the CPU"
            return f"tier {self.tier.name} ({kind}), expected peak ~{gb(self.peak_bytes)} of host memory"
        levers = ["text encoders on the CPU" if self.offload_text_encoders else "text encoders freed after encoding"]
        levers.append("gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing")
        return (f"tier {self.tier.name} ({self.tier.title}), expected peak ~{gb(self.peak_bytes)} of "
                f"{gb(self.device_bytes or 0)} at {self.resolution} px; " + ", ".join(levers))

    def to_dict(self) -> dict:
        return {"tier": self.tier.name, "expected_peak_bytes": self.peak_bytes, "device_bytes": self.device_bytes,
                "resolution": self.resolution, "offload_text_encoders": self.offload_text_encoders,
                "gradient_checkpointing": self.gradient_checkpointing}


def gb(n: int) -> str:
    """Bytes as "12.3 GB" (2^30 bytes: the unit on the card's box)."""
    return f"{n / GB:.1f} GB"


def _fits(arch: ArchParams, tier: Tier, resolution: int, gpu_bytes: int, ram_bytes: int | None, rank: int,
          checkpointing: bool, mode: str) -> tuple[bool, int, dict[str, int], bool]:
    """Does ``tier`` fit? Tries the text encoders on the GPU first, then on the CPU (if RAM allows)."""
    parts: dict[str, int] = {}
    for offload in (False, True):
        if offload and ram_bytes is not None and host_memory_needed(arch, True) > ram_bytes:
            break
        parts = estimate_peak(arch, tier, resolution, rank=rank, checkpointing=checkpointing,
                              offload_text_encoders=offload, mode=mode)
        if parts["peak"] <= gpu_bytes * USABLE_FRACTION:
            return True, parts["peak"], parts, offload
    return False, parts["peak"], parts, True


def choose_tier(gpu_bytes: int | None, ram_bytes: int | None, arch: str | ArchParams, resolution: int,
                override: str | None = None, *, rank: int = 32, checkpointing: bool | None = None,
                mode: str = "train") -> MemoryPlan:
    """The memory plan for a run of ``arch`` at ``resolution`` on a GPU with ``gpu_bytes`` (None: no GPU).

    ``override`` (``bf16`` / ``int8`` / ``nf4``; None or ``auto`` to choose) forces a tier. Raises
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
    names = [override] if override else list(TIER_ORDER)
    for name in names:
        ok, peak, parts, offload = _fits(params, TIERS[name], resolution, gpu_bytes, ram_bytes, rank,
                                         checkpointing, mode)
        if ok:
            return MemoryPlan(TIERS[name], params.name, resolution, peak, gpu_bytes, ram_bytes, offload,
                              checkpointing, True, parts)
    raise InsufficientMemoryError(_refusal(params, gpu_bytes, ram_bytes, resolution, override, rank,
                                           checkpointing, mode))


def _cpu_plan(params: ArchParams, ram_bytes: int | None, resolution: int, override: str | None, rank: int,
              checkpointing: bool, mode: str) -> MemoryPlan:
    """No GPU: unquantised fp32 unless a tier is forced; everything lives in host memory."""
    tier = TIERS[override or "bf16"]
    parts = estimate_peak(params, tier, resolution, rank=rank, checkpointing=checkpointing, mode=mode,
                          precision_bytes=4)
    peak = int(parts["peak"] - CUDA_CONTEXT + HOST_BASELINE)
    if ram_bytes is not None and peak > ram_bytes:
        raise InsufficientMemoryError(
            f"{params.name} needs ~{gb(peak)} of memory at {resolution} px on the CPU; this machine has "
            f"{gb(ram_bytes)}: train on a GPU, or use the tiny backbone")
    return MemoryPlan(tier, params.name, resolution, peak, None, ram_bytes, False, checkpointing, False, parts)


def _refusal(params: ArchParams, gpu_bytes: int, ram_bytes: int | None, resolution: int, override: str | None,
             rank: int, checkpointing: bool, mode: str) -> str:
    """E.g. "needs ~17.0 GB at 1024 px in tier int8 (8-bit ...); this GPU has 16.0 GB - use tier nf4 or 512 px"."""
    def peak(tier: str, res: int) -> tuple[bool, int]:
        ok, value, _, _ = _fits(params, TIERS[tier], res, gpu_bytes, ram_bytes, rank, checkpointing, mode)
        return ok, value

    asked = override or TIER_ORDER[-1]  # auto: the smallest tier is the one that came closest
    _, need = peak(asked, resolution)
    what = "in" if override else "even in its smallest tier,"
    head = (f"{params.name} needs ~{gb(need)} at {resolution} px {what} tier {asked} ({TIERS[asked].title}); "
            f"this GPU has {gb(gpu_bytes)} (a run may use {USABLE_FRACTION:.0%} of it)")
    options = []
    for name in TIER_ORDER:  # another tier at the same size
        ok, value = peak(name, resolution)
        if name != asked and ok:
            options.append(f"tier {name} (~{gb(value)})")
            break
    for res in (1024, 768, 512):  # the largest smaller size (below 512 px the models lose the style) that fits
        if res >= resolution:
            continue
        fitting = [(name, value) for name in ([asked] if override else TIER_ORDER)
                   for ok, value in [peak(name, res)] if ok]
        if fitting:
            name, value = fitting[0]
            options.append(f"{res} px" + ("" if override else f" in tier {name}") + f" (~{gb(value)})")
            break
    if mode == "train" and rank > 8:
        ok, value, _, _ = _fits(params, TIERS[asked], resolution, gpu_bytes, ram_bytes, 8, checkpointing, mode)
        if ok:
            options.append(f"LoRA rank 8 (~{gb(value)})")
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
             checkpointing: bool | None = None, mode: str = "train", device=None) -> MemoryPlan:
    """The memory plan for a backbone on this machine (detected GPU memory and RAM)."""
    from studio.engine.backbones import resolve

    spec = resolve(backbone_id)
    gpu, ram = detect_memory(device)
    return choose_tier(gpu, ram, arch_for_backbone(spec.backbone_id), resolution or spec.default_resolution,
                       requested_tier(tier), rank=rank, checkpointing=checkpointing, mode=mode)


def plan_training(backbone_id: str, recipe, device=None) -> MemoryPlan:
    """:func:`plan_for` with a :class:`~studio.engine.recipe.Recipe` (or its dict)."""
    data = recipe if isinstance(recipe, dict) else recipe.to_dict()
    return plan_for(backbone_id, tier=data.get("tier"), resolution=data.get("resolution"),
                    rank=int(data.get("rank") or 32), checkpointing=data.get("gradient_checkpointing"), device=device)

