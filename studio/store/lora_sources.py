"""LoRAs shared by other tools, brought to the two key formats :mod:`studio.store.lora_keys` knows.

What people share besides diffusers and kohya/ComfyUI files, and what happens to it:

* **text-encoder parts** (kohya ``lora_te*_``, diffusers ``text_encoder*.``, ComfyUI ``text_encoders.``):
  dropped with a note; the studio applies LoRAs to the transformer only.
* **OneTrainer** (``lora_transformer_<diffusers path, dots -> underscores>``) and LyCORIS' plain LoRA
  (``lycoris_<same>``): renamed to ``transformer.<path>`` (their ``.alpha`` tensors are kept, and
  folded in later like any alpha). The underscored path is looked up in the module table, never guessed.
* **PEFT** ``base_model.model.<path>`` (``PeftModel.save_pretrained``; adapter names such as
  ``lora_A.default.weight`` allowed): a diffusers path becomes ``transformer.<path>``, an original
  (BFL / Stability) path becomes ComfyUI's ``diffusion_model.<path>`` with ``lora_down`` / ``lora_up``.
* **XLabs** FLUX LoRAs (``double_blocks.N.processor.qkv_lora1.down.weight`` ...): converted with
  diffusers' own ``_convert_xlabs_flux_lora_to_diffusers`` (tensors only: the q/k/v split needs them).
* LoKr, LoHa and other LyCORIS algorithms: refused with the format's name
  (:func:`studio.store.lora_keys.unsupported_algorithm`).

Everything here only renames (or, for XLabs, converts) keys; the checks stay :func:`lora_keys.analyse`'s.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import TypeVar

from studio.store.lora_keys import FAMILIES, diffusers_modules, module_table, unsupported_algorithm

V = TypeVar("V")

TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
ONETRAINER_PREFIXES = ("lora_transformer_", "lycoris_")
PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight", ".alpha": ".alpha"}
_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[A-Za-z0-9_-]+\.weight$")  # lora_A.default.weight


@functools.cache
def _underscored() -> dict[str, str]:
    """``transformer_blocks_0_attn_to_q`` -> ``transformer_blocks.0.attn.to_q`` for every known module."""
    table: dict[str, str] = {}
    for family in FAMILIES:
        for path in diffusers_modules(family):
            table[path.replace(".", "_")] = path
    return table


@functools.cache
def _diffusers_paths() -> frozenset[str]:
    return frozenset(_underscored().values())


@functools.cache
def _originals() -> frozenset[str]:
    return frozenset(m.original for family in FAMILIES for m in module_table(family))


def kind_of(keys) -> str:
    """Which tool's names these are: ``"xlabs"``, ``"onetrainer"``, ``"peft"`` or ``"standard"``
    (diffusers or kohya/ComfyUI, told apart later by :func:`lora_keys.analyse`)."""
    keys = list(keys)
    if any(".processor." in k and ("double_blocks." in k or "single_blocks." in k) for k in keys):
        return "xlabs"
    if any(k.startswith(ONETRAINER_PREFIXES) for k in keys):
        return "onetrainer"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    return "standard"


def unsupported_message(keys) -> str | None:
    """A one-line refusal naming the format when any key belongs to LoKr, LoHa, ... (else None)."""
    for key in keys:
        algorithm = unsupported_algorithm(key)
        if algorithm:
            return f"{algorithm} is not supported (only plain LoRAs; tensor {key!r})"
    return None


def _rename_onetrainer(key: str) -> str:
    for prefix in ONETRAINER_PREFIXES:
        if key.startswith(prefix):
            for suffix, new in _SUFFIXES.items():
                if key.endswith(suffix):
                    path = _underscored().get(key[len(prefix):-len(suffix)])
                    return f"transformer.{path}{new}" if path else key
    return key


def _rename_peft(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        return key
    rest = _ADAPTER_NAME.sub(r".\1.weight", key[len(PEFT_PREFIX):])
    for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
        if rest.endswith(suffix):
            module = rest[:-len(suffix)]
            if module in _diffusers_paths():
                return f"transformer.{rest}"
            if module in _originals():
                kohya = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}[part]
                return f"diffusion_model.{module}{kohya}"
    return key


def rename(entries: Mapping[str, V]) -> tuple[dict[str, V], int]:
    """``entries`` (tensors or header specs) with other tools' names renamed and the text-encoder part
    dropped; returns ``(renamed, number of text-encoder tensors dropped)``. XLabs files need
    :func:`convert_xlabs` instead."""
    kind = kind_of(entries)
    out: dict[str, V] = {}
    dropped = 0
    for key, value in entries.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            dropped += 1
            continue
        if kind == "onetrainer":
            key = _rename_onetrainer(key)
        elif kind == "peft":
            key = _rename_peft(key)
        out[key] = value
    return out, dropped


def convert_xlabs(tensors: Mapping) -> dict:
    """An XLabs FLUX LoRA in diffusers keys, by diffusers' own converter (no alphas: scale 1)."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    from studio.errors import InputError

    try:
        converted = _convert_xlabs_flux_lora_to_diffusers(dict(tensors))
    except (ValueError, KeyError, AttributeError, AssertionError, RuntimeError) as e:
        raise InputError(f"its XLabs LoRA keys could not be converted ({type(e).__name__})") from None
    return {k: v.clone() for k, v in converted.items()}  # q, k and v share one down matrix there


def text_encoder_note(dropped: int) -> str:
    """The warning an import records when it dropped a text-encoder part."""
    return (f"the text-encoder part of this LoRA ({dropped} tensors) was dropped: the studio applies "
            "LoRAs to the transformer only, so the style may come out weaker than in the tool that trained it")
