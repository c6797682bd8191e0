"""Backbone registry: names users type, mapped to a model family and a checkpoint.

Besides the names below, a local folder or Hugging Face repo id holding a diffusers
``FluxPipeline`` or ``StableDiffusion3Pipeline`` works; its family is read from
``model_index.json``. Requests that reach the studio from outside (web, API, imported templates)
may only name the registry's ids and the backbones the operator configured
(:func:`studio.config.configured_backbones`): :func:`resolve_allowed` checks that before anything
is read or downloaded, so a shared studio never fetches or loads a repository a user picked.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from studio.errors import InputError, StudioError

KNOWN_BACKBONES: dict[str, tuple[str, str]] = {
    "tiny": ("flux", ""),  # built locally on first use, see tiny.py
    "flux-dev": ("flux", "black-forest-labs/FLUX.1-dev"),
    "sd3.5-large": ("sd3", "stabilityai/stable-diffusion-3.5-large"),
    "sd3.5-medium": ("sd3", "stabilityai/stable-diffusion-3.5-medium"),
}
PIPELINE_FAMILIES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
MAX_BACKBONE_CHARS = 300  # a folder path or hub id; longer is not a backbone


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone comes from, resolved without loading any weights."""

    backbone_id: str
    family: str
    source: str  # local folder or hub repo id

    @property
    def is_tiny(self) -> bool:
        return self.backbone_id == "tiny"

    @property
    def default_resolution(self) -> int:
        """Pixel budget side used when a recipe leaves the resolution open (the loaded backbone's)."""
        if self.is_tiny:
            from studio.engine.backbones.tiny import TINY_DEFAULT_RESOLUTION

            return TINY_DEFAULT_RESOLUTION
        from studio.engine.backbones.base import Backbone

        return Backbone.default_resolution


def _read_model_index(source: str) -> dict | None:
    folder = Path(source).expanduser()
    if folder.is_dir():
        index = folder / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else None
    if "/" not in source or source.count("/") > 1:
        return None
    try:  # a hub repo id: only the small index file is fetched (or read from the local cache)
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    except Exception:  # offline, gated, missing: all mean "not usable here"
        return None


def resolve(backbone_id: str) -> BackboneSpec:
    """Resolve a backbone name, folder or hub id; InputError if it is not a supported pipeline."""
    backbone_id = (backbone_id or "").strip()
    if backbone_id in KNOWN_BACKBONES:
        family, source = KNOWN_BACKBONES[backbone_id]
        if backbone_id != "tiny":
            index = _read_model_index(source)
            if index is None:
                raise InputError(
                    f"backbone {backbone_id!r} ({source}) is not available here: log in with "
                    "`hf auth login`, accept its licence on the Hub and download it, or use --backbone tiny"
                )
        return BackboneSpec(backbone_id, family, source)
    index = _read_model_index(backbone_id) if backbone_id else None
    family = PIPELINE_FAMILIES.get((index or {}).get("_class_name", ""))
    if family is None:
        names = ", ".join(KNOWN_BACKBONES)
        raise InputError(
            f"unknown backbone {backbone_id!r}: use one of {names}, or a folder / hub id of a "
            "FluxPipeline or StableDiffusion3Pipeline"
        )
    return BackboneSpec(backbone_id, family, str(Path(backbone_id).expanduser()) if
                        Path(backbone_id).expanduser().is_dir() else backbone_id)


def _normalised(value: str) -> str:
    """A backbone as compared by the allow-list: folders by their real path, ids as written."""
    value = (value or "").strip()
    looks_like_path = value.startswith(("/", "~", ".")) or "\\" in value or value.count("/") > 1
    if looks_like_path or Path(value).expanduser().is_dir():
        return os.path.realpath(Path(value).expanduser())
    return value


def default_backbone() -> str:
    """The backbone used when a request names none (``STUDIO_BACKBONE``).

    Without the variable: ``flux-dev`` on a machine with a CUDA GPU where its weights are
    available, else the offline ``tiny`` demo model.
    """
    value = (os.environ.get("STUDIO_BACKBONE") or "").strip()
    return value or _detected_backbone()


@functools.lru_cache(maxsize=1)
def _detected_backbone() -> str:
    import torch

    if not torch.cuda.is_available():
        return "tiny"
    try:
        return resolve("flux-dev").backbone_id
    except StudioError:
        return "tiny"


def allowed_backbones() -> list[str]:
    """The backbones a request may name: the registry's ids, then the operator's (env, read now)."""
    from studio.config import configured_backbones

    return list(dict.fromkeys([*KNOWN_BACKBONES, *configured_backbones()]))


def is_allowed(backbone_id: str) -> bool:
    """Whether ``backbone_id`` is a registry id or one the operator configured."""
    backbone_id = (backbone_id or "").strip()
    if not backbone_id or len(backbone_id) > MAX_BACKBONE_CHARS or "\x00" in backbone_id:
        return False
    if backbone_id in KNOWN_BACKBONES:
        return True
    wanted = _normalised(backbone_id)
    return any(_normalised(allowed) == wanted for allowed in allowed_backbones())


def resolve_allowed(backbone_id: str) -> BackboneSpec:
    """:func:`resolve` for a backbone named by a request or a stored template: only allowed ones.

    InputError (nothing read, nothing downloaded) for any other folder or hub id.
    """
    backbone_id = (backbone_id or "").strip()
    if not is_allowed(backbone_id):
        shown = backbone_id if len(backbone_id) <= 80 else backbone_id[:77] + "..."
        raise InputError(f"backbone {shown!r} is not allowed here: use one of {', '.join(allowed_backbones())} "
                         "(the operator can allow more with STUDIO_BACKBONES)")
    return resolve(backbone_id)


def load_backbone(backbone_id: str, device=None, precision: str = "auto", tier: str = "bf16",
                  offload_text_encoders: bool = False, on_download=None, text_encoder_placement: str | None = None):
    """Load a backbone's pipeline once; callers keep the returned object warm.

    ``tier`` and ``text_encoder_placement`` come from :func:`studio.engine.memory.plan_for`
    (``MemoryPlan.load_kwargs()``; the default is the unquantised model with everything on the device).
    ``offload_text_encoders`` is the older spelling of the ``swap`` placement. A hub id is first
    downloaded into the Hugging Face cache by :func:`studio.engine.backbones.download.ensure_downloaded`,
    which hands its progress to ``on_download`` (a :class:`~studio.engine.backbones.download.DownloadProgress`).
    """
    from studio.engine.backbones.flux import FluxBackbone
    from studio.engine.backbones.sd3 import SD3Backbone

    spec = resolve(backbone_id)
    if spec.is_tiny:
        import torch

        from studio.engine.backbones.tiny import TINY_DEFAULT_RESOLUTION, TINY_MAX_SEQUENCE_LENGTH, ensure_tiny_flux

        if (device is None or str(device) == "cpu") and not torch.cuda.is_available():
            # The tiny model's kernels are far too small to gain from threads; on a busy 2-core
            # machine two threads ran a training step 6x slower than one.
            torch.set_num_threads(1)

        return FluxBackbone.load(
            "tiny", str(ensure_tiny_flux()), device=device, precision=precision, tier=tier,
            offload_text_encoders=offload_text_encoders, text_encoder_placement=text_encoder_placement,
            default_resolution=TINY_DEFAULT_RESOLUTION, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        )
    cls = FluxBackbone if spec.family == "flux" else SD3Backbone
    folder = spec.source
    if not Path(folder).is_dir():  # a hub id: download with progress first, then load the local snapshot
        from studio.engine.backbones.download import ensure_downloaded

        folder = str(ensure_downloaded(spec.source, on_progress=on_download))
    backbone = cls.load(spec.backbone_id, folder, device=device, precision=precision, tier=tier,
                        offload_text_encoders=offload_text_encoders, text_encoder_placement=text_encoder_placement)
    backbone.source = spec.source  # templates record the hub id as their base model, not a cache path
    return backbone
