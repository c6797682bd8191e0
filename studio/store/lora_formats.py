"""LoRA format conversion: a diffusers/PEFT state dict to kohya/ComfyUI keys and back
(:func:`diffusers_to_kohya`, :func:`kohya_to_diffusers`), fusing and splitting q/k/v as described below, and
the scale diffusers applies to each module (:func:`diffusers_scales`, :func:`bake_scales`). The key formats
and the module table are in :mod:`studio.store.lora_keys`.

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

import torch

from studio.errors import InputError
from studio.store.lora_keys import (
    DIFFUSERS_PREFIX,
    ModuleMap,
    _group,
    _index,
    _Module,
    _shape,
    _split_key,
    _unknown_key_message,
    analyse,
)

FLUX_MLP_RATIO = 4  # proj_mlp width = 4 x hidden (used only to pad a missing piece)


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


# --------------------------------------------------------------------------- exports

def _unit_adapter_metadata(raw: str, ranks: Mapping[str, int]) -> str:
    """``lora_adapter_metadata`` rewritten for B matrices that already carry the scale: alpha = rank."""
    config = json.loads(raw)
    prefix = DIFFUSERS_PREFIX if any(k.startswith(DIFFUSERS_PREFIX) for k in config) else ""
    common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 0
    r = config.get(prefix + "r") if isinstance(config.get(prefix + "r"), int) else common
    config[prefix + "lora_alpha"] = r
    config[prefix + "alpha_pattern"] = {m: rank for m, rank in sorted(ranks.items()) if rank != r}
    if prefix + "use_rslora" in config:
        config[prefix + "use_rslora"] = False
    return json.dumps(config)


def fold_for_export(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers-format LoRA and its header, made to load at the same strength in every tool.

    ComfyUI ignores ``lora_adapter_metadata`` (it reads only ``.alpha`` tensors, default scale 1) and
    diffusers' kohya converter drops the final layer's alpha, so an export folds the scale diffusers
    applies (``lora_alpha / r``) into the B matrices and says ``alpha = rank``: no ``.alpha`` tensors, and
    a ``lora_adapter_metadata`` with ``lora_alpha = r`` (per-module ranks in ``alpha_pattern``). A file
    whose scales are all 1 comes back unchanged.
    """
    scales = diffusers_scales(state, metadata)
    if all(s == 1.0 for s in scales.values()) and not any(k.endswith(".alpha") for k in state):
        return dict(state), dict(metadata)
    folded = bake_scales(state, scales)
    out_meta = dict(metadata)
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        ranks = {k[len(DIFFUSERS_PREFIX):-len(".lora_A.weight")]: int(t.shape[0])
                 for k, t in folded.items() if k.endswith(".lora_A.weight")}
        out_meta["lora_adapter_metadata"] = _unit_adapter_metadata(raw, ranks)
    return folded, out_meta


def module_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The most common rank of a diffusers-format LoRA's modules (the template's rank)."""
    ranks = [int(t.shape[0]) for k, t in state.items() if k.endswith(".lora_A.weight")]
    return max(set(ranks), key=ranks.count) if ranks else 0
