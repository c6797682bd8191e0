"""Share a style template on the Hugging Face Hub, and import one from there.

Sharing uploads, into a model repo: the LoRA (diffusers keys, with the template card in its
safetensors header so another studio imports it whole), the final preview images under
``images/`` and a model card (``README.md``) built offline with huggingface_hub's
``ModelCard`` / ``ModelCardData``: base model, the style prompt as instance prompt, a widget
gallery of the previews and a diffusers usage snippet.

The token is passed straight to ``HfApi(token=...)`` for the one call and never stored,
logged or put in a message. Offline (``HF_HUB_OFFLINE=1`` or no network) every function
raises a :class:`StudioError` that says so.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from studio.engine.backbones import KNOWN_BACKBONES
from studio.errors import InputError, StudioError
from studio.store.templates import TemplateInfo, TemplateStore

log = logging.getLogger(__name__)

_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
OFFLINE_MESSAGE = ("the Hugging Face Hub cannot be reached from here (offline mode or no network); "
                   "download the template as a file instead and share that")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

A style LoRA trained with [Style Template Studio](https://github.com/) and the *Style-friendly SNR
sampler* (log-SNR ~ N({{ mu }}, {{ sigma }}²), {{ steps }} steps, rank {{ rank }}) on
{{ base_model_text }}.

<Gallery />

## Trigger words

Put the style prompt at the end of your prompt: `... in {{ style_prompt }} style`
(for example: *{{ example_prompt }}*).

## Use it with 🧨 diffusers

```python
import torch
from diffusers import {{ pipeline }}

pipe = {{ pipeline }}.from_pretrained("{{ base_model_id }}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{{ repo_id }}", weight_name="{{ weight_name }}")
image = pipe("{{ example_prompt }}", num_inference_steps=28, guidance_scale=7.0).images[0]
image.save("styled.png")
```

The weights are also importable in the studio: Gallery → Import → `{{ repo_id }}`.

## Training

- references: {{ n_refs }} image(s)
- sampler: {{ sampler }}
- recipe: {{ recipe }}
"""


def check_repo_id(repo_id: str) -> str:
    """A clean ``name`` or ``user/name``; InputError otherwise."""
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise InputError("give a repository name, e.g. 'my-watercolor-style' or 'your-name/my-watercolor-style'")
    if not _REPO_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise InputError(f"{repo_id[:100]!r} is not a valid Hub repository name (letters, digits, '-', '_', '.', "
                         "optionally 'user/' in front)")
    return repo_id


def base_model_id(info: TemplateInfo) -> str | None:
    """The Hub id of the model a template was trained on (None for the offline tiny model)."""
    base = info.meta.get("base_model")
    if isinstance(base, str) and "/" in base and not os.path.isdir(base):
        return base
    known = KNOWN_BACKBONES.get(info.backbone)
    return known[1] if known and known[1] else None


def final_previews(info: TemplateInfo) -> list[Path]:
    """The previews of the last training step (the finished style), else every preview."""
    previews = info.previews
    steps = [re.match(r"step_(\d+)_", p.name) for p in previews]
    numbered = [(int(m[1]), p) for m, p in zip(steps, previews, strict=True) if m]
    if numbered:
        last = max(s for s, _ in numbered)
        return [p for s, p in numbered if s == last]
    return previews


def build_model_card(info: TemplateInfo, repo_id: str, weight_name: str, images: list[str]) -> ModelCard:
    """The model card (README.md) of a shared template; built offline, no Hub call."""
    style = info.style_prompt or "this"
    prompts = info.meta.get("preview_prompts") or []
    base = base_model_id(info)
    widget = []
    for i, url in enumerate(images):
        content = prompts[i % len(prompts)] if prompts else "an image"
        widget.append({"text": f"{content} in {style} style", "output": {"url": url}})
    data = ModelCardData(
        license="other" if base and "FLUX" in base else "openrail++" if base else "mit",
        library_name="diffusers",
        base_model=base,
        instance_prompt=info.style_prompt or None,
        tags=["text-to-image", "diffusers", "lora", "template:sd-lora", "style", "style-template-studio",
              info.family or "flux"],
        widget=widget or None,
    )
    sampler = info.meta.get("sampler") or {}
    recipe = info.meta.get("recipe") or {}
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, name=info.name, style_prompt=style, repo_id=repo_id,
        weight_name=weight_name, pipeline=PIPELINES.get(info.family, "DiffusionPipeline"),
        base_model_id=base or "<base model folder>",
        base_model_text=f"[{base}](https://huggingface.co/{base})" if base else "the studio's offline tiny demo model",
        example_prompt=f"a wood cabin in {style} style", mu=sampler.get("mu", "?"), sigma=sampler.get("sigma", "?"),
        steps=info.meta.get("steps_done", recipe.get("steps", "?")), rank=recipe.get("rank", "?"),
        n_refs=len(info.references), sampler=sampler.get("name", "?"),
        recipe=", ".join(f"{k}={v}" for k, v in recipe.items() if v is not None),
    )


def prepare_folder(store: TemplateStore, template_id: str, repo_id: str, folder: Path) -> Path:
    """Write everything a share uploads into ``folder``: LoRA, images/, README.md."""
    info = store.get(template_id)
    weights = store.export_safetensors(template_id, folder)  # diffusers keys + the template card
    images_dir = folder / "images"
    images_dir.mkdir(exist_ok=True)
    urls = []
    for i, src in enumerate(final_previews(info)[:6]):
        shutil.copyfile(src, images_dir / f"sample_{i}.png")
        urls.append(f"images/sample_{i}.png")
    card = build_model_card(info, repo_id, weights.name, urls)
    (folder / "README.md").write_text(str(card), encoding="utf-8")
    return folder


def _offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE)


def _hub_error(exc: Exception, repo_id: str) -> StudioError:
    """A one-line message for a failed Hub call (never containing the token)."""
    if isinstance(exc, OfflineModeIsEnabled | ConnectionError | TimeoutError | LocalEntryNotFoundError):
        return StudioError(OFFLINE_MESSAGE)
    if isinstance(exc, EntryNotFoundError):
        return StudioError(f"{repo_id}: the LoRA file is missing from the repository")
    if isinstance(exc, GatedRepoError):
        return StudioError(f"{repo_id} is gated: accept its terms on the Hub and give a token")
    if isinstance(exc, RepositoryNotFoundError):
        return StudioError(f"no repository {repo_id!r} on the Hub (or it is private: give a token that can read it)")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return StudioError("the Hub refused the token: use a token with write access "
                               "(huggingface.co/settings/tokens)")
        return StudioError(f"the Hub answered with an error{f' ({status})' if status else ''}; try again later")
    return StudioError(f"sharing failed: {type(exc).__name__}")


def share(store: TemplateStore, template_id: str, repo_id: str, token: str | None, private: bool = True) -> str:
    """Create (or reuse) a model repo and upload the template; returns the repo's URL."""
    repo_id = check_repo_id(repo_id)
    token = (token or "").strip() or None
    if token is None:
        raise InputError("paste a Hugging Face access token with write access (it is used once, never stored)")
    store.get(template_id)  # NotFoundError before any network
    if _offline():
        raise StudioError(OFFLINE_MESSAGE)
    with tempfile.TemporaryDirectory(prefix="studio-share-") as tmp:
        folder = prepare_folder(store, template_id, repo_id, Path(tmp))
        try:
            api = HfApi(token=token)
            full_id = api.create_repo(repo_id, private=bool(private), exist_ok=True, repo_type="model").repo_id
            if full_id != repo_id:  # "name" became "user/name": fix the card's usage snippet
                prepare_folder(store, template_id, full_id, folder)
            api.upload_folder(repo_id=full_id, folder_path=str(folder), repo_type="model",
                              commit_message=f"Upload style template {store.get(template_id).name}")
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one clear line
            raise _hub_error(exc, repo_id) from None
    log.info("shared template %s to %s", template_id, full_id)
    return f"{hf_constants.ENDPOINT.rstrip('/')}/{full_id}"


def _pick_weights(files: list[str]) -> str | None:
    candidates = [f for f in files if f.endswith(".safetensors") and "/" not in f.strip("/")]
    candidates = candidates or [f for f in files if f.endswith(".safetensors")]
    if not candidates:
        return None
    # diffusers-keyed files first (ours, diffusers' training scripts), ComfyUI copies last
    preferred = ("pytorch_lora_weights.safetensors", "lora.safetensors")
    return sorted(candidates, key=lambda f: (Path(f).name not in preferred, "comfy" in f.lower(), len(f), f))[0]


def import_from_hub(store: TemplateStore, repo_id: str, token: str | None = None,
                    name: str | None = None) -> TemplateInfo:
    """Download a LoRA ``.safetensors`` from a Hub model repo and import it as a template."""
    repo_id = check_repo_id(repo_id)
    if "/" not in repo_id:
        raise InputError("give the full repository id, e.g. 'user/my-style'")
    token = (token or "").strip() or None
    try:
        files = HfApi(token=token).list_repo_files(repo_id)
        filename = _pick_weights(files)
        if filename is None:
            raise InputError(f"{repo_id} has no .safetensors LoRA file")
        path = hf_hub_download(repo_id, filename, token=token)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, repo_id) from None
    info = store.import_file(Path(path), name=name)
    if not info.meta.get("source_repo"):
        from studio.store.templates import TEMPLATE_JSON, write_json_atomic

        info.meta["source_repo"] = repo_id
        write_json_atomic(info.path / TEMPLATE_JSON, info.meta)
    return info
