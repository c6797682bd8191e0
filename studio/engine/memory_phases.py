"""The phases of a job and the GPU memory each one holds: the arithmetic under :mod:`studio.engine.memory`.

A training job on a warm worker goes through :data:`TRAINING_PHASES`, in this order:

=========================  ======================================================================
phase                      what is on the GPU (besides the CUDA context)
=========================  ======================================================================
``load``                   base weights, VAE, the text encoders where they rest
``encode``                 + the text encoders where they encode; then the VAE encodes references
``train``                  + LoRA state (fp32 weights, gradients, Adam moments) + activations
``preview``                training state + one no-grad forward + a VAE decode
``generate_between_steps`` training state + a generation served between steps (its prompt encoded)
``end_of_job``             base, VAE, text encoders back where they rest (LoRA state freed first)
``next_job``               the warm model serving the next request (a generation; a next training
                           goes through ``encode`` ... again)
=========================  ======================================================================

A generation-only worker goes through :data:`GENERATION_PHASES`. :data:`PHASE_ESTIMATORS` has one
function per phase; the memory plan checks every phase of its job, so a phase without an
estimator cannot be planned (tests/test_memory.py checks the lists against each other).

Where the text encoders live is their *placement* (:data:`PLACEMENTS`), tried in
:data:`PLACEMENT_ORDER`. They never compute on the CPU in bf16: on an x86 CPU that is about 9x
slower than fp32 and T5-XXL would take minutes per prompt. ``cpu-fp32`` is the last resort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

GB = 2**30

# -- the activation and overhead model (see studio.engine.memory) ------------------------------------

ACT_BYTES = {"flux": 54.0, "sd3": 44.0}  # per block, per token and hidden unit, bf16, no checkpointing
DECODE_TENSORS = 6  # full-resolution tensors of the VAE decoder's first width alive at its peak
INFERENCE_ACT_BYTES = 16.0  # per token and hidden unit: a no-grad forward keeps a few tensors of one block
LORA_STATE_BYTES = 16  # fp32 weight + fp32 gradient + Adam exp_avg + exp_avg_sq
ENCODE_ALLOWANCE = 0.25 * GB  # one text-encoder forward (T5-XXL at 512 tokens keeps ~0.15 GB alive)
FRAGMENTATION = 0.07
CUDA_CONTEXT = 0.75 * GB
USABLE_FRACTION = 0.92  # of the card's total memory: other processes and the desktop need some
HOST_BASELINE = 4 * GB  # Python, torch, diffusers and the data a worker holds in host memory
# An assumed fp32 matmul rate of a desktop CPU (6-16 cores, AVX2), for the cpu-fp32 encode-time estimate.
CPU_FP32_FLOPS = 200e9


@dataclass(frozen=True)
class Tier:
    """How the frozen base weights are stored."""

    name: str  # "bf16" | "fp8" | "int8" | "nf4"
    title: str
    linear_bytes: float | None  # bytes per base Linear weight; None: the run's precision (bf16 / fp32)
    card_class: str  # the cards it is meant for (FLUX.1-dev), for people

    @property
    def quantized(self) -> bool:
        return self.linear_bytes is not None


TIERS: dict[str, Tier] = {
    "bf16": Tier("bf16", "full-precision base weights", None, "40 GB and more"),
    # float8 (e4m3) storage, bf16 compute, a scale per output row: ai-toolkit's "qfloat8" for FLUX on 24 GB
    "fp8": Tier("fp8", "8-bit float base weights (quanto)", 1.0, "24-32 GB class"),
    "int8": Tier("int8", "8-bit integer base weights (LLM.int8 / quanto int8)", 1.0, "24 GB class, by name"),
    # NF4: 4 bits + an 8-bit block scale per 64 weights (double quantisation); quanto's int4: 4 bits +
    # a bf16 scale and shift per 128. Both round up to ~0.53 bytes per weight.
    "nf4": Tier("nf4", "4-bit NF4 base weights, QLoRA", 0.53, "12-16 GB class"),
}
# Best fidelity first; auto takes the first that fits. int8 (bitsandbytes LLM.int8 is slow to train
# on) stores as much as fp8 and is only used when asked for by name.
TIER_ORDER = ("bf16", "fp8", "nf4")


@dataclass(frozen=True)
class Placement:
    """Where the text encoders rest, where they sit while a training runs, and where they compute."""

    name: str  # one of studio.engine.backbones.quantize.ENCODER_PLACEMENTS (what Backbone.load applies)
    title: str
    t5_bytes: float | None  # bytes per T5 Linear weight when it is quantised; None: the run's precision
    rest: str  # "gpu" | "cpu"
    in_training: str  # "gpu" | "cpu"
    computes_on: str  # "gpu" | "cpu"


PLACEMENTS: dict[str, Placement] = {
    "gpu": Placement("gpu", "text encoders on the GPU (on the CPU while training, back to encode)",
                     None, "gpu", "cpu", "gpu"),
    "swap": Placement("swap", "text encoders stored on the CPU, moved to the GPU to encode", None, "cpu", "cpu", "gpu"),
    "gpu-8bit": Placement("gpu-8bit", "T5 in 8 bits, text encoders stay on the GPU", 1.0, "gpu", "gpu", "gpu"),
    "gpu-4bit": Placement("gpu-4bit", "T5 in 4 bits, text encoders stay on the GPU", 0.53, "gpu", "gpu", "gpu"),
    "cpu-fp32": Placement("cpu-fp32", "text encoders encode on the CPU in fp32", None, "cpu", "cpu", "cpu"),
}
PLACEMENT_ORDER = ("gpu", "swap", "gpu-8bit", "gpu-4bit", "cpu-fp32")  # fastest and most faithful first
GPU_PLACEMENTS = tuple(p for p in PLACEMENT_ORDER if PLACEMENTS[p].computes_on == "gpu")


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
    t5_linear: int = 0  # T5's nn.Linear weights: what the gpu-8bit / gpu-4bit placements quantise
    text_encoder_flops: float = 0.0  # to encode one prompt with every text encoder (2 x weights x tokens)

    @property
    def transformer_params(self) -> int:
        return self.linear_weights + self.other_params

    def lora_params(self, rank: int) -> int:
        return self.lora_per_rank * rank


@dataclass(frozen=True)
class Setting:
    """One candidate plan: everything a phase estimator needs."""

    arch: ArchParams
    tier: Tier
    placement: Placement
    resolution: int
    rank: int = 32
    checkpointing: bool = True
    on_gpu: bool = True  # False: one memory (the host's) holds everything, in fp32
    micro_batch: int = 1  # samples of an optimiser step in one forward pass (the same gradient as accumulating)

    @property
    def precision_bytes(self) -> int:
        return 2 if self.on_gpu else 4


# -- the parts ------------------------------------------------------------------------------------------


def base_bytes(s: Setting) -> float:
    """The transformer's frozen weights in the tier's storage."""
    p = s.precision_bytes
    linear = p if s.tier.linear_bytes is None else s.tier.linear_bytes
    return s.arch.linear_weights * linear + s.arch.other_params * p


def encoder_store_bytes(s: Setting) -> float:
    """All text encoders as the placement stores them (T5's Linear weights quantised for gpu-8bit / -4bit)."""
    a, place = s.arch, s.placement
    if not s.on_gpu or place.name == "cpu-fp32":
        return a.text_encoder_params * 4.0
    if place.t5_bytes is None:
        return a.text_encoder_params * 2.0
    return (a.text_encoder_params - a.t5_linear) * 2.0 + a.t5_linear * place.t5_bytes


def encoders_on_gpu(s: Setting, when: str) -> float:
    """Text-encoder bytes in the run's memory ``when`` = "rest" | "training" | "encoding"."""
    if not s.on_gpu:
        return encoder_store_bytes(s)  # a CPU run: they never leave the one memory there is
    where = {"rest": s.placement.rest, "training": s.placement.in_training, "encoding": s.placement.computes_on}[when]
    return encoder_store_bytes(s) if where == "gpu" else 0.0


def encode_allowance(s: Setting) -> float:
    """Activations of one text-encoder forward, where it runs in the memory planned."""
    return ENCODE_ALLOWANCE if (s.placement.computes_on == "gpu" or not s.on_gpu) else 0.0


def tokens(s: Setting) -> int:
    return (s.resolution // s.arch.pixels_per_token) ** 2 + s.arch.text_tokens


def lora_state_bytes(s: Setting) -> float:
    return s.arch.lora_params(s.rank) * LORA_STATE_BYTES


def template_lora_bytes(s: Setting) -> float:
    """A template's LoRA loaded for a generation (bf16, the same rank as the planned training)."""
    return s.arch.lora_params(s.rank) * s.precision_bytes


def activation_bytes(s: Setting) -> float:
    """Activations kept by one training forward pass of ``micro_batch`` samples (they grow with the batch)."""
    a, p = s.arch, s.precision_bytes
    per_block = ACT_BYTES[a.family] * tokens(s) * a.hidden * p / 2
    if s.checkpointing:  # each block keeps its input; one block at a time is recomputed
        return s.micro_batch * (a.blocks * tokens(s) * a.hidden * p + per_block)
    return s.micro_batch * a.blocks * per_block


def inference_bytes(s: Setting) -> float:
    return INFERENCE_ACT_BYTES * tokens(s) * s.arch.hidden * s.precision_bytes / 2


def decode_bytes(s: Setting) -> float:
    """A VAE decode (and, as large, a VAE encode of a reference) at the planned resolution."""
    return s.resolution * s.resolution * s.arch.vae_width * s.precision_bytes * DECODE_TENSORS


def parts(s: Setting) -> dict[str, float]:
    """The named parts the phases are made of (for people and the benchmark)."""
    return {"base_weights": base_bytes(s), "vae": s.arch.vae_params * s.precision_bytes,
            "text_encoders": encoder_store_bytes(s), "lora_and_adam": lora_state_bytes(s),
            "activations": activation_bytes(s), "inference": inference_bytes(s), "decode": decode_bytes(s)}


# -- one estimator per phase: bytes the phase holds, before fragmentation and the CUDA context ------------


def _model(s: Setting) -> float:
    return base_bytes(s) + s.arch.vae_params * s.precision_bytes


def load_phase(s: Setting) -> float:
    return _model(s) + encoders_on_gpu(s, "rest")


def encode_phase(s: Setting) -> float:
    """Prompts (text encoders where they encode), then the references through the VAE encoder."""
    prompts = encoders_on_gpu(s, "encoding") + encode_allowance(s)
    references = encoders_on_gpu(s, "rest") + decode_bytes(s)
    return _model(s) + max(prompts, references)


def train_phase(s: Setting) -> float:
    return _model(s) + encoders_on_gpu(s, "training") + lora_state_bytes(s) + activation_bytes(s)


def preview_phase(s: Setting) -> float:
    return _model(s) + encoders_on_gpu(s, "training") + lora_state_bytes(s) + inference_bytes(s) + decode_bytes(s)


def between_steps_phase(s: Setting) -> float:
    """A generation served between training steps: its prompt is encoded, then it samples with a template."""
    encode = encoders_on_gpu(s, "encoding") + encode_allowance(s)
    sample = encoders_on_gpu(s, "training") + inference_bytes(s) + decode_bytes(s) + template_lora_bytes(s)
    return _model(s) + lora_state_bytes(s) + max(encode, sample)


def end_of_job_phase(s: Setting) -> float:
    """The trainer frees the LoRA state before the text encoders come back to where they rest."""
    return _model(s) + encoders_on_gpu(s, "rest")


def generate_phase(s: Setting) -> float:
    """The warm model serving a generation: encode its prompt, then sample with a template and decode."""
    encode = encoders_on_gpu(s, "encoding") + encode_allowance(s)
    sample = encoders_on_gpu(s, "rest") + inference_bytes(s) + decode_bytes(s) + template_lora_bytes(s)
    return _model(s) + max(encode, sample)


TRAINING_PHASES = ("load", "encode", "train", "preview", "generate_between_steps", "end_of_job", "next_job")
GENERATION_PHASES = ("load", "generate")
PHASE_ESTIMATORS: dict[str, Callable[[Setting], float]] = {
    "load": load_phase,
    "encode": encode_phase,
    "train": train_phase,
    "preview": preview_phase,
    "generate_between_steps": between_steps_phase,
    "end_of_job": end_of_job_phase,
    "next_job": generate_phase,  # a next training job goes through "encode" ... again
    "generate": generate_phase,
}


def job_phases(mode: str) -> tuple[str, ...]:
    """The phases a ``"train"`` or ``"generate"`` job goes through."""
    return TRAINING_PHASES if mode == "train" else GENERATION_PHASES


def phase_peaks(s: Setting, mode: str = "train") -> dict[str, int]:
    """Predicted peak bytes of every phase of the job, fragmentation and fixed overhead included.

    On a GPU the overhead is the CUDA context; on a CPU (one memory for everything) the host baseline.
    """
    overhead = CUDA_CONTEXT if s.on_gpu else HOST_BASELINE
    return {phase: int(PHASE_ESTIMATORS[phase](s) * (1 + FRAGMENTATION) + overhead) for phase in job_phases(mode)}


def host_bytes(s: Setting) -> int:
    """Host RAM a GPU run needs: the baseline plus the text encoders whenever they sit on the CPU."""
    place = s.placement
    on_cpu = "cpu" in (place.rest, place.in_training, place.computes_on)
    return int(HOST_BASELINE + (encoder_store_bytes(s) if on_cpu else 0))


def encode_seconds(s: Setting) -> float | None:
    """Estimated seconds to encode one prompt on the CPU in fp32 (None when the GPU encodes)."""
    if s.on_gpu and s.placement.computes_on == "gpu":
        return None
    return s.arch.text_encoder_flops / CPU_FP32_FLOPS
