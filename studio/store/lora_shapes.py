"""Which backbone a LoRA fits, from its shapes: every module's ``(out, in)`` against the real model's.

The layer shapes of each backbone this studio knows come from its transformer built on the meta device
(no weights, a fraction of a second, cached); a LoRA fits a backbone when every module it changes exists
there with exactly that shape. Names alone cannot tell FLUX.1-dev from a 1024-wide look-alike; this can.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from studio.engine.memory import REFERENCE_ARCHS

# The tiny offline model's transformer (studio.engine.backbones.tiny._tiny_flux_pipeline): 2 heads x 32.
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 14, 14),
)
SHAPE_BACKBONES: dict[str, tuple[str, dict]] = {
    "tiny": ("flux", TINY_FLUX_TRANSFORMER),
    **{name: (family, config) for name, (family, config, _, _) in REFERENCE_ARCHS.items()},
}
DISPLAY_NAMES = {"tiny": "tiny", "flux-dev": "FLUX.1-dev", "sd3.5-large": "SD3.5 Large",
                 "sd3.5-medium": "SD3.5 Medium"}


@functools.cache
def linear_shapes(backbone_id: str) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` of every linear layer of a known backbone's transformer."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    family, config = SHAPE_BACKBONES[backbone_id]
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls(**config)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_shapes(state: Mapping) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of a diffusers-format LoRA (``B`` rows, ``A`` columns)."""
    shapes = {}
    for key, a in state.items():
        if key.startswith("transformer.") and key.endswith(".lora_A.weight"):
            b = state[key.replace(".lora_A.weight", ".lora_B.weight")]
            shapes[key[len("transformer."):-len(".lora_A.weight")]] = (int(b.shape[0]), int(a.shape[1]))
    return shapes


def fitting_backbones(family: str, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """The known backbones of ``family`` that have every module of ``shapes`` with exactly that shape."""
    found = []
    for backbone_id, (fam, _) in SHAPE_BACKBONES.items():
        if fam != family:
            continue
        real = linear_shapes(backbone_id)
        if all(real.get(module) == shape for module, shape in shapes.items()):
            found.append(backbone_id)
    return found


def _sample_module(shapes: Mapping[str, tuple[int, int]]) -> str:
    """The module a refusal quotes: a query projection if there is one (its width is the model's)."""
    for module in sorted(shapes):
        if module.endswith(("attn.to_q", "attn.add_q_proj")):
            return module
    return sorted(shapes)[0]


def _shape_text(shape: tuple[int, int] | None) -> str:
    return "no such layer" if shape is None else f"{shape[1]} -> {shape[0]}"


def mismatch_message(family: str, shapes: Mapping[str, tuple[int, int]]) -> str:
    """Why ``shapes`` fit no backbone of ``family``: one module's shape here and in each known model."""
    known = [b for b, (fam, _) in SHAPE_BACKBONES.items() if fam == family]
    module = _sample_module(shapes)
    for backbone_id in known:  # right width, wrong elsewhere: quote the first module that is off
        real = linear_shapes(backbone_id)
        if real.get(module) == shapes[module]:
            bad = next(m for m in sorted(shapes) if real.get(m) != shapes[m])
            return (f"its layer shapes match no known {family.upper()} backbone: {bad} is "
                    f"{_shape_text(shapes[bad])} here, {DISPLAY_NAMES[backbone_id]}'s is "
                    f"{_shape_text(real.get(bad))}")
    theirs = "; ".join(f"{DISPLAY_NAMES[b]} {_shape_text(linear_shapes(b).get(module))}" for b in known)
    return (f"its layer widths match no known {family.upper()} backbone: {module} is "
            f"{_shape_text(shapes[module])} here ({theirs})")
