"""Style metrics of the paper (seed 000, §4 and Table 2) through transformers.

* **DINO**: ViT-S/16 (``facebook/dino-vits16``, ``ViTModel``), cosine similarity of the CLS token
  (the final-layernorm output at position 0, as DINO's own evaluation uses it) between a generated
  image and the style reference.
* **CLIP-I**: CLIP ViT-B/32 (``openai/clip-vit-base-patch32``, ``CLIPModel``), cosine similarity of
  the projected image embeddings of a generated image and the reference.
* **CLIP-T**: cosine similarity of the projected CLIP image and text embeddings.

Style similarity is the mean over a style's reference images (the paper has one reference per style).

**CLIP-T decision.** The paper does not say which text it compares to. We compare to the *content
prompt only* ("A baby penguin", not "A baby penguin in watercolor painting style"), as StyleDrop-style
evaluations do: the style words would reward images that merely look like the style and would mix
the style score into the text score. ``score(..., full_prompts=...)`` also reports the full-prompt
variant as ``clip_t_full``, so both are on record.

Preprocessing is the models' own image processors loaded from their folders (``preprocessor_config.json``)
with transformers' PIL backend, pinned so a machine with torchvision gives the same pixels as one
without. For the hub checkpoints that is: CLIP, shortest side to 224 (bicubic) + centre crop 224 +
CLIP mean/std; DINO, ``ViTImageProcessor`` resizing straight to 224 x 224 (bilinear) + ImageNet
mean/std (the hub config has no 256/crop-224 step, unlike DINO's own evaluation transform).

Models come from the hub cache or a local folder: argument > ``STUDIO_DINO_MODEL`` /
``STUDIO_CLIP_MODEL`` > the paper's hub ids. Nothing is downloaded while ``HF_HUB_OFFLINE=1``;
:meth:`StyleScorer.available` says why the models cannot be used instead of failing later.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from studio.errors import InputError, StudioError

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_ENV, CLIP_ENV = "STUDIO_DINO_MODEL", "STUDIO_CLIP_MODEL"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_PREVIEW_NAME = re.compile(r"step_(\d+)_p(\d+)(?:_s\d+)?\.png$")  # ARCHITECTURE.md also names a _s{seed}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _is_hub_id(source: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def _wrong_type(what: str, source: str, config: str, model_type: str) -> str | None:
    """transformers loads a CLIP folder into ViTModel with random weights and a mere warning: check first."""
    try:
        found = json.loads(Path(config).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != model_type:
        return f"{what} model {source} is a {found!r} model, not {model_type!r}"
    return None


def _check_source(what: str, source: str, env: str, model_type: str, extra_files: Sequence[str] = (),
                  download: bool = True) -> str | None:
    """Why ``source`` (folder or hub id) cannot be loaded here, or None when it can."""
    needed = ("config.json", "preprocessor_config.json", *extra_files)
    folder = Path(source).expanduser()
    if folder.is_dir():
        missing = [n for n in needed if not (folder / n).is_file()]
        if not any((folder / w).is_file() for w in _WEIGHTS):
            missing.append(" or ".join(_WEIGHTS))
        if missing:
            return f"{what} model folder {source} lacks {', '.join(missing)}"
        return _wrong_type(what, source, str(folder / "config.json"), model_type)
    if not _is_hub_id(source):
        return f"{what} model folder {source} does not exist; set {env} to a downloaded copy"
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    hint = f"run `hf download {source}` or set {env} to a local copy"
    cached = all(isinstance(try_to_load_from_cache(source, n), str) for n in needed)
    cached = cached and any(isinstance(try_to_load_from_cache(source, w), str) for w in _WEIGHTS)
    if cached:
        return _wrong_type(what, source, try_to_load_from_cache(source, "config.json"), model_type)
    if constants.HF_HUB_OFFLINE or not download:
        return f"{what} model {source} is not downloaded; {hint}"
    try:  # online: the small config files tell whether the repo can be fetched at all
        paths = [hf_hub_download(source, name) for name in needed]
    except Exception as exc:  # network, gated, missing: all mean "not usable here"
        return f"{what} model {source} cannot be fetched ({type(exc).__name__}); {hint}"
    return _wrong_type(what, source, paths[0], model_type)


class StyleScorer:
    """DINO / CLIP-I / CLIP-T scores with the paper's models, loaded lazily once and kept warm.

    ``dino_model`` / ``clip_model``: a local folder or hub id (default: the environment variables,
    then the paper's models). ``device``: default the first CUDA GPU, else the CPU. ``download``:
    fetch hub models that are not in the local cache (False: report them as not downloaded).
    """

    def __init__(self, dino_model: str | os.PathLike | None = None, clip_model: str | os.PathLike | None = None,
                 device: Any = None, batch_size: int = 32, download: bool = True):
        self.dino_source = str(dino_model or os.environ.get(DINO_ENV) or DEFAULT_DINO_MODEL)
        self.clip_source = str(clip_model or os.environ.get(CLIP_ENV) or DEFAULT_CLIP_MODEL)
        self._device = device
        self.batch_size = batch_size
        self.download = download
        self._availability: tuple[bool, str] | None = None
        self._models: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @property
    def device(self):
        import torch

        if self._device is None:
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self._device)

    def available(self) -> tuple[bool, str]:
        """(True, "") when both models can be loaded here, else (False, why) -- without loading them."""
        if self._models is not None:
            return True, ""
        if self._availability is None:
            reasons = [r for r in (
                _check_source("DINO", self.dino_source, DINO_ENV, "vit", download=self.download),
                # the CLIP folder carries its tokenizer too
                _check_source("CLIP", self.clip_source, CLIP_ENV, "clip", ("tokenizer_config.json",), self.download),
            ) if r]
            self._availability = (not reasons, "; ".join(reasons))
        return self._availability

    def load(self) -> None:
        """Load both models (once). Raises StudioError with the reason when they are not available."""
        if self._models is not None:
            return
        with self._lock:
            if self._models is not None:
                return
            ok, reason = self.available()
            if not ok:
                raise StudioError(f"style metrics unavailable: {reason}")
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

            try:  # backend="pil": the same pixels whether or not torchvision is installed
                models = {
                    "dino": ViTModel.from_pretrained(self.dino_source, add_pooling_layer=False),
                    "dino_processor": AutoImageProcessor.from_pretrained(self.dino_source, backend="pil"),
                    "clip": CLIPModel.from_pretrained(self.clip_source),
                    "clip_processor": AutoImageProcessor.from_pretrained(self.clip_source, backend="pil"),
                    "tokenizer": AutoTokenizer.from_pretrained(self.clip_source),
                }
            except Exception as exc:  # a broken or wrong folder: say so once, and stay unavailable
                reason = f"could not load {self.dino_source} / {self.clip_source} ({type(exc).__name__}: {exc})"
                self._availability = (False, reason)
                raise StudioError(f"style metrics unavailable: {reason}") from exc
            for key in ("dino", "clip"):
                models[key] = models[key].to(self.device).eval()
            self._models = models

    # -- features -----------------------------------------------------------------------------

    def _pixels(self, processor, images: Sequence[Image.Image]):
        batch = processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def _batched(self, items: Sequence, fn):
        import torch

        if not items:
            raise InputError("nothing to score: no images or texts given")
        with torch.no_grad():
            out = [fn(items[i: i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()

    def dino_features(self, images: Sequence[Image.Image]):
        """L2-normalised DINO CLS features, shape (N, 384) for ViT-S/16, on the CPU."""
        self.load()
        m = self._models
        return self._batched(images, lambda b: m["dino"](pixel_values=self._pixels(m["dino_processor"], b))
                             .last_hidden_state[:, 0])

    def embed_images(self, images: Sequence[Image.Image]):
        """L2-normalised CLIP image embeddings (after the projection), shape (N, 512), on the CPU."""
        self.load()
        m = self._models
        return self._batched(images, lambda b: m["clip"].get_image_features(
            pixel_values=self._pixels(m["clip_processor"], b)).pooler_output)

    def embed_texts(self, texts: Sequence[str]):
        """L2-normalised CLIP text embeddings (after the projection), shape (N, 512), on the CPU.

        Texts longer than CLIP's 77 tokens are truncated, as CLIP itself does.
        """
        self.load()
        m = self._models
        max_length = m["clip"].config.text_config.max_position_embeddings

        def encode(batch):
            tokens = m["tokenizer"](list(batch), padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt").to(self.device)
            return m["clip"].get_text_features(input_ids=tokens["input_ids"],
                                               attention_mask=tokens["attention_mask"]).pooler_output

        return self._batched(texts, encode)

    # -- scores -------------------------------------------------------------------------------

    def score(self, images: Sequence[Image.Image], references: Sequence[Image.Image],
              prompts: Sequence[str] | None = None, full_prompts: Sequence[str] | None = None) -> dict[str, Any]:
        """Score generated ``images`` against a style's ``references``.

        ``prompts`` (one per image) are the texts CLIP-T compares to: pass the *content* prompt
        ("A baby penguin"), see the module docstring. ``full_prompts`` (optional, one per image,
        e.g. "A baby penguin in watercolor painting style") add ``clip_t_full``.

        Returns ``{"dino", "clip_i", "clip_t", "clip_t_full", "n_images", "per_image": {metric: [...]}}``;
        each metric is the mean over images of the mean cosine similarity over references
        (``clip_t`` / ``clip_t_full`` are None when no texts are given).
        """
        images, references = list(images), list(references)
        if not images or not references:
            raise InputError("give at least one image and one reference image to score")
        for name, texts in (("prompts", prompts), ("full_prompts", full_prompts)):
            if texts is not None and len(texts) != len(images):
                raise InputError(f"give one of {name} per image ({len(images)}), got {len(texts)}")
        per_image: dict[str, list[float] | None] = {}
        n = len(images)
        clip_feats = self.embed_images(images + references)
        for key, feats in (("dino", self.dino_features(images + references)), ("clip_i", clip_feats)):
            per_image[key] = (feats[:n] @ feats[n:].T).clamp(-1, 1).mean(dim=1).tolist()  # mean over references
        for key, texts in (("clip_t", prompts), ("clip_t_full", full_prompts)):
            per_image[key] = None if texts is None else \
                (clip_feats[:n] * self.embed_texts(list(texts))).sum(dim=-1).clamp(-1, 1).tolist()
        result: dict[str, Any] = {k: (sum(v) / len(v) if v is not None else None) for k, v in per_image.items()}
        result["n_images"] = len(images)
        result["per_image"] = per_image
        return result


@functools.lru_cache(maxsize=4)
def default_scorer(dino_model: str | None = None, clip_model: str | None = None,
                   device: str | None = None) -> StyleScorer:
    """One shared, lazily loaded scorer per model pair (the UI and the retrieval index reuse it).

    It never downloads: showing a template card must not start a ~1 GB download behind the user's back.
    ``device``: default the first CUDA GPU, else the CPU; the web process passes "cpu" (it never holds the GPU).
    """
    return StyleScorer(dino_model, clip_model, device=device, download=False)


def _final_previews(meta: dict, folder: Path) -> tuple[int, list[tuple[int, Path]]]:
    """The last preview step of a template and its (prompt index, file) pairs."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for rel in meta.get("previews") or []:
        match = _PREVIEW_NAME.search(str(rel))
        if match and (folder / rel).is_file():
            found.setdefault(int(match[1]), []).append((int(match[2]), folder / rel))
    if not found:
        raise InputError("this template has no previews to score")
    step = max(found)
    return step, sorted(found[step])


def score_template(template_folder: str | os.PathLike, scorer: StyleScorer | None = None) -> dict[str, Any]:
    """Score a template's final-step previews against its references with its preview prompts.

    Returns :meth:`StyleScorer.score`'s dict plus ``step``, ``previews`` and ``prompts``; or
    ``{"unavailable": reason}`` when the metric models or the template's files are not there.
    CLIP-T uses the content preview prompts (``clip_t_full`` the prompts as generated).
    """
    from studio.engine.training import style_caption

    folder = Path(template_folder)
    scorer = scorer or default_scorer()
    ok, reason = scorer.available()
    if not ok:
        return {"unavailable": reason}
    try:
        meta = json.loads((folder / "template.json").read_text())
        step, previews = _final_previews(meta, folder)
        prompts = list(meta.get("preview_prompts") or [])
        if any(i >= len(prompts) for i, _ in previews):
            raise InputError("the template's preview prompts do not match its previews")
        references = [Image.open(folder / rel).convert("RGB") for rel in meta.get("references") or []]
        if not references:
            raise InputError("this template has no reference images")
        images = [Image.open(path).convert("RGB") for _, path in previews]
        content = [prompts[i] for i, _ in previews]
        style = meta.get("style_prompt") or ""
        full = [style_caption(p, style) if style else p for p in content]
        result = scorer.score(images, references, content, full)
    except (StudioError, OSError, ValueError, KeyError) as exc:
        return {"unavailable": str(exc) or type(exc).__name__}
    return {**result, "step": step, "previews": [str(p.relative_to(folder)) for _, p in previews],
            "prompts": content}


# The hub checkpoints' own preprocessor configs (legacy feature-extractor format, as downloaded), so
# the tiny stand-ins below go through exactly the same processor code path.
HUB_DINO_PREPROCESSOR = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224,
}
HUB_CLIP_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}


def build_tiny_metric_models(folder: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write small random-weight stand-ins of the metric models: ``(folder/dino, folder/clip)``.

    Same classes (``ViTModel``, ``CLIPModel``), saved with ``save_pretrained`` beside the hub's
    preprocessor configs and a locally built CLIP tokenizer, for offline tests and smoke runs.
    Their scores are numbers in [-1, 1] with no meaning.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from studio.engine.backbones.tiny import build_clip_tokenizer

    folder = Path(folder)
    dino_dir, clip_dir = folder / "dino", folder / "clip"
    tokenizer = build_clip_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dino = ViTModel(ViTConfig(**small, image_size=224, patch_size=16), add_pooling_layer=False)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(**small, vocab_size=len(tokenizer), max_position_embeddings=77,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(**small, image_size=224, patch_size=32), projection_dim=16,
        ))
    dino.save_pretrained(dino_dir)
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    (dino_dir / "preprocessor_config.json").write_text(json.dumps(HUB_DINO_PREPROCESSOR, indent=2))
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(HUB_CLIP_PREPROCESSOR, indent=2))
    return dino_dir, clip_dir
