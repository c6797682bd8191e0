"""LoRA files: a safetensors header read and checked without loading any tensor (never unpickling),
:func:`validate_lora` (a file's family from its header alone) and :func:`load_lora` (its tensors checked
and normalised to the diffusers format with scale 1, converting kohya keys and folding alphas in).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import InputError
from studio.store import lora_sources
from studio.store.lora_formats import bake_scales, diffusers_scales, kohya_to_diffusers
from studio.store.lora_keys import _FLOAT_DTYPES, analyse

MAX_LORA_BYTES = 2 * 1024**3  # a rank-512 LoRA on every FLUX linear layer in bf16 is ~1.2 GB
MAX_HEADER_BYTES = 32 * 1024**2

_DTYPE_SIZES = {
    **_FLOAT_DTYPES, "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "C64": 8,
}


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
    source_format: str  # "diffusers" | "kohya" | "onetrainer" | "peft" | "xlabs"
    metadata: dict[str, str]
    converted: bool  # state differs from the file (other keys, an alpha folded in, a part dropped)
    notes: list[str] = field(default_factory=list)  # what the import changed that the user should know


def load_lora(path: Path, family_hint: str | None = None) -> LoadedLora:
    """Validate and load a LoRA file (safetensors only), normalised to diffusers format.

    Other tools' names are brought to the diffusers or kohya keys first (:mod:`studio.store.lora_sources`:
    OneTrainer, PEFT, XLabs; a text-encoder part is dropped with a note; LoKr, LoHa... are refused by
    name). Kohya keys are converted; alphas (``.alpha`` tensors or a ``lora_adapter_metadata``
    ``lora_alpha`` other than the rank) are folded into the B matrices. Rejects non-finite values.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    unusable = f"{path.name} is not a usable LoRA"
    specs, metadata = read_safetensors_header(path)
    refusal = lora_sources.unsupported_message(specs)
    if refusal:
        raise InputError(f"{unusable}: {refusal}")
    kind = lora_sources.kind_of(specs)
    if kind != "xlabs":  # names and shapes checked before any tensor is read
        renamed, dropped = lora_sources.rename(specs)
        if dropped and not renamed:
            raise InputError(f"{unusable}: it holds only a text-encoder LoRA (the studio applies LoRAs to the "
                             "transformer only)")
        try:
            analyse(renamed, family_hint)
        except InputError as e:
            raise InputError(f"{unusable}: {e}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{path.name} could not be read as safetensors: {e}") from None
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{unusable}: tensor {key!r} has NaN or infinite values")
        if key.endswith(".alpha") and float(t.reshape(-1)[0]) <= 0:
            raise InputError(f"{unusable}: {key!r} is not positive")
    try:
        if kind == "xlabs":
            tensors, dropped = lora_sources.convert_xlabs(tensors), 0
        else:
            tensors, dropped = lora_sources.rename(tensors)
        fmt, family = analyse(tensors, family_hint)
        if fmt == "kohya":
            state, converted = kohya_to_diffusers(tensors, family), True
        else:
            scales = diffusers_scales(tensors, metadata)
            converted = any(s != 1.0 for s in scales.values()) or any(k.endswith(".alpha") for k in tensors)
            state = bake_scales(tensors, scales) if converted else tensors
    except InputError as e:
        raise InputError(f"{unusable}: {e}") from None
    notes = [lora_sources.text_encoder_note(dropped)] if dropped else []
    return LoadedLora(state, family, fmt if kind == "standard" else kind, dict(metadata),
                      converted or kind != "standard" or bool(dropped), notes)
