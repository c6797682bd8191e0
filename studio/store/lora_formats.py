"""LoRA key formats: diffusers/PEFT <-> kohya/ComfyUI, and LoRA file validation.

Two key formats exist for the same FLUX / SD3 LoRA:

* **diffusers/PEFT** (what templates store, ``pipe.load_lora_weights`` reads):
  ``transformer.<diffusers module path>.lora_A.weight`` (down, ``r x in``) and
  ``.lora_B.weight`` (up, ``out x r``). The weight change is ``scale * B @ A`` where
  diffusers takes ``scale = lora_alpha / r`` from the file's ``lora_adapter_metadata``
  header entry, else from ``transformer.<module>.alpha`` tensors, else 1.
* **kohya / ComfyUI**: ``lora_unet_<original module path, dots -> underscores>`` with
  ``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha``; the change is
  ``alpha / rank * up @ down``. The module paths are those of the original (BFL /
  Stability) checkpoints, which ComfyUI uses for its models, and which fuse q, k, v
  (and, in FLUX single blocks, the MLP input) into one linear layer.

Mapping table (``i`` = block index; ``[a, b, c]`` = fused, in that row order)::

    FLUX (FluxTransformer2DModel)                     kohya / ComfyUI (lora_unet_...)
    transformer_blocks.i.attn.[to_q, to_k, to_v]      double_blocks_i_img_attn_qkv
    transformer_blocks.i.attn.to_out.0                double_blocks_i_img_attn_proj
    transformer_blocks.i.attn.[add_q_proj, add_k_proj, add_v_proj]
                                                      double_blocks_i_txt_attn_qkv
    transformer_blocks.i.attn.to_add_out              double_blocks_i_txt_attn_proj
    transformer_blocks.i.ff.net.0.proj / ff.net.2     double_blocks_i_img_mlp_0 / _img_mlp_2
    transformer_blocks.i.ff_context.net.0.proj / .2   double_blocks_i_txt_mlp_0 / _txt_mlp_2
    transformer_blocks.i.norm1.linear                 double_blocks_i_img_mod_lin
    transformer_blocks.i.norm1_context.linear         double_blocks_i_txt_mod_lin
    single_transformer_blocks.i.[attn.to_q, attn.to_k, attn.to_v, proj_mlp]
                                                      single_blocks_i_linear1
    single_transformer_blocks.i.proj_out              single_blocks_i_linear2
    single_transformer_blocks.i.norm.linear           single_blocks_i_modulation_lin
    proj_out                                          final_layer_linear
    norm_out.linear                                   final_layer_adaLN_modulation_1 (*)
    x_embedder / context_embedder                     img_in / txt_in
    time_text_embed.timestep_embedder.linear_1 / _2   time_in_in_layer / time_in_out_layer
    time_text_embed.text_embedder.linear_1 / _2       vector_in_in_layer / vector_in_out_layer
    time_text_embed.guidance_embedder.linear_1 / _2   guidance_in_in_layer / guidance_in_out_layer

    SD3 / SD3.5 (SD3Transformer2DModel)               kohya / ComfyUI (lora_unet_...)
    transformer_blocks.i.attn.[to_q, to_k, to_v]      joint_blocks_i_x_block_attn_qkv
    transformer_blocks.i.attn.to_out.0                joint_blocks_i_x_block_attn_proj
    transformer_blocks.i.attn.[add_q_proj, add_k_proj, add_v_proj]
                                                      joint_blocks_i_context_block_attn_qkv
    transformer_blocks.i.attn.to_add_out              joint_blocks_i_context_block_attn_proj
    transformer_blocks.i.attn2.[to_q, to_k, to_v]     joint_blocks_i_x_block_attn2_qkv (3.5 Medium)
    transformer_blocks.i.attn2.to_out.0               joint_blocks_i_x_block_attn2_proj
    transformer_blocks.i.ff.net.0.proj / ff.net.2     joint_blocks_i_x_block_mlp_fc1 / _fc2
    transformer_blocks.i.ff_context.net.0.proj / .2   joint_blocks_i_context_block_mlp_fc1 / _fc2
    transformer_blocks.i.norm1.linear                 joint_blocks_i_x_block_adaLN_modulation_1
    transformer_blocks.i.norm1_context.linear         joint_blocks_i_context_block_adaLN_modulation_1 (**)
    proj_out                                          final_layer_linear
    norm_out.linear                                   final_layer_adaLN_modulation_1 (*)
    context_embedder                                  context_embedder
    time_text_embed.timestep_embedder.linear_1 / _2   t_embedder_mlp_0 / t_embedder_mlp_2
    time_text_embed.text_embedder.linear_1 / _2       y_embedder_mlp_0 / y_embedder_mlp_2

    (*)  the two halves of the output rows are swapped (original: shift, scale;
         diffusers: scale, shift), so the up matrix's halves are swapped.
    (**) only in the last block (context_pre_only, output = 2 x hidden), same swap.

Fusing separate LoRAs ``(A_j, B_j)`` (ranks ``r_j``) into one fused-layer LoRA:
``down = cat(A_j)`` along the rank dim (rank ``R = sum r_j``), ``up`` = block diagonal of
the ``B_j`` and ``alpha = R * scale``, so ``alpha / R * up @ down`` is exactly the row
concatenation of the separate changes ``scale * B_j @ A_j``. A missing piece (e.g. a LoRA
on ``to_q`` and ``to_v`` only) gets zero rows: q/k/v pieces are ``in_features`` rows,
the FLUX single-block ``proj_mlp`` piece ``4 * in_features`` rows.

Splitting a fused LoRA back (kohya -> diffusers) is exact as well: piece ``j`` gets
``up_j`` = its row slice of ``up`` (times ``alpha / R``) and ``down`` restricted to the
columns where ``up_j`` is not identically zero: for a block-diagonal LoRA (ours, most
trainers') that recovers the original rank-``r_j`` pieces, for a dense one every piece
keeps the full rank-``R`` down matrix; a piece whose rows are all zero (a LoRA that did
not cover it, e.g. ``to_k``) is left out. Diffusers-format results always use scale 1
(``lora_alpha = rank``, diffusers' default when a file carries no alpha).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import InputError

FAMILIES = ("flux", "sd3")
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."  # ComfyUI's own saved LoRAs: dotted original paths

MAX_RANK = 512
MAX_LORA_BYTES = 2 * 1024**3  # a rank-512 LoRA on every FLUX linear layer in bf16 is ~1.2 GB
MAX_HEADER_BYTES = 32 * 1024**2
MAX_TENSORS = 20_000

FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
SD3_BLOCKS = 38  # SD3.5 Large; Medium has 24
FLUX_MLP_RATIO = 4  # proj_mlp width = 4 x hidden (used only to pad a missing piece)

# hidden sizes of the real checkpoints, used only to tell FLUX from SD3 when the module
# names alone match both (a LoRA on the joint attention only)
_SD3_HIDDEN = {1536, 2432}

_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_DTYPE_SIZES = {
    **_FLOAT_DTYPES, "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class ModuleMap:
    """One kohya/ComfyUI module and the diffusers module(s) it corresponds to."""

    original: str  # path in the original checkpoint, e.g. "double_blocks.0.img_attn.qkv"
    targets: tuple[str, ...]  # diffusers paths (no "transformer." prefix), fused in this order
    swap: str = ""  # "always" | "if_2x": swap the halves of the output rows (shift/scale)

    @property
    def kohya(self) -> str:
        """The kohya/ComfyUI module name, e.g. ``lora_unet_double_blocks_0_img_attn_qkv``."""
        return KOHYA_PREFIX + self.original.replace(".", "_")

    def swaps(self, out_features: int, in_features: int) -> bool:
        return self.swap == "always" or (self.swap == "if_2x" and out_features == 2 * in_features)


@dataclass(frozen=True)
class _Index:
    table: tuple[ModuleMap, ...]
    by_kohya: dict[str, ModuleMap]
    by_original: dict[str, ModuleMap]
    by_target: dict[str, tuple[ModuleMap, int]]


def _flux_table() -> list[ModuleMap]:
    rows = []
    for i in range(FLUX_DOUBLE_BLOCKS):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        rows += [
            ModuleMap(f"{o}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            ModuleMap(f"{o}.img_attn.proj", (f"{d}.attn.to_out.0",)),
            ModuleMap(f"{o}.txt_attn.qkv",
                      (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            ModuleMap(f"{o}.txt_attn.proj", (f"{d}.attn.to_add_out",)),
            ModuleMap(f"{o}.img_mlp.0", (f"{d}.ff.net.0.proj",)),
            ModuleMap(f"{o}.img_mlp.2", (f"{d}.ff.net.2",)),
            ModuleMap(f"{o}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",)),
            ModuleMap(f"{o}.txt_mlp.2", (f"{d}.ff_context.net.2",)),
            ModuleMap(f"{o}.img_mod.lin", (f"{d}.norm1.linear",)),
            ModuleMap(f"{o}.txt_mod.lin", (f"{d}.norm1_context.linear",)),
        ]
    for i in range(FLUX_SINGLE_BLOCKS):
        s, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        rows += [
            ModuleMap(f"{o}.linear1",
                      (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")),
            ModuleMap(f"{o}.linear2", (f"{s}.proj_out",)),
            ModuleMap(f"{o}.modulation.lin", (f"{s}.norm.linear",)),
        ]
    rows += [
        ModuleMap("final_layer.linear", ("proj_out",)),
        ModuleMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap="always"),
        ModuleMap("img_in", ("x_embedder",)),
        ModuleMap("txt_in", ("context_embedder",)),
    ]
    for orig, diff in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                       ("guidance_in", "guidance_embedder")):
        rows += [
            ModuleMap(f"{orig}.in_layer", (f"time_text_embed.{diff}.linear_1",)),
            ModuleMap(f"{orig}.out_layer", (f"time_text_embed.{diff}.linear_2",)),
        ]
    return rows


def _sd3_table() -> list[ModuleMap]:
    rows = []
    for i in range(SD3_BLOCKS):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        rows += [
            ModuleMap(f"{x}.attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            ModuleMap(f"{x}.attn.proj", (f"{d}.attn.to_out.0",)),
            ModuleMap(f"{c}.attn.qkv",
                      (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            ModuleMap(f"{c}.attn.proj", (f"{d}.attn.to_add_out",)),
            ModuleMap(f"{x}.attn2.qkv", (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v")),
            ModuleMap(f"{x}.attn2.proj", (f"{d}.attn2.to_out.0",)),
            ModuleMap(f"{x}.mlp.fc1", (f"{d}.ff.net.0.proj",)),
            ModuleMap(f"{x}.mlp.fc2", (f"{d}.ff.net.2",)),
            ModuleMap(f"{c}.mlp.fc1", (f"{d}.ff_context.net.0.proj",)),
            ModuleMap(f"{c}.mlp.fc2", (f"{d}.ff_context.net.2",)),
            ModuleMap(f"{x}.adaLN_modulation.1", (f"{d}.norm1.linear",)),
            ModuleMap(f"{c}.adaLN_modulation.1", (f"{d}.norm1_context.linear",), swap="if_2x"),
        ]
    rows += [
        ModuleMap("final_layer.linear", ("proj_out",)),
        ModuleMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap="always"),
        ModuleMap("context_embedder", ("context_embedder",)),
        ModuleMap("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        ModuleMap("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        ModuleMap("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        ModuleMap("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ]
    return rows


@functools.cache
def _index(family: str) -> _Index:
    if family == "flux":
        table = tuple(_flux_table())
    elif family == "sd3":
        table = tuple(_sd3_table())
    else:
        raise ValueError(f"unknown model family {family!r} (expected one of {FAMILIES})")
    by_target = {t: (m, j) for m in table for j, t in enumerate(m.targets)}
    return _Index(table, {m.kohya: m for m in table}, {m.original: m for m in table}, by_target)


def module_table(family: str) -> tuple[ModuleMap, ...]:
    """The full kohya <-> diffusers module table of a family (``"flux"`` or ``"sd3"``)."""
    return _index(family).table


def diffusers_modules(family: str) -> frozenset[str]:
    """Every diffusers module path (no ``transformer.`` prefix) a LoRA may target."""
    return frozenset(_index(family).by_target)


def kohya_modules(family: str) -> frozenset[str]:
    """Every kohya/ComfyUI module name (``lora_unet_...``) of a family."""
    return frozenset(_index(family).by_kohya)


# --------------------------------------------------------------------------- key parsing

_DIFFUSERS_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (format, module, part) or None when it is no LoRA key we know."""
    if key.startswith(DIFFUSERS_PREFIX):
        for suffix, part in _DIFFUSERS_PARTS.items():
            if key.endswith(suffix) and len(key) > len(DIFFUSERS_PREFIX) + len(suffix):
                return "diffusers", key[len(DIFFUSERS_PREFIX):-len(suffix)], part
    elif key.startswith((KOHYA_PREFIX, COMFY_PREFIX)):
        prefix = KOHYA_PREFIX if key.startswith(KOHYA_PREFIX) else COMFY_PREFIX
        for suffix, part in _KOHYA_PARTS.items():
            if key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                module = key[:-len(suffix)]
                if module.startswith(COMFY_PREFIX):  # normalise ComfyUI's dotted form
                    module = KOHYA_PREFIX + module[len(COMFY_PREFIX):].replace(".", "_")
                return "kohya", module, part
    return None


def _unknown_key_message(key: str) -> str:
    if key.startswith(("lora_te", "text_encoder", "text_encoders")):
        return f"tensor {key!r} is a text-encoder LoRA, which is not supported (only the transformer)"
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        return f"tensor {key!r} belongs to a DoRA, which is not supported (plain LoRA only)"
    if key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        return f"tensor {key!r} is not a known LoRA key (diffusers keys start with 'transformer.')"
    return f"tensor {key!r} is not a known FLUX or SD3 LoRA key"


@dataclass
class _Module:
    down: tuple | None = None  # (dtype, shape) or a tensor
    up: tuple | None = None
    alpha: tuple | None = None


def _group(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[str, dict[str, _Module]]:
    """Group tensor specs by module; all keys must be of one format."""
    if not specs:
        raise InputError("it holds no tensors")
    if len(specs) > MAX_TENSORS:
        raise InputError(f"it holds {len(specs)} tensors (the limit is {MAX_TENSORS})")
    fmt = None
    modules: dict[str, _Module] = {}
    for key, spec in specs.items():
        parsed = _split_key(key)
        if parsed is None:
            raise InputError(_unknown_key_message(key))
        key_fmt, module, part = parsed
        if fmt is None:
            fmt = key_fmt
        elif key_fmt != fmt:
            raise InputError("it mixes diffusers and kohya key formats")
        entry = modules.setdefault(module, _Module())
        if getattr(entry, part) is not None:
            raise InputError(f"tensor {key!r} appears twice")
        setattr(entry, part, spec)
    assert fmt is not None
    return fmt, modules


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x[1])


def _dtype_name(x) -> str:
    if isinstance(x, torch.Tensor):
        return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                torch.float64: "F64"}.get(x.dtype, str(x.dtype))
    return x[0]


def _check_module(fmt: str, module: str, m: _Module) -> tuple[int, int, int]:
    """Shape/dtype checks of one module; returns (rank, in_features, out_features)."""
    where = f"{DIFFUSERS_PREFIX}{module}" if fmt == "diffusers" else module
    if m.down is None or m.up is None:
        missing = ("lora_A" if fmt == "diffusers" else "lora_down") if m.down is None else (
            "lora_B" if fmt == "diffusers" else "lora_up")
        raise InputError(f"module {where!r} has no {missing} weight")
    for t in (m.down, m.up) + ((m.alpha,) if m.alpha is not None else ()):
        if _dtype_name(t) not in _FLOAT_DTYPES:
            raise InputError(f"module {where!r} has {_dtype_name(t)} tensors (expected float)")
    down, up = _shape(m.down), _shape(m.up)
    if len(down) != 2 or len(up) != 2:
        raise InputError(f"module {where!r} is not a 2-D (linear) LoRA: shapes {down} and {up}")
    rank, in_features = down
    out_features, up_rank = up
    if rank != up_rank:
        raise InputError(f"module {where!r} has mismatched ranks: down {rank}, up {up_rank}")
    if not 1 <= rank <= MAX_RANK:
        raise InputError(f"module {where!r} has rank {rank} (supported: 1 to {MAX_RANK})")
    if in_features < 1 or out_features < 1:
        raise InputError(f"module {where!r} has an empty weight")
    if m.alpha is not None and math.prod(_shape(m.alpha)) != 1:
        raise InputError(f"module {where!r} has a non-scalar alpha {_shape(m.alpha)}")
    return rank, in_features, out_features


def _candidates(fmt: str, modules: Mapping[str, _Module]) -> list[str]:
    found = []
    for family in FAMILIES:
        idx = _index(family)
        known = idx.by_target if fmt == "diffusers" else idx.by_kohya
        if all(m in known for m in modules):
            found.append(family)
    if found:
        return found
    for module in modules:
        if not any(module in (_index(f).by_target if fmt == "diffusers" else _index(f).by_kohya)
                   for f in FAMILIES):
            key = DIFFUSERS_PREFIX + module + ".lora_A.weight" if fmt == "diffusers" else \
                module + ".lora_down.weight"
            raise InputError(_unknown_key_message(key))
    raise InputError("it mixes FLUX and SD3 modules")


def _pick_family(candidates: list[str], dims: Mapping[str, tuple[int, int, int]],
                 family_hint: str | None) -> str:
    if len(candidates) == 1:
        return candidates[0]
    if family_hint in candidates:
        return family_hint
    # only modules both transformers have (joint attention): tell them apart by width
    for module, (_, in_features, _) in dims.items():
        if module.endswith((".attn.to_q", ".attn.add_q_proj", "_attn_qkv")):
            return "sd3" if in_features in _SD3_HIDDEN else "flux"
    return "flux"


def _check_layout(fmt: str, family: str, dims: Mapping[str, tuple[int, int, int]]) -> None:
    """Fused kohya modules must split into their pieces; swapped ones need an even width."""
    idx = _index(family)
    for module, (_, in_features, out_features) in dims.items():
        entry = idx.by_kohya[module] if fmt == "kohya" else idx.by_target[module][0]
        if fmt == "kohya" and len(entry.targets) == 3 and out_features % 3:
            raise InputError(f"fused module {module!r} has {out_features} output rows (not 3 x n)")
        if fmt == "kohya" and len(entry.targets) == 4 and out_features <= 3 * in_features:
            raise InputError(f"fused module {module!r} has {out_features} output rows "
                             f"(expected more than 3 x {in_features})")
        if entry.swap == "always" and out_features % 2:
            raise InputError(f"module {module!r} has an odd number of output rows")


def analyse(specs: Mapping, family_hint: str | None = None) -> tuple[str, str]:
    """Check LoRA tensor names, shapes and dtypes; return ``(format, family)``.

    ``specs`` maps tensor names to tensors or to ``(dtype_name, shape)`` pairs (as read
    from a safetensors header). ``format`` is ``"diffusers"`` or ``"kohya"``, ``family``
    ``"flux"`` or ``"sd3"``; ``family_hint`` decides when the names fit both families.
    Raises :class:`InputError` naming the first problem.
    """
    fmt, modules = _group(specs)
    dims = {name: _check_module(fmt, name, m) for name, m in modules.items()}
    family = _pick_family(_candidates(fmt, modules), dims, family_hint)
    _check_layout(fmt, family, dims)
    return fmt, family


# --------------------------------------------------------------------------- conversions

def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return t
    return (t.to(torch.float32) * factor).to(t.dtype)


def _split_dims(entry: ModuleMap, out_features: int, in_features: int) -> list[int]:
    if len(entry.targets) == 3:
        return [out_features // 3] * 3
    return [in_features] * 3 + [out_features - 3 * in_features]


def _pad_dim(entry: ModuleMap, piece: int, present: Mapping[int, tuple], in_features: int) -> int:
    """Output rows of a fused piece the LoRA does not cover."""
    if piece == 3:  # FLUX single block: proj_mlp
        return FLUX_MLP_RATIO * in_features
    for j, (_, b) in present.items():
        if j < 3:
            return b.shape[0]
    return in_features


def _diffusers_groups(state: Mapping[str, torch.Tensor], family: str) -> dict[str, _Module]:
    fmt, fam = analyse(state, family_hint=family)
    if fmt != "diffusers":
        raise InputError("expected diffusers/PEFT LoRA keys (transformer.<module>.lora_A.weight)")
    if fam != family:
        raise InputError(f"this is a {fam.upper()} LoRA, not {family.upper()}")
    return _group(state)[1]


def diffusers_to_kohya(
    state: Mapping[str, torch.Tensor], family: str, scale: float | Mapping[str, float] = 1.0,
) -> dict[str, torch.Tensor]:
    """Convert a diffusers/PEFT LoRA state dict to kohya/ComfyUI keys (see module docstring).

    ``scale`` is the factor diffusers applies to ``B @ A`` (``lora_alpha / r``): one number
    or a dict by module path (no ``transformer.`` prefix; missing modules: 1). Every
    output module gets ``lora_down``, ``lora_up`` and a float32 scalar ``alpha`` with
    ``alpha / rank = scale`` (for our ``lora_alpha = rank`` training: ``alpha = rank``,
    ``3 * rank`` for fused q/k/v, ``4 * rank`` for FLUX ``linear1``). ``.alpha`` tensors in
    ``state`` override ``scale`` for their module.
    """
    idx = _index(family)
    groups = _diffusers_groups(state, family)

    def scale_of(module: str, m: _Module) -> float:
        if m.alpha is not None:
            return float(m.alpha.reshape(-1)[0]) / m.down.shape[0]
        if isinstance(scale, Mapping):
            return float(scale.get(module, 1.0))
        return float(scale)

    fused: dict[ModuleMap, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for module, m in groups.items():
        entry, piece = idx.by_target[module]
        fused.setdefault(entry, {})[piece] = (m.down, m.up, scale_of(module, m))

    out: dict[str, torch.Tensor] = {}
    for entry in idx.table:  # table order: stable, readable output
        pieces = fused.get(entry)
        if not pieces:
            continue
        if len(entry.targets) == 1:
            down, up, s = pieces[0]
            if entry.swaps(up.shape[0], down.shape[1]):
                up = _swap_halves(up)
            rank = down.shape[0]
        else:
            in_features = {a.shape[1] for a, _, _ in pieces.values()}
            if len(in_features) != 1:
                raise InputError(f"the pieces of fused module {entry.kohya!r} differ in input size")
            in_f = in_features.pop()
            s = next(iter(pieces.values()))[2]  # one alpha per fused module: rescale the others
            present = {j: (a, b) for j, (a, b, _) in pieces.items()}
            dtype = functools.reduce(torch.promote_types, [t.dtype for ab in present.values() for t in ab])
            rows = [present[j][1].shape[0] if j in present else _pad_dim(entry, j, present, in_f)
                    for j in range(len(entry.targets))]
            rank = sum(a.shape[0] for a, _ in present.values())
            down = torch.cat([present[j][0].to(dtype) for j in sorted(present)], dim=0)
            up = torch.zeros(sum(rows), rank, dtype=dtype)
            row = col = 0
            for j, n_rows in enumerate(rows):
                if j in pieces:
                    a, b, s_j = pieces[j]
                    r = a.shape[0]
                    up[row:row + n_rows, col:col + r] = _scaled(b, s_j / s if s else 1.0).to(dtype)
                    col += r
                row += n_rows
        out[f"{entry.kohya}.lora_down.weight"] = down.contiguous().clone()
        out[f"{entry.kohya}.lora_up.weight"] = up.contiguous().clone()
        out[f"{entry.kohya}.alpha"] = torch.tensor(float(rank * s), dtype=torch.float32)
    return out


def kohya_to_diffusers(state: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Convert a kohya/ComfyUI LoRA state dict to diffusers/PEFT keys (scale 1).

    ``alpha / rank`` (1 when a module has no alpha) is folded into the up matrices;
    fused modules are split as described in the module docstring. Accepts the
    ``lora_unet_...`` names and ComfyUI's dotted ``diffusion_model....`` form.
    """
    fmt, fam = analyse(state, family_hint=family)
    if fmt != "kohya":
        raise InputError("expected kohya/ComfyUI LoRA keys (lora_unet_<module>.lora_down.weight)")
    if fam != family:
        raise InputError(f"this is a {fam.upper()} LoRA, not {family.upper()}")
    idx = _index(family)
    out: dict[str, torch.Tensor] = {}
    for name, m in _group(state)[1].items():
        entry = idx.by_kohya[name]
        down, up = m.down, m.up
        rank = down.shape[0]
        factor = float(m.alpha.reshape(-1)[0]) / rank if m.alpha is not None else 1.0
        up = _scaled(up, factor)
        if len(entry.targets) == 1:
            if entry.swaps(up.shape[0], down.shape[1]):
                up = _swap_halves(up)
            parts = [(entry.targets[0], down, up)]
        else:
            parts = []
            row = 0
            for target, n_rows in zip(entry.targets, _split_dims(entry, up.shape[0], down.shape[1]), strict=True):
                block = up[row:row + n_rows]
                row += n_rows
                cols = torch.nonzero(block.ne(0).any(dim=0)).flatten()
                if cols.numel() == 0:  # the fused LoRA leaves this piece unchanged
                    continue
                if cols.numel() < rank:  # block-diagonal: keep only this piece's ranks
                    parts.append((target, down[cols], block[:, cols]))
                else:
                    parts.append((target, down, block))
        for target, a, b in parts:
            out[f"{DIFFUSERS_PREFIX}{target}.lora_A.weight"] = a.contiguous().clone()
            out[f"{DIFFUSERS_PREFIX}{target}.lora_B.weight"] = b.contiguous().clone()
    return out


# --------------------------------------------------------------------------- scales

def _pattern_value(patterns: Mapping, module: str):
    """PEFT's ``alpha_pattern`` lookup, with keys taken literally (module name or dotted suffix).

    PEFT treats the keys as regular expressions; diffusers writes plain module names. A
    file's metadata is untrusted, so it never gets to run a regex (no ReDoS on import).
    """
    for pattern, value in patterns.items():
        if isinstance(pattern, str) and (module == pattern or module.endswith("." + pattern)):
            return value
    return None


def diffusers_scales(state_or_specs: Mapping, metadata: Mapping[str, str] | None) -> dict[str, float]:
    """The factor diffusers applies to each module's ``B @ A`` when it loads this file.

    From the ``lora_adapter_metadata`` header entry (PEFT ``LoraConfig``: ``lora_alpha``,
    ``alpha_pattern``, ``use_rslora``) if present, else from ``.alpha`` tensors, else 1.
    Keys: module paths without ``transformer.``; only diffusers-format modules.
    """
    fmt, modules = _group(state_or_specs)
    if fmt != "diffusers":
        return {}
    ranks = {name: _shape(m.down)[0] for name, m in modules.items() if m.down is not None}
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        try:
            config = json.loads(raw)
        except (ValueError, TypeError):
            raise InputError("its lora_adapter_metadata header entry is not valid JSON") from None
        if not isinstance(config, dict):
            raise InputError("its lora_adapter_metadata header entry is not a JSON object")
        if any(k.startswith(DIFFUSERS_PREFIX) for k in config):  # pipeline-level files
            config = {k[len(DIFFUSERS_PREFIX):]: v for k, v in config.items() if k.startswith(DIFFUSERS_PREFIX)}
        alpha_pattern = config.get("alpha_pattern") or {}
        lora_alpha = config.get("lora_alpha")
        rslora = bool(config.get("use_rslora"))
        scales = {}
        for name, rank in ranks.items():
            alpha = _pattern_value(alpha_pattern, name) if isinstance(alpha_pattern, dict) else None
            alpha = alpha if alpha is not None else lora_alpha if lora_alpha is not None else rank
            try:
                scales[name] = float(alpha) / (math.sqrt(rank) if rslora else rank)
            except (TypeError, ValueError):
                raise InputError("its lora_adapter_metadata has a non-numeric lora_alpha") from None
        return scales
    scales = {}
    for name, m in modules.items():
        if m.alpha is not None and isinstance(m.alpha, torch.Tensor):
            scales[name] = float(m.alpha.reshape(-1)[0]) / ranks[name]
        else:
            scales[name] = 1.0
    return scales


def bake_scales(state: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """A diffusers state dict with ``scales`` folded into the B matrices and no alphas."""
    out = {}
    for key, t in state.items():
        parsed = _split_key(key)
        if parsed is None or parsed[0] != "diffusers":
            raise InputError(_unknown_key_message(key))
        _, module, part = parsed
        if part == "alpha":
            continue
        out[key] = _scaled(t, scales.get(module, 1.0)) if part == "up" else t
    return out


# --------------------------------------------------------------------------- files

def _looks_like(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return " (it is a zip archive: a torch.save checkpoint?)"
    if head[:1] == b"\x80" or head.startswith((b"(", b"c__builtin__")):
        return " (it looks like a pickle: only safetensors files are loaded, for safety)"
    return ""


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Read and check a safetensors file's header without loading any tensor.

    Returns ``({name: (dtype, shape)}, metadata)``. Checks the size limit, the header
    JSON, dtypes, shapes and that the data offsets tile the data section exactly (what
    the safetensors loader checks), so a file that passes loads. Never unpickles.
    """
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        if size > MAX_LORA_BYTES:
            raise InputError(f"{name} is {size / 1024**3:.2f} GB; the limit is "
                             f"{MAX_LORA_BYTES / 1024**3:.0f} GB")
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{name} is not a safetensors file{_looks_like(head)}")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{name} is not a safetensors file (bad header)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{name} has a malformed metadata header")
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for key, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            ok = (dtype in _DTYPE_SIZES and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and end - begin == math.prod(shape) * _DTYPE_SIZES[dtype])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{name} has a malformed entry for tensor {key!r}")
        specs[key] = (dtype, tuple(shape))
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise InputError(f"{name} is not a valid safetensors file (overlapping or missing data)")
        position = end
    if position != size - 8 - n:
        raise InputError(f"{name} is not a valid safetensors file (truncated or trailing data)")
    return specs, metadata


def validate_lora(path: Path, family_hint: str | None = None) -> str:
    """Check a LoRA ``.safetensors`` file from its header alone; return its family.

    Every tensor must be a LoRA key of a supported transformer (diffusers
    ``transformer.<module>.lora_A/B.weight`` or kohya ``lora_unet_<module>.lora_down/
    lora_up.weight`` / ``.alpha``) with known module paths, 2-D float A/B pairs of equal
    rank <= ``MAX_RANK``, and the file must be at most ``MAX_LORA_BYTES``. Returns
    ``"flux"`` or ``"sd3"``; raises :class:`InputError` with a one-line message.
    """
    path = Path(path)
    specs, _ = read_safetensors_header(path)
    try:
        return analyse(specs, family_hint)[1]
    except InputError as e:
        raise InputError(f"{path.name} is not a usable LoRA: {e}") from None


@dataclass
class LoadedLora:
    """A validated LoRA in diffusers format with scale 1 (``lora_alpha = rank``)."""

    state: dict[str, torch.Tensor]
    family: str
    source_format: str  # "diffusers" | "kohya"
    metadata: dict[str, str]
    converted: bool  # state differs from the file (kohya keys, or an alpha folded in)


def load_lora(path: Path, family_hint: str | None = None) -> LoadedLora:
    """Validate and load a LoRA file (safetensors only), normalised to diffusers format.

    Kohya keys are converted; alphas (``.alpha`` tensors or a ``lora_adapter_metadata``
    ``lora_alpha`` other than the rank) are folded into the B matrices. Rejects
    non-finite values.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    specs, metadata = read_safetensors_header(path)
    try:
        fmt, family = analyse(specs, family_hint)
    except InputError as e:
        raise InputError(f"{path.name} is not a usable LoRA: {e}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{path.name} could not be read as safetensors: {e}") from None
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{path.name} is not a usable LoRA: tensor {key!r} has NaN or infinite values")
        if key.endswith(".alpha") and float(t.reshape(-1)[0]) <= 0:
            raise InputError(f"{path.name} is not a usable LoRA: {key!r} is not positive")
    try:
        if fmt == "kohya":
            state, converted = kohya_to_diffusers(tensors, family), True
        else:
            scales = diffusers_scales(tensors, metadata)
            converted = any(s != 1.0 for s in scales.values()) or any(k.endswith(".alpha") for k in tensors)
            state = bake_scales(tensors, scales) if converted else tensors
    except InputError as e:
        raise InputError(f"{path.name} is not a usable LoRA: {e}") from None
    return LoadedLora(state, family, fmt, dict(metadata), converted)
