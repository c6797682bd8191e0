"""Quantised base weights for the 8-bit and 4-bit memory tiers: which backend, and diffusers' config.

bitsandbytes (NF4 / LLM.int8 CUDA kernels) on GPUs, optimum-quanto elsewhere. The tier itself is
chosen by :mod:`studio.engine.memory`; this module only turns a chosen tier into loading arguments.
"""

from __future__ import annotations

import importlib.util
import os

from studio.errors import InputError


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


def pipeline_quantization_config(tier: str, device, compute_dtype):
    """diffusers' ``PipelineQuantizationConfig`` that quantises the transformer for ``tier``; and its backend.

    Only the transformer is quantised: the LoRA trains on it, and the text encoders run once per job.
    """
    from diffusers import PipelineQuantizationConfig

    backend = quantization_backend(device)
    if backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if tier == "int8" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=compute_dtype))
    else:
        import warnings

        from diffusers import QuantoConfig

        with warnings.catch_warnings():  # diffusers marks quanto deprecated for 1.0; it is what runs on CPUs
            warnings.simplefilter("ignore", FutureWarning)
            config = QuantoConfig(weights_dtype="int8" if tier == "int8" else "int4")
    return PipelineQuantizationConfig(quant_mapping={"transformer": config}), backend
