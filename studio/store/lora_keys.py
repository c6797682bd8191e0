"""LoRA key names: the two key formats of the same FLUX / SD3 LoRA, the module table between them
(:class:`ModuleMap`, one row per kohya/ComfyUI module) and the checks of a LoRA's tensor names, shapes and
dtypes (:func:`analyse`: which format, which family). Converting between the formats is
:mod:`studio.store.lora_formats`; reading files is :mod:`studio.store.lora_files`.

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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from studio.errors import InputError

FAMILIES = ("flux", "sd3")
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."  # ComfyUI's own saved LoRAs: dotted original paths

MAX_RANK = 512
MAX_TENSORS = 20_000

FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
SD3_BLOCKS = 38  # SD3.5 Large; Medium has 24

# hidden sizes of the real checkpoints, used only to tell FLUX from SD3 when the module
# names alone match both (a LoRA on the joint attention only)
_SD3_HIDDEN = {1536, 2432}

_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


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


# Parts of LoRA-like adapters this studio cannot apply (LyCORIS algorithms other than plain LoRA):
# a key holding one of these names the format in the refusal instead of "not a known key".
UNSUPPORTED_ALGORITHMS = (
    (".lokr_", "LoKr"), (".hada_", "LoHa"), (".oft_", "OFT"), (".oft_blocks", "OFT"),
    (".on_input", "(IA)3"), (".a1.weight", "GLoRA"), (".b1.weight", "GLoRA"),
    (".diff", "a full weight difference (LyCORIS 'full')"), (".lora_mid.", "LoCon (LyCORIS)"),
)


def unsupported_algorithm(key: str) -> str | None:
    """The adapter format a tensor name belongs to when it is not a plain LoRA (LoKr, LoHa, ...), else None."""
    for marker, name in UNSUPPORTED_ALGORITHMS:
        if marker in key:
            return f"LyCORIS {name}" if key.startswith("lycoris_") and "LyCORIS" not in name else name
    if key.startswith("lycoris_") and not key.endswith(tuple(_KOHYA_PARTS)):
        return "a LyCORIS adapter other than plain LoRA"
    return None


def _unknown_key_message(key: str) -> str:
    algorithm = unsupported_algorithm(key)
    if algorithm:
        return f"{algorithm} is not supported (only plain LoRAs): tensor {key!r}"
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

