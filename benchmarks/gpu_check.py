"""One call on a GPU: the studio's GPU numbers for BENCHMARKS.md, in under 8 minutes, as Markdown tables.

    .venv/bin/python benchmarks/gpu_check.py                  # a CUDA GPU: full-size FLUX.1-dev, random weights
    .venv/bin/python benchmarks/gpu_check.py --tiny           # the smoke run (automatic without a CUDA device)
    .venv/bin/python benchmarks/gpu_check.py --budget-s 300 --tiers bf16,nf4 --sizes 512

What it does, in this order, checking the time left before every section (``--budget-s``, default
420 s from the start of the process; a section whose estimated time would not fit is skipped with a
printed note, so the whole call stays under 8 minutes):

1. builds the full-size FLUX.1-dev pipeline *in memory* with random weights, nothing read from or
   written to disk: the transformer (``studio.engine.memory.FLUX_DEV_TRANSFORMER``), the 16-channel
   VAE, CLIP-L and T5-XXL at their real sizes, the tokenizers built locally as the tiny backbone
   builds them, assembled into a ``diffusers.FluxPipeline`` and wrapped in the studio's
   ``FluxBackbone``, so ``studio.engine.training.train`` runs on it unchanged. Every model is
   created on PyTorch's meta device and then given memory part by part (one transformer block at a
   time), filled with random numbers at the scale of PyTorch's default initialisation; for a
   quantised tier each block is quantised right after it is filled, the way diffusers' quantisers
   would (every ``nn.Linear`` becomes a quanto ``QLinear`` or a bitsandbytes 8-bit / 4-bit layer),
   so a card never holds more than the quantised model plus one bf16 block;
2. times one prompt through the text encoders (FLUX pads T5 to 512 tokens) where the memory plan
   places them, and at the end, if time allows, once on the CPU in fp32;
3. for every memory tier the plan (``studio.engine.memory.choose_tier``) says fits the card: a few
   optimiser steps of bench_train's diffusers-style loop and of the studio trainer side by side
   (batch 1 x accumulation 4, LoRA rank 32, the paper recipe otherwise) at 512 px, and at 1024 px
   if time allows: seconds per optimiser step and their ratio, and the peak memory of every phase
   (``PhaseMeter``: ``reset_peak_memory_stats`` / ``max_memory_allocated`` / ``max_memory_reserved``
   at the phase boundaries, the same for both loops) beside the plan's estimate for that phase;
4. once: a 28-step generation at 1024 px (512 px when time is short) and LoRA swap times
   (bench_train's ``generation_bench``), with the generation's peak memory against the plan's;
5. if time allows: whether ``torch.compile`` of the transformer blocks pays for its compile time
   over the paper's 300 steps.

Without a CUDA device (or with ``--tiny``) the same code runs on the tiny backbone's architecture
(its configs, random weights) on the CPU: a smoke run of every code path, in about a minute on two
cores, whose timings and memory figures mean nothing. Not a test.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here: imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train as bt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from studio.engine import memory  # noqa: E402
from studio.engine.recipe import Recipe  # noqa: E402
from studio.engine.training import TrainRequest, prepare_run, train  # noqa: E402
from studio.errors import StudioError  # noqa: E402

GIB = 2**30
PAPER_STEPS = 300
PREVIEW_STEPS = 4  # denoising steps of the trainer's previews here (their memory, not their looks, is measured)
STYLE = "watercolor painting"
GEN_PROMPT = "a wood cabin in watercolor painting style"
# How much slower than bf16 a tier's training step is assumed to be before one was measured (estimates
# only: they decide what fits in the budget). bitsandbytes' LLM.int8 is the slow one.
TIER_SLOWDOWN = {"bf16": 1.0, "fp8": 1.5, "int8": 4.0, "nf4": 2.0}
MATMUL_EFFICIENCY = 0.4  # share of the measured matmul rate a training step reaches, for estimates
COMPILE_GUESS_S = {"cuda": 150.0, "cpu": 10.0}  # regional compile of FLUX's two block kinds, forward + backward


# -- time --------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


class Budget:
    """The time budget of the whole call: a section starts only when its estimate fits what is left."""

    def __init__(self, seconds: float, start: float = START):
        self.seconds = seconds
        self.start = start
        self.notes: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self) -> float:
        """The ``time.perf_counter()`` at which the budget runs out."""
        return self.start + self.seconds

    def allows(self, section: str, estimate_s: float, reserve_s: float = 0.0, quiet: bool = False) -> bool:
        """Whether ``section`` (about ``estimate_s``) fits, keeping ``reserve_s`` for sections that come first.

        When it does not, a note says so (unless ``quiet``) and the caller skips the section.
        """
        if estimate_s + reserve_s <= self.left():
            return True
        if not quiet:
            kept = f", {reserve_s:.0f} s kept for the remaining tiers" if reserve_s else ""
            self.skip(f"{section}: skipped, it needs ~{estimate_s:.0f} s and {max(self.left(), 0):.0f} s "
                      f"of the {self.seconds:.0f} s budget are left{kept}")
        return False

    def skip(self, note: str) -> None:
        self.notes.append(note)
        log(note)


# -- what is built -------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """The configs a FLUX pipeline is built from, and the sizes the check runs at."""

    name: str
    arch: str  # what studio.engine.memory plans for: a reference name or a pipeline folder
    transformer: dict
    vae: dict
    clip: dict  # CLIPTextConfig keyword arguments
    t5: dict  # T5Config keyword arguments
    scheduler: dict
    max_sequence_length: int
    default_resolution: int
    sizes: tuple[int, ...]
    gen_sizes: tuple[int, ...]  # the generation's size, then the one to fall back to when time is short


FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def flux_dev_spec() -> ModelSpec:
    """FLUX.1-dev at its real size: the configs of the released checkpoint (studio.engine.memory)."""
    return ModelSpec(
        name="FLUX.1-dev (full size, random weights)", arch="flux-dev",
        transformer=dict(memory.FLUX_DEV_TRANSFORMER),
        vae={**memory.VAE_16CH, "shift_factor": 0.1159, "scaling_factor": 0.3611},
        clip=dict(memory.CLIP_L), t5=dict(memory.T5_XXL), scheduler=dict(FLUX_SCHEDULER),
        max_sequence_length=512, default_resolution=512, sizes=(512, 1024), gen_sizes=(1024, 512))


def tiny_spec() -> ModelSpec:
    """The tiny backbone's architecture: the configs of its cached folder (built on first use)."""
    from studio.engine.backbones.tiny import TINY_DEFAULT_RESOLUTION, TINY_MAX_SEQUENCE_LENGTH, ensure_tiny_flux

    folder = ensure_tiny_flux()

    def read(part: str, name: str = "config.json") -> dict:
        config = json.loads((folder / part / name).read_text())
        return {k: v for k, v in config.items() if not k.startswith("_")}

    return ModelSpec(
        name="the tiny backbone's architecture (random weights)", arch=str(folder),
        transformer=read("transformer"), vae=read("vae"), clip=read("text_encoder"), t5=read("text_encoder_2"),
        scheduler=read("scheduler", "scheduler_config.json"),
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH, default_resolution=TINY_DEFAULT_RESOLUTION,
        sizes=(TINY_DEFAULT_RESOLUTION, 2 * TINY_DEFAULT_RESOLUTION), gen_sizes=(2 * TINY_DEFAULT_RESOLUTION,
                                                                               TINY_DEFAULT_RESOLUTION))


# -- building in memory ----------------------------------------------------------------------------------------


def fill_random_(tensor: torch.Tensor, name: str, generator: torch.Generator) -> None:
    """Random weights at the scale of PyTorch's default init (variance 1 / (3 fan_in)); norms 1, biases 0."""
    if tensor.dim() >= 2:
        tensor.normal_(0.0, (3.0 * tensor[0].numel()) ** -0.5, generator=generator)
    elif name.endswith("bias"):
        tensor.zero_()
    else:
        tensor.fill_(1.0)


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> None:
    """Give every parameter of ``module`` still on the meta device memory on ``device``, filled at random.

    Tied parameters (T5's shared embedding) stay tied; buffers (real: created outside the meta
    device by ``accelerate.init_empty_weights``) keep their contents and move to ``device``.
    """
    made: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if id(param) not in made:
                data = torch.empty(param.shape, device=device,
                                   dtype=dtype if param.is_floating_point() else param.dtype)
                with torch.no_grad():
                    fill_random_(data, name, generator)
                made[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            setattr(sub, name, made[id(param)])
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_meta:
                raise RuntimeError(f"buffer {name} of {type(sub).__name__} has no contents to move")
            if buffer.device != device:
                setattr(sub, name, buffer.to(device))


def empty_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``factory()`` with its parameters on the meta device (no memory, no init time)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def replace_linears(parent: torch.nn.Module, convert: Callable[[torch.nn.Linear], torch.nn.Module],
                    skip: tuple[torch.nn.Module, ...] = ()) -> None:
    """Replace every plain ``nn.Linear`` under ``parent`` (not under a module in ``skip``) by ``convert(it)``."""
    for name, child in list(parent.named_children()):
        if any(child is s for s in skip):
            continue
        if type(child) is torch.nn.Linear:
            setattr(parent, name, convert(child))
        else:
            replace_linears(child, convert, skip)


class TierUnavailable(StudioError):
    """A memory tier this check cannot build in memory here (no backend, an unknown quantisation config)."""


@dataclass
class Quantiser:
    """How a tier's transformer is quantised in memory: a per-Linear conversion and the model flags peft reads."""

    backend: str  # "quanto" | "bitsandbytes"
    title: str  # e.g. "quanto qint8"
    convert: Callable[[torch.nn.Linear], torch.nn.Module]
    model_flags: dict[str, bool] = field(default_factory=dict)


def quanto_quantiser(weights_dtype: str) -> Quantiser:
    """Every Linear as a frozen quanto ``QLinear`` (what diffusers' ``QuantoConfig`` does while loading)."""
    from optimum import quanto

    qtypes = {"int8": quanto.qint8, "int4": quanto.qint4, "float8": quanto.qfloat8, "int2": quanto.qint2}
    if weights_dtype not in qtypes:
        raise TierUnavailable(f"quanto weights dtype {weights_dtype!r} is not one this check knows")
    qtype = qtypes[weights_dtype]

    def convert(linear: torch.nn.Linear) -> torch.nn.Module:
        qlinear = quanto.QLinear.from_module(linear, weights=qtype)
        qlinear.freeze()  # the bf16 weight becomes the quantised one here
        qlinear.requires_grad_(False)
        return qlinear

    return Quantiser("quanto", f"quanto q{weights_dtype}", convert)


def bitsandbytes_quantiser(config, device: torch.device) -> Quantiser:
    """Every Linear as a bitsandbytes 8-bit (LLM.int8) or 4-bit layer, quantised as diffusers' loader does it.

    The weight goes to the CPU and back: bitsandbytes quantises a parameter when it moves from the
    CPU to the GPU. ``model_flags`` are what peft checks to wrap bitsandbytes layers with its LoRA.
    """
    import bitsandbytes as bnb

    def supported(cls, options: dict) -> dict:
        """The options ``cls`` takes in this bitsandbytes release."""
        accepted = inspect.signature(cls.__new__ if "__new__" in vars(cls) else cls.__init__).parameters
        return {k: v for k, v in options.items() if k in accepted}

    if getattr(config, "load_in_8bit", False):
        def convert(linear: torch.nn.Linear) -> torch.nn.Module:
            layer = empty_model(lambda: bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                has_fp16_weights=config.llm_int8_has_fp16_weight, threshold=config.llm_int8_threshold))
            layer.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False,
                                             has_fp16_weights=config.llm_int8_has_fp16_weight).to(device)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            return layer

        return Quantiser("bitsandbytes", "bitsandbytes LLM.int8", convert, {"is_loaded_in_8bit": True})
    if getattr(config, "load_in_4bit", False):
        options = dict(compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
                       quant_storage=getattr(config, "bnb_4bit_quant_storage", None) or torch.uint8)
        if isinstance(options["quant_storage"], str):
            options["quant_storage"] = getattr(torch, options["quant_storage"])

        def convert(linear: torch.nn.Linear) -> torch.nn.Module:
            layer = empty_model(lambda: bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                compute_dtype=config.bnb_4bit_compute_dtype, **supported(bnb.nn.Linear4bit, options)))
            weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False,
                                       **supported(bnb.nn.Params4bit, {**options, "module": layer}))
            layer.weight = weight.to(device)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            return layer

        return Quantiser("bitsandbytes", f"bitsandbytes {config.bnb_4bit_quant_type}", convert,
                         {"is_loaded_in_4bit": True})
    raise TierUnavailable("a bitsandbytes config that is neither 8-bit nor 4-bit")


def tier_quantiser(tier: str, device: torch.device, dtype: torch.dtype) -> Quantiser | None:
    """The in-memory quantisation of ``tier``, derived from the config the studio would load it with.

    None for an unquantised tier. :class:`TierUnavailable` when the studio's config is one this check
    cannot apply to a built model.
    """
    if not memory.TIERS[tier].quantized:
        return None
    from studio.engine.backbones.quantize import pipeline_quantization_config

    try:
        pipeline_config, _ = pipeline_quantization_config(tier, device, dtype)
    except StudioError as exc:
        raise TierUnavailable(str(exc)) from exc
    config = pipeline_config.quant_mapping["transformer"]
    kind = type(config).__name__
    if kind == "QuantoConfig":
        return quanto_quantiser(config.weights_dtype)
    if kind == "BitsAndBytesConfig":
        return bitsandbytes_quantiser(config, device)
    raise TierUnavailable(f"the studio loads tier {tier} with {kind}, which this check cannot apply in memory")


def fill_in_parts(model: torch.nn.Module, block_lists: tuple[torch.nn.Module, ...], device: torch.device,
                  dtype: torch.dtype, quantiser: Quantiser | None, seed: int) -> torch.nn.Module:
    """Give an empty ``model`` random weights one block at a time, quantising each block right after it.

    The blocks of ``block_lists`` first, then the rest (embedders, norms, heads); peak memory is the
    model as it ends up plus one block in the run's precision.
    """
    generator = torch.Generator(device).manual_seed(seed)
    for block in (block for blocks in block_lists for block in blocks):
        materialise(block, device, dtype, generator)
        if quantiser:
            replace_linears(block, quantiser.convert)
    materialise(model, device, dtype, generator)
    if quantiser:
        replace_linears(model, quantiser.convert, skip=block_lists)
        for flag, value in quantiser.model_flags.items():
            setattr(model, flag, value)
    return model.eval().requires_grad_(False)


def build_transformer(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                      quantiser: Quantiser | None, seed: int = 0) -> torch.nn.Module:
    """The FLUX transformer with random weights on ``device``, quantised block by block for a quantised tier."""
    from diffusers import FluxTransformer2DModel

    model = empty_model(lambda: FluxTransformer2DModel.from_config(spec.transformer))
    lists = tuple(getattr(model, name) for name in ("transformer_blocks", "single_transformer_blocks"))
    return fill_in_parts(model, lists, device, dtype, quantiser, seed)


def build_t5(spec: ModelSpec, device: torch.device, dtype: torch.dtype, quantiser: Quantiser | None = None,
             seed: int = 1) -> torch.nn.Module:
    """The T5 encoder with random weights (quantised block by block for the gpu-8bit / gpu-4bit placements)."""
    from transformers import T5Config, T5EncoderModel

    model = empty_model(lambda: T5EncoderModel(T5Config.from_dict(spec.t5)))
    model.tie_weights()  # the token embedding is shared, as in a loaded T5 (on the meta device it is not yet)
    return fill_in_parts(model, (model.encoder.block,), device, dtype, quantiser, seed)


def build_text_side(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 1):
    """(CLIP tokenizer, CLIP-L text encoder, T5 tokenizer, T5 encoder), random weights, tokenizers built offline."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.engine.backbones.tiny import build_clip_tokenizer, build_t5_tokenizer

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    t5_tokenizer.model_max_length = spec.max_sequence_length
    ids = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
               pad_token_id=clip_tokenizer.pad_token_id)
    clip = empty_model(lambda: CLIPTextModel(CLIPTextConfig.from_dict({**spec.clip, **ids})))
    materialise(clip, device, dtype, torch.Generator(device).manual_seed(seed))
    return clip_tokenizer, clip.eval().requires_grad_(False), t5_tokenizer, build_t5(spec, device, dtype, seed=seed)


def build_vae(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 2):
    from diffusers import AutoencoderKL

    vae = empty_model(lambda: AutoencoderKL.from_config(spec.vae))
    materialise(vae, device, dtype, torch.Generator(device).manual_seed(seed))
    return vae.eval().requires_grad_(False)


def param_count(module: torch.nn.Module) -> int:
    """Parameters as built (a packed quantised weight counts its stored elements)."""
    return sum(p.numel() for p in module.parameters())


def fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


# -- the backbone --------------------------------------------------------------------------------------------


def plan_placement(plan) -> str:
    """The plan's text-encoder placement (``studio.engine.memory_phases.PLACEMENTS``)."""
    return str(getattr(plan, "text_encoder_placement", None) or ("swap" if plan.offload_text_encoders else "gpu"))


def encoder_home(placement: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision the text encoders rest (``Backbone.load`` puts them there from a folder)."""
    from studio.engine.backbones.base import encoder_devices

    return encoder_devices(placement, device)[0], torch.float32 if placement == "cpu-fp32" else dtype


def t5_quantiser(backbone, bits: int) -> Quantiser:
    """The in-memory quantisation of T5 for the gpu-8bit / gpu-4bit placements, from the studio's own config."""
    from studio.engine.backbones.quantize import pipeline_quantization_config

    pipeline_config, _ = pipeline_quantization_config("bf16", backbone.device, backbone.dtype,
                                                      text_encoder=(backbone.t5_component, bits))
    config = pipeline_config.quant_mapping[backbone.t5_component]
    kind = type(config).__name__
    if kind == "QuantoConfig":  # transformers' QuantoConfig names the weights' type "weights"
        return quanto_quantiser(str(getattr(config, "weights", None) or config.weights_dtype))
    if kind == "BitsAndBytesConfig":
        return bitsandbytes_quantiser(config, backbone.device)
    raise TierUnavailable(f"T5 in {bits} bits uses {kind}, which this check cannot apply in memory")


def place_text_encoders(check: Check, placement: str) -> None:
    """Put the text encoders where ``placement`` says they rest, T5 quantised for gpu-8bit / gpu-4bit.

    What ``Backbone.load`` does from a folder: T5 is rebuilt (random again) when the placement needs
    it in another form than it is; the backbone's placement says where it computes.
    """
    from studio.engine.backbones.quantize import ENCODER_BITS

    backbone = check.backbone
    bits = ENCODER_BITS.get(placement) if check.on_gpu else None
    home, dtype = encoder_home(placement, backbone.device, backbone.dtype)
    if bits != check.t5_bits:
        backbone.pipe.text_encoder_2 = None
        gc.collect()
        if check.on_gpu:
            torch.cuda.empty_cache()
        quantiser = t5_quantiser(backbone, bits) if bits else None
        t0 = time.perf_counter()
        backbone.pipe.text_encoder_2 = build_t5(check.spec, backbone.device if bits else home, dtype, quantiser)
        check.t5_bits = bits
        check.report.build.append((f"text encoder T5 for placement {placement}",
                                   fmt_count(param_count(backbone.pipe.text_encoder_2)),
                                   quantiser.title if quantiser else str(dtype).split(".")[-1],
                                   (backbone.device if bits else home).type, f"{time.perf_counter() - t0:.1f}"))
    for name, module in backbone.offload_modules().items():
        if not (bits and name == backbone.t5_component):  # quantised encoders stay where they were made
            module.to(home, dtype)
    backbone.text_encoder_placement = placement
    if check.on_gpu:
        torch.cuda.empty_cache()


def forget_prompts(backbone) -> None:
    """Empty the backbone's prompt cache, so the next loop encodes its prompts (and its encode phase is real)."""
    cache = getattr(backbone, "prompt_cache", None)
    if cache is not None:
        cache.clear()


def make_backbone(spec: ModelSpec, pipe, device: torch.device, dtype: torch.dtype):
    """The studio's FluxBackbone around an in-memory pipeline (what ``FluxBackbone.load`` returns from a folder)."""
    from studio.engine.backbones.flux import FluxBackbone

    pipe.set_progress_bar_config(disable=True)
    backbone = FluxBackbone("gpu-check-random", "in memory", pipe, device, dtype)
    backbone.max_sequence_length = spec.max_sequence_length
    backbone.default_resolution = spec.default_resolution
    return backbone


def set_transformer(backbone, transformer: torch.nn.Module | None, tier: str, backend: str | None) -> None:
    """Swap the pipeline's transformer (None frees the old one first) and record its tier."""
    backbone.pipe.transformer = transformer
    backbone.tier, backbone.quant_backend = tier, backend
    backbone.__dict__.pop("_image_ids_cache", None)
    gc.collect()
    if backbone.device.type == "cuda":
        torch.cuda.empty_cache()


# -- measuring -------------------------------------------------------------------------------------------------


@dataclass
class LoopResult:
    """One training loop's seconds per optimiser step and the peak memory of each of its phases."""

    times: list[float]
    phases: dict[str, tuple[int, int]]  # phase -> (peak allocated, peak reserved) bytes
    template: Path | None = None  # the studio trainer's result folder

    def step_s(self, warmup: int) -> float:
        return statistics.median(self.times[warmup:] or self.times)


class PhaseObserver(bt.Timer):
    """The studio trainer's observer: seconds per step, a phase mark after every step and preview.

    Past ``deadline`` (``time.perf_counter()``) it stops the run (the trainer raises CancelledError):
    a section far slower than its estimate cannot push the whole check past its budget.
    """

    def __init__(self, device: torch.device, meter: bt.PhaseMeter, deadline: float = float("inf")):
        super().__init__(device)
        self.meter = meter
        self.deadline = deadline

    def should_stop(self) -> bool:
        return time.perf_counter() > self.deadline

    def on_step(self, report) -> None:
        super().on_step(report)
        self.meter.mark("train")

    def on_preview(self, step: int, files: list[Path]) -> None:
        self.meter.mark("preview")


def recipe_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Recipe)}


def check_recipe(size: int, steps: int, rank: int, grad_accum: int, previews: bool = True,
                 compiled: bool = False) -> Recipe:
    """The paper recipe, shortened to ``steps``; previews (if any) at the start and the end, no checkpoints."""
    extra = {"compile_blocks": True} if compiled and "compile_blocks" in recipe_fields() else {}
    return Recipe(rank=rank, resolution=size, grad_accum=grad_accum, steps=steps,
                  preview_every=steps if previews else 0, preview_steps=PREVIEW_STEPS, checkpoint_every=0, **extra)


def run_studio(backbone, image: Image.Image, recipe: Recipe, tmp: Path, deadline: float = float("inf")) -> LoopResult:
    """``studio.engine.training.train`` on one reference, its phases marked from the outside.

    ``encode`` ends where the trainer sends the text encoders away (``offload_encoders``, wrapped on
    this instance for the call), ``train`` and ``preview`` at each observer call, ``end_of_job``
    when ``train`` has returned (result written, LoRA freed, text encoders back).
    """
    run_dir = tmp / f"studio-{time.time_ns()}"
    forget_prompts(backbone)
    prepare_run(TrainRequest([image], STYLE, "gpu-check", recipe), run_dir, backbone.backbone_id, backbone.family,
                recipe.resolution)
    meter = bt.PhaseMeter(backbone.device)
    observer = PhaseObserver(backbone.device, meter, deadline)
    offload = backbone.offload_encoders

    def offload_after_encoding(*args, **kwargs):
        meter.mark("encode")
        return offload(*args, **kwargs)

    backbone.offload_encoders = offload_after_encoding
    meter.mark(None)
    try:
        template = train(backbone, run_dir, observer)
    finally:
        del backbone.offload_encoders  # the class's method again
    meter.mark("end_of_job")
    return LoopResult(observer.times, dict(meter.peaks), template)


def run_diffusers_style(backbone, image: Image.Image, recipe: Recipe) -> LoopResult:
    """bench_train's diffusers-style loop with the same phase marks."""
    meter = bt.PhaseMeter(backbone.device)
    forget_prompts(backbone)
    times, _ = bt.diffusers_style_loop(backbone, image, f"an image in {STYLE} style", recipe, recipe.steps,
                                       phases=meter)
    return LoopResult(times, dict(meter.peaks))


def time_encode(backbone, reps: int) -> float:
    """Median seconds to encode one new prompt (CLIP + T5 padded to ``max_sequence_length``), after a warm-up.

    Includes what the placement does around an encode (``swap`` moves the encoders in and out).
    """
    forget_prompts(backbone)
    backbone.encode_prompts([GEN_PROMPT])
    times = []
    for _ in range(reps):
        forget_prompts(backbone)  # a new prompt each time: the studio caches conditionings
        bt.sync(backbone.device)
        t0 = time.perf_counter()
        backbone.encode_prompts([GEN_PROMPT])
        bt.sync(backbone.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def cpu_fp32_encoders(backbone) -> Iterator[float]:
    """The ``cpu-fp32`` placement for the block (yields the seconds the move took), then back as they were."""
    modules = list(backbone.offload_modules().values())
    homes = [(next(m.parameters()).device, next(m.parameters()).dtype) for m in modules]
    placement = backbone.text_encoder_placement
    t0 = time.perf_counter()
    for module in modules:
        module.to("cpu", torch.float32)
    backbone.text_encoder_placement = "cpu-fp32"
    try:
        yield time.perf_counter() - t0
    finally:
        backbone.text_encoder_placement = placement
        for module, (home, home_dtype) in zip(modules, homes, strict=True):
            module.to(home, home_dtype)
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_overhead() -> int:
    """Device memory in use outside PyTorch's allocator (CUDA context, libraries; other processes too)."""
    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return max(0, int(total - free - torch.cuda.memory_reserved()))


# -- the plan's side ------------------------------------------------------------------------------------------


def plan_phase_peaks(plan) -> tuple[dict[str, int], str]:
    """The plan's expected peak per phase (fragmentation and fixed overhead included), and where it came from.

    ``MemoryPlan.phase_peaks`` where the planner has it; otherwise derived from ``plan.parts`` the
    way the older estimate combined them (encode, train, preview).
    """
    phases = getattr(plan, "phase_peaks", None)
    if phases:
        return {str(k): int(v) for k, v in dict(phases).items()}, "MemoryPlan.phase_peaks"
    parts = plan.parts or {}
    model = parts.get("base_weights", 0) + parts.get("vae", 0)
    raw = {"encode": model + parts.get("text_encoders", 0)}
    if "lora_and_adam" in parts:
        raw["train"] = model + parts["lora_and_adam"] + parts.get("activations", 0)
        raw["preview"] = model + parts["lora_and_adam"] + parts.get("decode", 0)
    overhead = memory.CUDA_CONTEXT if plan.on_gpu else memory.HOST_BASELINE
    derived = {k: int(v * (1 + getattr(memory, "FRAGMENTATION", 0.07)) + overhead) for k, v in raw.items()}
    return derived, "derived from MemoryPlan.parts (no phase_peaks in this planner)"


# -- estimates (what fits the budget) ----------------------------------------------------------------------------


@dataclass
class Estimator:
    """Rough seconds for each section, from the FLOPs of the model and what was measured so far."""

    arch: memory.ArchParams
    rate: float  # measured matmul FLOP/s of the device, in the run's dtype
    device: torch.device
    grad_accum: int
    steps: int  # warm-up + timed optimiser steps per loop
    measured_step: dict[tuple[str, int], float] = field(default_factory=dict)  # (tier, size) -> s / step
    build_s: dict[str, float] = field(default_factory=dict)

    @property
    def fixed_s(self) -> float:
        """Per-run overhead: encoding, VAE, writing the LoRA, moving the text encoders."""
        return 15.0 if self.device.type == "cuda" else 1.0

    def forward_flops(self, size: int) -> float:
        tokens = (size // self.arch.pixels_per_token) ** 2 + self.arch.text_tokens
        return 2.0 * self.arch.linear_weights * tokens + 4.0 * tokens**2 * self.arch.hidden * self.arch.blocks

    def forward_s(self, tier: str, size: int) -> float:
        return self.forward_flops(size) / (self.rate * MATMUL_EFFICIENCY) * TIER_SLOWDOWN.get(tier, 3.0)

    def step_s(self, tier: str, size: int) -> float:
        if (tier, size) in self.measured_step:
            return self.measured_step[(tier, size)]
        if self.measured_step:  # scale a measured step by FLOPs and the tiers' assumed slowdowns
            (known_tier, known_size), seconds = next(iter(self.measured_step.items()))
            return (seconds * self.forward_flops(size) / self.forward_flops(known_size)
                    * TIER_SLOWDOWN.get(tier, 3.0) / TIER_SLOWDOWN.get(known_tier, 3.0))
        return 4 * self.grad_accum * self.forward_s(tier, size)  # forward, recompute, backward (2x)

    def training_s(self, tier: str, size: int) -> float:
        """Both loops at one size, with the studio's two preview rounds (3 images each)."""
        previews = 2 * 3 * PREVIEW_STEPS * self.forward_s(tier, size)
        return 2 * self.steps * self.step_s(tier, size) + previews + 2 * self.fixed_s

    def build(self, tier: str) -> float:
        if tier in self.build_s:
            return self.build_s[tier]
        known = self.build_s.get("bf16") or next(iter(self.build_s.values()), 30.0)
        return known * (1.0 if not memory.TIERS[tier].quantized else 3.0) + 5.0

    def tier_s(self, tier: str, size: int) -> float:
        return self.build(tier) + self.training_s(tier, size)

    def generation_s(self, tier: str, size: int, steps: int) -> float:
        return 2 * steps * self.forward_s(tier, size) + self.fixed_s

    def compile_s(self, tier: str, size: int) -> float:
        return COMPILE_GUESS_S[self.device.type] + self.steps * self.step_s(tier, size) + self.fixed_s


# -- the report ---------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Rows of every table, printed at the end (a failed or skipped section leaves a note instead)."""

    build: list[tuple] = field(default_factory=list)
    encode: list[tuple] = field(default_factory=list)
    speed: list[tuple] = field(default_factory=list)
    memory: list[tuple] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)
    generation: list[tuple] = field(default_factory=list)
    compiled: list[tuple] = field(default_factory=list)


def gib(n: int | None, on_gpu: bool) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f}" if on_gpu else "n/a (CPU)"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.4f}" if seconds < 10 else f"{seconds:.1f}"


def phase_rows(tier: str, size: int, plan, loops: dict[str, LoopResult], load_peak: tuple[int, int] | None,
               overhead: int, on_gpu: bool) -> list[tuple]:
    """Memory rows of one (tier, size): every phase the plan or a loop has, plan beside each loop's measure.

    A measured cell is "allocated / held": PyTorch's peak allocated bytes, and its peak reserved bytes
    plus the memory outside its allocator (CUDA context) - the second is what the plan's figure
    (fragmentation and context included) predicts.
    """
    expected, _ = plan_phase_peaks(plan)
    order = list(dict.fromkeys(["load", *expected, "encode", "train", "preview", "end_of_job"]))

    def cell(peak: tuple[int, int] | None) -> str:
        if peak is None:
            return "-"
        if not on_gpu:
            return "n/a (CPU)"
        return f"{peak[0] / GIB:.2f} / {(peak[1] + overhead) / GIB:.2f}"

    rows = []
    for phase in order:
        measured = [load_peak if phase == "load" else loop.phases.get(phase) for loop in loops.values()]
        if phase not in expected and all(m is None for m in measured):
            continue
        rows.append((tier, size, phase, gib(expected.get(phase), True), *(cell(m) for m in measured)))
    held = [max((p[1] for p in loop.phases.values()), default=0) + overhead for loop in loops.values()]
    rows.append((tier, size, "whole run (plan's peak_bytes)", gib(plan.peak_bytes, True),
                 *(f"- / {h / GIB:.2f}" if on_gpu else "n/a (CPU)" for h in held)))
    return rows


def table(headers: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def versions() -> str:
    names = ["torch", "diffusers", "transformers", "peft", "accelerate", "optimum-quanto", "bitsandbytes"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def print_report(report: Report, spec: ModelSpec, args, budget: Budget, header: str, on_gpu: bool,
                 rate: float, dtype: torch.dtype, phase_source: str) -> None:
    print(header)
    if not on_gpu:
        print("\n**not a GPU: smoke run** - the tiny backbone's architecture with random weights on the CPU. "
              "Every code path ran; the timings and memory figures mean nothing.")
    print(f"\nbudget {budget.seconds:.0f} s, the whole check took {budget.elapsed():.0f} s; measured matmul rate "
          f"{rate / 1e12:.3f} TFLOP/s ({str(dtype).split('.')[-1]}); {spec.name}; LoRA rank {args.rank}, batch 1 x "
          f"accumulation {args.grad_accum}, {args.warmup} warm-up + {args.steps} timed optimiser steps per loop "
          f"(median of the timed ones); previews of the trainer at {PREVIEW_STEPS} steps")
    print("\n## Build (in memory, random weights)\n")
    print(table(["component", "parameters (stored elements)", "stored as", "on", "seconds"], report.build))
    print("\n## Text encoders: one prompt, T5 padded to "
          f"{spec.max_sequence_length} tokens\n")
    print(table(["where", "dtype", "placement (plan)", "seconds per prompt", "note"], report.encode))
    print("\n## Training: seconds per optimiser step\n")
    print(table(["tier", "px", "base weights", "text encoders (plan)", "diffusers-style loop", "studio trainer",
                 "studio / diffusers-style", f"studio, {PAPER_STEPS} steps (min)"], report.speed))
    if report.plans:
        print("\nplans (studio.engine.memory.choose_tier):\n")
        print("\n".join(f"- {line}" for line in report.plans))
    print("\n## Peak memory per phase (GiB)\n")
    print(f"plan: {phase_source}; measured: \"allocated / held\" - peak `max_memory_allocated`, and peak "
          "`max_memory_reserved` + memory outside PyTorch's allocator (CUDA context), between the phase "
          "boundaries, the same for both loops (\"-\": the loop has no such phase)\n")
    print(table(["tier", "px", "phase", "plan", "diffusers-style loop", "studio trainer"], report.memory))
    print("\n## Generation and LoRA swaps (warm pipeline)\n")
    print(table(["what", "tier", "seconds", "peak memory, allocated / held (GiB)", "plan (GiB)"],
                report.generation))
    print("\n## torch.compile of the transformer blocks (studio trainer)\n")
    print(table(["tier", "px", "backend", "compile time (s)", "s / step eager", "s / step compiled",
                 f"saved over {PAPER_STEPS} steps (s)", "pays off"], report.compiled))
    print("\n## Skipped and notes\n")
    print("\n".join(f"- {note}" for note in budget.notes) if budget.notes else "- nothing skipped")


# -- the sections -------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """Everything the sections share."""

    args: argparse.Namespace
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    report: Report
    estimator: Estimator
    backbone: object
    tmp: Path
    gpu_bytes: int | None
    ram_bytes: int
    overhead: int = 0
    t5_bits: int | None = None  # T5 as built: None (the run's precision), 8 or 4
    template: Path | None = None  # a trained LoRA, for the generation section
    phase_source: str = "-"
    studio_step: dict[tuple[str, int], float] = field(default_factory=dict)  # (tier, size) -> s / step

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def plan(self, tier: str, size: int, mode: str = "train"):
        return memory.choose_tier(self.gpu_bytes, self.ram_bytes, self.spec.arch, size, tier, rank=self.args.rank,
                                  mode=mode)

    def attempt(self, section: str, fn: Callable, *args):
        """Run one section; a failure becomes a note (with the traceback on stderr), and the check goes on."""
        log(section)
        try:
            return fn(*args)
        except Exception as exc:  # a benchmark reports what failed and measures the rest
            traceback.print_exc(file=sys.stderr)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.budget.skip(f"{section}: failed, {type(exc).__name__}: {message[:300]}")
            gc.collect()
            if self.on_gpu:
                torch.cuda.empty_cache()
            return None


def build_tier(check: Check, tier: str, placement: str) -> bool:
    """Free the previous transformer, build this tier's, put the text encoders where the plan says."""
    set_transformer(check.backbone, None, tier, None)
    quantiser = tier_quantiser(tier, check.device, check.dtype)
    meter = bt.PhaseMeter(check.device)
    meter.mark(None)
    t0 = time.perf_counter()
    try:
        transformer = build_transformer(check.spec, check.device, check.dtype, quantiser)
    except Exception as exc:
        if quantiser is None or quantiser.backend != "bitsandbytes":
            raise
        traceback.print_exc(file=sys.stderr)
        check.budget.skip(f"tier {tier}: bitsandbytes could not quantise in memory ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); built with quanto instead")
        set_transformer(check.backbone, None, tier, None)
        quantiser = quanto_quantiser("int8" if tier in ("int8", "fp8") else "int4")
        transformer = build_transformer(check.spec, check.device, check.dtype, quantiser)
    bt.sync(check.device)
    seconds = time.perf_counter() - t0
    set_transformer(check.backbone, transformer, tier, quantiser.backend if quantiser else None)
    place_text_encoders(check, placement)
    meter.mark("load")
    check.estimator.build_s[tier] = seconds
    stored = quantiser.title if quantiser else str(check.dtype).split(".")[-1]
    check.report.build.append((f"transformer (tier {tier})", fmt_count(param_count(transformer)), stored,
                               check.device.type, f"{seconds:.1f}"))
    check.backbone.__dict__["_gpu_check_load_peak"] = meter.peaks.get("load")
    return True


def encode_section(check: Check, placement: str) -> None:
    """The prompt's encode time where the plan places the text encoders."""
    backbone = check.backbone
    where = backbone.encoder_device()
    dtype = next(backbone.pipe.text_encoder_2.parameters()).dtype
    seconds = time_encode(backbone, reps=3)
    check.report.encode.append((where.type, str(dtype).split(".")[-1], placement, fmt_s(seconds),
                                "median of 3 after a warm-up"))


def cpu_encode_section(check: Check) -> None:
    """One prompt on the CPU in fp32 (the last-resort placement), beside the planner's own estimate."""
    backbone = check.backbone
    if check.t5_bits:
        check.budget.skip("text encoders on the CPU in fp32: not run, T5 is quantised for this placement")
        return
    with cpu_fp32_encoders(backbone) as move_s:
        seconds = time_encode(backbone, reps=1)
    planned = ""
    flops = getattr(check.estimator.arch, "text_encoder_flops", 0.0)
    try:
        from studio.engine import memory_phases

        if flops:
            planned = f"; the planner estimates {flops / memory_phases.CPU_FP32_FLOPS:.1f} s"
    except ImportError:
        pass
    check.report.encode.append(("cpu", "float32", "cpu-fp32 (last resort)", fmt_s(seconds),
                                f"{torch.get_num_threads()} threads, one prompt after a warm-up; moving the "
                                f"encoders there took {move_s:.1f} s{planned}"))


def training_section(check: Check, tier: str, size: int, plan) -> None:
    """Both loops at one size: speed rows and memory rows."""
    args, backbone = check.args, check.backbone
    image = Image.new("RGB", (size, size), (200, 80, 40))
    n = args.warmup + args.steps
    recipe = check_recipe(size, n, args.rank, args.grad_accum)
    diffusers = run_diffusers_style(backbone, image, recipe)
    studio = run_studio(backbone, image, recipe, check.tmp, check.budget.deadline())
    check.overhead = max(check.overhead, cuda_overhead())
    if check.template is None:
        check.template = studio.template
    elif studio.template is not None:
        shutil.rmtree(studio.template.parent, ignore_errors=True)
    d_step, s_step = diffusers.step_s(args.warmup), studio.step_s(args.warmup)
    check.estimator.measured_step[(tier, size)] = max(d_step, s_step)
    check.studio_step[(tier, size)] = s_step
    title, backend = memory.TIERS[tier].title, check.backbone.quant_backend
    stored = title if not backend or backend in title else f"{title}; {backend}"
    check.report.speed.append((tier, size, stored, plan_placement(plan),
                               fmt_s(d_step), fmt_s(s_step), f"{s_step / d_step:.2f}",
                               f"{s_step * PAPER_STEPS / 60:.1f}"))
    check.report.plans.append(f"{tier} at {size} px: {plan.describe()}")
    load_peak = backbone.__dict__.get("_gpu_check_load_peak")
    check.report.memory += phase_rows(tier, size, plan, {"diffusers": diffusers, "studio": studio}, load_peak,
                                      check.overhead, check.on_gpu)


def generation_section(check: Check, tier: str, size: int) -> None:
    """A 28-step image and LoRA swaps on the warm pipeline, with the generation's peak against its plan."""
    args = check.args
    lora_b = bt.second_lora(check.template, check.tmp / "lora-b")
    meter = bt.PhaseMeter(check.device)
    meter.mark(None)
    gen = bt.generation_bench(check.backbone, size, args.gen_steps, 1, [check.template, lora_b], count_flops=False)
    meter.mark("generate")
    peak = meter.peaks["generate"]
    held = f"{peak[0] / GIB:.2f} / {(peak[1] + check.overhead) / GIB:.2f}" if check.on_gpu else "n/a (CPU)"
    try:
        plan = check.plan(tier, size, mode="generate")
        expected, _ = plan_phase_peaks(plan)
        planned = gib(expected.get("generate", plan.peak_bytes), True)
    except StudioError as exc:
        planned = f"does not fit: {exc}"[:80]
    rows = [(f"one image, {args.gen_steps} steps at {size}x{size} (after one warm-up image)", tier,
             fmt_s(gen["s_per_image"]), held, planned),
            ("load a template LoRA (load_lora_weights)", tier, fmt_s(gen["load_lora"]), "", ""),
            ("switch between two loaded LoRAs (set_adapters)", tier, fmt_s(gen["set_adapters"]), "", ""),
            ("mix two LoRAs (set_adapters with weights)", tier, fmt_s(gen["mix_two"]), "", ""),
            ("unload both (delete_adapters)", tier, fmt_s(gen["delete"]), "", "")]
    check.report.generation += rows


def compile_section(check: Check, tier: str, size: int) -> None:
    """The studio trainer with its blocks compiled: does the compile time pay back over the paper's steps?"""
    args, backbone = check.args, check.backbone
    backend = "inductor" if check.on_gpu else "eager"  # on the smoke run only the code path counts
    n = args.warmup + args.steps
    image = Image.new("RGB", (size, size), (200, 80, 40))
    recipe = check_recipe(size, n, args.rank, args.grad_accum, previews=False, compiled=True)
    previous = os.environ.get("STUDIO_COMPILE_BACKEND")
    os.environ["STUDIO_COMPILE_BACKEND"] = backend
    try:
        if not getattr(recipe, "compile_blocks", False):  # a trainer without the recipe switch: compile here
            bt.compile_blocks(backbone, backend=backend, dynamic=False)
        compiled = run_studio(backbone, image, recipe, check.tmp, check.budget.deadline())
    finally:
        if previous is None:
            os.environ.pop("STUDIO_COMPILE_BACKEND", None)
        else:
            os.environ["STUDIO_COMPILE_BACKEND"] = previous
        for module in backbone.transformer.modules():  # undo a compile the trainer did not undo itself
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
    if compiled.template is not None:
        shutil.rmtree(compiled.template.parent, ignore_errors=True)
    eager = check.studio_step.get((tier, size))
    fast = compiled.step_s(args.warmup)
    compile_s = max(0.0, sum(compiled.times[: args.warmup]) - args.warmup * fast)
    if eager is None:
        check.report.compiled.append((tier, size, backend, f"{compile_s:.1f}", "-", fmt_s(fast), "-", "-"))
        return
    saved = (eager - fast) * PAPER_STEPS
    verdict = (f"yes, after {compile_s / (eager - fast):.0f} steps" if saved > compile_s
               else "no" if eager > fast else "no (not faster)")
    check.report.compiled.append((tier, size, backend, f"{compile_s:.1f}", fmt_s(eager), fmt_s(fast),
                                  f"{saved:.1f}", verdict))


# -- the run --------------------------------------------------------------------------------------------------------


def choose_generation_size(check: Check, tier: str, reserve: float) -> int | None:
    """The generation's size: the large one if it fits beside the remaining tiers, else the fallback size."""
    large, fallback = check.spec.gen_sizes[0], check.spec.gen_sizes[-1]
    steps = check.args.gen_steps
    if check.budget.allows(f"generation at {large} px", check.estimator.generation_s(tier, large, steps), reserve,
                           quiet=True):
        return large
    if large != fallback:
        check.budget.skip(f"generation at {large} px: not enough time left beside the remaining tiers; "
                          f"generated at {fallback} px")
    if check.budget.allows(f"generation at {fallback} px", check.estimator.generation_s(tier, fallback, steps)):
        return fallback
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="the smoke run: the tiny backbone's architecture on the CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="time budget of the whole call (default 420 s)")
    parser.add_argument("--tiers", default=None, help="comma-separated memory tiers (default: every tier of the plan)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes; the first is the one every tier runs "
                                                      "(default 512,1024; smoke 64,128)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per loop")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up optimiser steps per loop")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--gen-steps", type=int, default=28, help="denoising steps of the generation (paper: 28)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    return parser.parse_args(argv)


def all_tiers() -> list[str]:
    return list(dict.fromkeys([*getattr(memory, "TIER_ORDER", ()), *memory.TIERS]))


def header_line(spec: ModelSpec, device: torch.device, gpu_bytes: int | None, ram_bytes: int) -> str:
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, {gpu_bytes / GIB:.1f} GiB, CUDA {torch.version.cuda}"
    else:
        machine = (f"no GPU: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads)")
    return (f"# GPU check - {datetime.date.today().isoformat()}, {machine}, RAM {ram_bytes / GIB:.0f} GiB; "
            f"{versions()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(1)  # the tiny kernels gain nothing from threads (as load_backbone("tiny") does)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    spec = flux_dev_spec() if on_gpu else tiny_spec()
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else spec.sizes
    budget = Budget(args.budget_s)
    report = Report()
    gpu_bytes, ram_bytes = memory.detect_memory(device)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rate = bt.matmul_rate(device, dtype)
    estimator = Estimator(memory.arch_params(spec.arch), rate, device, args.grad_accum, args.warmup + args.steps)
    log(f"{spec.name} on {device.type}; matmul rate {rate / 1e12:.3f} TFLOP/s")

    # Plans first: the text encoders are built where the first tier that fits wants them.
    tiers = args.tiers.split(",") if args.tiers else all_tiers()
    plans: dict[str, object] = {}
    for tier in tiers:
        try:
            plans[tier] = memory.choose_tier(gpu_bytes, ram_bytes, spec.arch, sizes[0], tier, rank=args.rank)
        except StudioError as exc:
            budget.skip(f"tier {tier} at {sizes[0]} px: not run, the plan says {exc}")
    first_placement = plan_placement(next(iter(plans.values()))) if plans else "gpu"
    home, home_dtype = encoder_home(first_placement, device, dtype)

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    t0 = time.perf_counter()
    clip_tokenizer, clip, t5_tokenizer, t5 = build_text_side(spec, home, home_dtype)
    bt.sync(device)
    text_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vae = build_vae(spec, device, dtype)
    bt.sync(device)
    vae_s = time.perf_counter() - t0
    for name, module, seconds, where, stored in (("text encoder CLIP-L", clip, text_s, home, home_dtype),
                                                 ("text encoder T5", t5, text_s, home, home_dtype),
                                                 ("VAE (16 channels)", vae, vae_s, device, dtype)):
        report.build.append((name, fmt_count(param_count(module)), str(stored).split(".")[-1], where.type,
                             f"{seconds:.1f}" + (" (both encoders)" if "text" in name else "")))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(spec.scheduler), vae=vae,
                        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=None)
    check = Check(args, spec, device, dtype, budget, report, estimator, make_backbone(spec, pipe, device, dtype),
                  tmp, gpu_bytes, ram_bytes, overhead=cuda_overhead())
    check.phase_source = plan_phase_peaks(next(iter(plans.values())))[1] if plans else "-"

    fitting = list(plans)
    for index, tier in enumerate(fitting):
        later = fitting[index + 1:]
        reserve = sum(estimator.tier_s(t, sizes[0]) for t in later)
        if not budget.allows(f"tier {tier} at {sizes[0]} px", estimator.tier_s(tier, sizes[0])):
            continue
        placement = plan_placement(plans[tier])
        if not check.attempt(f"tier {tier}: build", build_tier, check, tier, placement):
            continue
        if not report.encode:
            check.attempt("text encoders: encode time", encode_section, check, placement)
        check.attempt(f"tier {tier} at {sizes[0]} px: training", training_section, check, tier, sizes[0],
                      plans[tier])
        if not report.generation and check.template is not None:
            gen_size = choose_generation_size(check, tier, reserve)
            if gen_size is not None:
                check.attempt(f"generation at {gen_size} px", generation_section, check, tier, gen_size)
        for size in sizes[1:]:
            if not budget.allows(f"tier {tier} at {size} px", estimator.training_s(tier, size), reserve):
                continue
            try:
                plan = check.plan(tier, size)
            except StudioError as exc:
                budget.skip(f"tier {tier} at {size} px: not run, the plan says {exc}")
                continue
            if plan_placement(plan) != placement:
                place_text_encoders(check, plan_placement(plan))
            check.attempt(f"tier {tier} at {size} px: training", training_section, check, tier, size, plan)
            if plan_placement(plan) != placement:
                place_text_encoders(check, placement)
        if index == 0 and not args.no_compile and budget.allows(
                f"torch.compile (tier {tier}, {sizes[0]} px)", estimator.compile_s(tier, sizes[0]), reserve):
            check.attempt(f"torch.compile (tier {tier})", compile_section, check, tier, sizes[0])

    if report.encode:
        cpu_estimate = 2.0 * (estimator.arch.text_encoder_params * 2.0 * spec.max_sequence_length
                              / bt.matmul_rate(torch.device("cpu"), torch.float32)) + (10.0 if on_gpu else 0.5)
        if budget.allows("text encoders on the CPU in fp32", cpu_estimate):
            check.attempt("text encoders on the CPU in fp32", cpu_encode_section, check)
    set_transformer(check.backbone, None, "bf16", None)
    shutil.rmtree(tmp, ignore_errors=True)
    print_report(report, spec, args, budget, header_line(spec, device, gpu_bytes, ram_bytes), on_gpu, rate, dtype,
                 check.phase_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
