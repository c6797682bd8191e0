"""Automatic content captions of reference images with Florence-2 through transformers.

**Model.** Florence-2 base (``florence-community/Florence-2-base``, ``Florence2ForConditionalGeneration``,
native in transformers >= 4.56): 0.23 B parameters, about 0.5 GB in fp16. For its size it writes the
best plain captions of the small models transformers supports natively (FluxGym captions FLUX
datasets with it too); BLIP base is as large and writes shorter, vaguer captions, and SmolVLM-256M
is a chat model whose answers need more prompting and cleaning. We ask for ``<CAPTION>`` (one
sentence): a content description, not a paragraph about colours and brushwork.

**Content only.** The caption then loses every word of the style prompt and phrases such as "a
painting of" (:func:`studio.media.captions.strip_style_words`), so it fits
``"{content} in {style} style"`` and the style is learnt by the trigger words.

The model comes from ``STUDIO_CAPTION_MODEL`` (a local folder or a hub id), else the hub id above;
it is downloaded on first use in the worker, with progress (:func:`ensure_downloaded`), never in
the web process. :func:`captioner_availability` says whether it can be used without loading it.
:func:`build_tiny_captioner` writes a small random-weight model of the same class for offline tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from studio.errors import StudioError
from studio.media.captions import MAX_CAPTION_CHARS, strip_style_words

DEFAULT_CAPTION_MODEL = "florence-community/Florence-2-base"
CAPTION_MODEL_ENV = "STUDIO_CAPTION_MODEL"
MODEL_TYPE = "florence2"
MODEL_SIZE = "0.23 B parameters, about 0.5 GB in fp16"
TASK = "<CAPTION>"
MAX_NEW_TOKENS = 60
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")  # older / transformers 5 processors
_KEEP_SUFFIXES = (".json", ".safetensors", ".txt", ".model")


def caption_source(source: str | os.PathLike | None = None) -> str:
    """Which captioning model is used: the argument, else ``STUDIO_CAPTION_MODEL``, else Florence-2 base."""
    return str(source or os.environ.get(CAPTION_MODEL_ENV) or DEFAULT_CAPTION_MODEL)


def how_to_get(source: str | None = None) -> str:
    """One line telling the user how to get the captioning model's weights."""
    source = caption_source(source)
    return (f"run `hf download {source}` ({MODEL_SIZE}) on a machine with internet, or set "
            f"{CAPTION_MODEL_ENV} to a local copy; typed captions and the default caption work without it")


def captioner_availability(source: str | None = None) -> tuple[bool, str]:
    """(True, note) when the captioner can run here, else (False, why and how to get it); loads nothing.

    A hub model that is not cached yet is available while the Hub can be reached (the worker
    downloads it on first use, with progress); offline it is not.
    """
    source = caption_source(source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        missing = [] if (folder / "config.json").is_file() else ["config.json"]
        if not any((folder / n).is_file() for n in _PROCESSOR):
            missing.append("preprocessor_config.json")
        if not any((folder / w).is_file() for w in _WEIGHTS):
            missing.append("model.safetensors")
        if missing:
            return False, f"captioning model folder {source} lacks {', '.join(missing)}"
        return _check_type(source, folder / "config.json")
    if "/" not in source or source.startswith((".", "/", "~")):
        return False, f"captioning model folder {source} does not exist; {how_to_get(source)}"
    from huggingface_hub import constants, try_to_load_from_cache

    config = try_to_load_from_cache(source, "config.json")
    weights = try_to_load_from_cache(source, "model.safetensors")
    processor = any(isinstance(try_to_load_from_cache(source, n), str) for n in _PROCESSOR)
    if isinstance(config, str) and isinstance(weights, str) and processor:
        return _check_type(source, Path(config))
    if constants.HF_HUB_OFFLINE:
        return False, f"the captioning model {source} is not downloaded; {how_to_get(source)}"
    return True, f"the captioning model {source} ({MODEL_SIZE}) downloads on first use"


def _check_type(source: str, config: Path) -> tuple[bool, str]:
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != MODEL_TYPE:
        return False, f"captioning model {source} is a {found!r} model, not Florence-2 ({MODEL_TYPE!r})"
    return True, ""


def _select_files(siblings: list, index_path: Path) -> list:
    """The files ``from_pretrained`` needs from a transformers repo: configs, tokenizer, safetensors weights."""
    names = {s.rfilename for s in siblings}
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    return [s for s in siblings if "/" not in s.rfilename and s.rfilename.endswith(_KEEP_SUFFIXES)
            or (not has_safetensors and s.rfilename == "pytorch_model.bin")]


class Captioner:
    """Florence-2 captions, loaded once (GPU if there is one, else the CPU). Used by the worker only."""

    def __init__(self, source: str | os.PathLike | None = None, device: Any = None):
        self.source = caption_source(source)
        self._device = device
        self.model = None
        self.processor = None

    @property
    def device(self):
        import torch

        if self._device is None:
            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(self._device)

    def load(self, on_download: Callable | None = None) -> None:
        """Load the model (downloading it first from the Hub when needed; ``on_download`` gets a
        :class:`studio.engine.backbones.download.DownloadProgress`). StudioError saying why and how to get it."""
        if self.model is not None:
            return
        ok, reason = captioner_availability(self.source)
        if not ok:
            raise StudioError(f"auto-captioning is not available: {reason}")
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        folder: str | Path = self.source
        if not Path(self.source).expanduser().is_dir():
            from studio.engine.backbones.download import ensure_downloaded

            folder = ensure_downloaded(self.source, on_progress=on_download, index_file="config.json",
                                       select=_select_files)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(folder)
            self.model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        except Exception as exc:  # a broken or foreign folder: one line, not a traceback
            self.model = self.processor = None
            raise StudioError(f"could not load the captioning model {self.source} ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc

    def describe(self, image: Image.Image) -> str:
        """The model's raw one-sentence caption of one picture."""
        import torch

        self.load()
        inputs = self.processor(text=[TASK], images=[image.convert("RGB")], return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            limit = self.model.generation_config.max_new_tokens or MAX_NEW_TOKENS
            ids = self.model.generate(**inputs, max_new_tokens=min(limit, MAX_NEW_TOKENS))
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def caption(self, images: Sequence[Image.Image], style_prompt: str,
                on_progress: Callable[[int, int], None] | None = None,
                check: Callable[[], None] | None = None) -> list[str | None]:
        """Content captions of ``images`` (style words removed; None where nothing but style was said).

        ``on_progress(done, total)`` after each picture; ``check()`` before each one may raise to stop
        (cancel, shutdown).
        """
        out: list[str | None] = []
        for i, image in enumerate(images):
            if check is not None:
                check()
            out.append(content_caption(self.describe(image), style_prompt))
            if on_progress is not None:
                on_progress(i + 1, len(images))
        return out

    def close(self) -> None:
        """Drop the model (its memory goes back before a training loads its backbone)."""
        self.model = self.processor = None


def content_caption(raw: str, style_prompt: str) -> str | None:
    """A raw caption made to fit ``"{content} in {style} style"``: style words out, bounded, None if empty."""
    text = strip_style_words(raw, style_prompt)
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0]
    return text or None


# -- a tiny random-weight Florence-2 for offline tests -------------------------------------------

_TINY_WORDS = ("a an the of in on with and cat dog fox bird house tree boat car woman man child girl boy flower "
               "mountain river sea sky sun moon city street table cup chair window garden field forest road "
               "red blue green yellow small big old young sitting standing walking near under").split()


def build_tiny_captioner(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a small random-weight ``Florence2ForConditionalGeneration`` with its processor to ``folder``.

    Same classes and files as the hub checkpoint (DaViT vision tower, BART language model, a byte-level
    BPE tokenizer with an ``<image>`` token, a CLIP image processor), at 64 px, so the worker's code
    path is the real one. Its captions are random words of a small vocabulary.
    """
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        GenerationConfig,
    )
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    folder = Path(folder)
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + [chr(c) for c in range(33, 127)] + ["Ġ"]
    merges = []
    for word in _TINY_WORDS:
        piece = "Ġ"
        for ch in word:
            merges.append((piece, ch))
            piece += ch
            tokens.append(piece)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tokenizer = BartTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)),
                              extra_special_tokens={"image_token": "<image>"})
    # 64 px -> 16 x 16 after the stride-4 stem -> 8 x 8 after the second stage: 64 tokens + 1 pooled.
    image_processor = CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                         do_center_crop=False, image_seq_length=65)
    vision = Florence2VisionConfig(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2],
                                   num_groups=[2, 2], window_size=2, projection_dim=32, max_position_embeddings=16)
    text = dict(model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision.to_dict(), text_config=text,
                                                                  image_token_id=tokenizer.image_token_id))
    # Random weights would end at once or spell characters: a few whole words, like a real caption.
    words = {vocab["Ġ" + w] for w in _TINY_WORDS}
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, min_new_tokens=4, max_new_tokens=8, num_beams=1,
        do_sample=False, no_repeat_ngram_size=1, suppress_tokens=[i for i in range(len(tokenizer))
                                          if i not in words and i != tokenizer.eos_token_id])
    model.save_pretrained(folder)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
