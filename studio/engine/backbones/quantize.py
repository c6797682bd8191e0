"""Quantised weights for the memory tiers and text-encoder placements: which backend, and diffusers' config.

bitsandbytes (NF4 / LLM.int8 CUDA kernels) on GPUs, optimum-quanto elsewhere and for the ``fp8``
tier (float8 storage, bf16 compute: bitsandbytes has no float8). The tier and the placement are
chosen by :mod:`studio.engine.memory`; this module only turns them into loading arguments.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

from studio.errors import InputError

# Where the text encoders live and compute (studio.engine.memory_phases describes each; Backbone.load applies it).
ENCODER_PLACEMENTS = ("gpu", "swap", "gpu-8bit", "gpu-4bit", "cpu-fp32")
ENCODER_BITS = {"gpu-8bit": 8, "gpu-4bit": 4}  # the placements that quantise T5 (the CLIPs stay as they are)
# quanto's float8 scale of an all-zero weight row is 0, and its dequantised weights become NaN; the
# time / guidance / pooled-text embedders are such layers in freshly initialised models (the tiny one's
# guidance embedder), and are tiny anyway (~40M weights in FLUX.1-dev), so fp8 leaves them unquantised.
FP8_KEEP = ["linear_1", "linear_2"]


def available_backends() -> list[str]:
    """Installed quantisation backends diffusers can drive (found without importing them)."""
    return [name for name, module in (("bitsandbytes", "bitsandbytes"), ("quanto", "optimum.quanto"))
            if _has_module(module)]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def quantization_backend(device) -> str:
    """bitsandbytes on CUDA (its NF4 / LLM.int8 kernels), else optimum-quanto (also runs on the CPU).

    ``STUDIO_QUANT_BACKEND=bitsandbytes|quanto`` forces one. diffusers' bitsandbytes quantiser
    refuses to run without a GPU, so the CPU always uses quanto.
    """
    on_gpu = str(device).startswith("cuda")
    wanted = (os.environ.get("STUDIO_QUANT_BACKEND") or "").strip().lower()
    have = available_backends()
    order = [wanted] if wanted else (["bitsandbytes", "quanto"] if on_gpu else ["quanto"])
    for name in order:
        if name in have and (on_gpu or name != "bitsandbytes"):
            return name
    need = ("`pip install bitsandbytes` (GPU) or `pip install optimum-quanto`" if on_gpu
            else "`pip install optimum-quanto` (bitsandbytes needs a GPU)")
    raise InputError(f"the 8-bit and 4-bit tiers need a quantisation backend: {need}")


def tier_backend(tier: str, device) -> str:
    """The backend that stores a quantised tier: quanto for ``fp8`` (float8 weights), else the device's."""
    if tier != "fp8":
        return quantization_backend(device)
    if "quanto" not in available_backends():
        raise InputError("the fp8 tier (float8 base weights) needs optimum-quanto: `pip install optimum-quanto`; "
                         "or choose tier nf4 or int8")
    return "quanto"


def transformer_config(tier: str, backend: str, compute_dtype):
    """diffusers' quantisation config of the transformer for ``tier`` with ``backend``."""
    if backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig

        if tier == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    from diffusers import QuantoConfig

    weights = {"fp8": "float8", "int8": "int8", "nf4": "int4"}[tier]
    keep = FP8_KEEP if tier == "fp8" else None
    with warnings.catch_warnings():  # diffusers marks quanto deprecated for 1.0; it is what runs on CPUs
        warnings.simplefilter("ignore", FutureWarning)
        return QuantoConfig(weights_dtype=weights, modules_to_not_convert=keep)


def text_encoder_config(bits: int, backend: str, compute_dtype):
    """transformers' quantisation config of a T5 encoder in ``bits`` (8: LLM.int8 / quanto int8; 4: NF4 / int4)."""
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    from transformers import QuantoConfig

    return QuantoConfig(weights="int8" if bits == 8 else "int4")


def pipeline_quantization_config(tier: str, device, compute_dtype, text_encoder: tuple[str, int] | None = None):
    """diffusers' ``PipelineQuantizationConfig`` for ``tier`` (and a T5 placement), and the transformer's backend.

    ``text_encoder`` is ``(pipeline component, bits)`` for the ``gpu-8bit`` / ``gpu-4bit`` placements:
    that T5 encoder is quantised with the tier's backend (the device's for the bf16 tier). Returns
    ``(None, None)`` when nothing is quantised.
    """
    mapping, backend = {}, None
    if tier != "bf16":
        backend = tier_backend(tier, device)
        mapping["transformer"] = transformer_config(tier, backend, compute_dtype)
    if text_encoder is not None:
        component, bits = text_encoder
        mapping[component] = text_encoder_config(bits, backend or quantization_backend(device), compute_dtype)
    if not mapping:
        return None, None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=mapping), backend
