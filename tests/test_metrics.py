"""Style metrics against hand-computed cosine similarities, with tiny random models of the real classes."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, prepare_run, train
from studio.errors import StudioError
from studio.styles.metrics import StyleScorer, score_template

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP_STATS = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def scorer(metric_models):
    return StyleScorer(*metric_models, device="cpu")


def picture(seed: int, size=(96, 80)) -> Image.Image:
    """A non-square image with structure (so crop vs squash matters)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    arr[: size[1] // 2, : size[0] // 3] = rng.integers(0, 255, 3)
    arr[size[1] // 3:, size[0] // 2:] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def normalise(arr: np.ndarray, stats) -> torch.Tensor:
    mean, std = (np.array(v, np.float32) for v in stats)
    return torch.from_numpy(((arr.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1))[None]


def dino_pixels(img: Image.Image) -> torch.Tensor:
    """The hub DINO config by hand: squash to 224 x 224 (bilinear), ImageNet mean/std."""
    return normalise(np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR)), IMAGENET)


def clip_pixels(img: Image.Image) -> torch.Tensor:
    """The hub CLIP config by hand: shortest side 224 (bicubic), centre crop 224, CLIP mean/std."""
    w, h = img.size
    size = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)  # the long side rounds down
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    return normalise(np.asarray(img.crop((left, top, left + 224, top + 224))), CLIP_STATS)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).item()


def test_an_image_scores_one_against_itself(scorer):
    a, b = picture(1), picture(2)
    result = scorer.score([a, b], [a], ["a cow", "a hat"])
    assert result["per_image"]["dino"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["per_image"]["clip_i"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["per_image"]["dino"][1] < 0.99999 and result["per_image"]["clip_i"][1] < 0.99999
    assert result["n_images"] == 2 and result["clip_t_full"] is None
    for key in ("dino", "clip_i", "clip_t"):
        values = result["per_image"][key]
        assert result[key] == pytest.approx(sum(values) / 2)
        assert all(-1 <= v <= 1 for v in values)


def test_features_are_normalised_and_batched(scorer):
    images = [picture(i) for i in range(5)]
    for feats in (scorer.dino_features(images), scorer.embed_images(images)):
        assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
    small = StyleScorer(scorer.dino_source, scorer.clip_source, device="cpu", batch_size=2)
    assert torch.allclose(small.embed_images(images), scorer.embed_images(images), atol=1e-5)
    texts = scorer.embed_texts(["a cow", "a fluffy baby sloth with a knitted hat trying to figure out a laptop"])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    # padding in a batch does not change a text's embedding
    assert torch.allclose(texts[0], scorer.embed_texts(["a cow"])[0], atol=1e-5)


def test_scores_match_hand_computed_cosines(scorer, metric_models):
    dino_dir, clip_dir = metric_models
    image, refs = picture(3), [picture(4, (64, 120)), picture(5)]
    result = scorer.score([image], refs, ["a red boat"], ["a red boat in flat cartoon style"])

    dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        def dino_cls(img):
            return dino(pixel_values=dino_pixels(img)).last_hidden_state[:, 0]

        def clip_img(img):
            return clip.get_image_features(pixel_values=clip_pixels(img)).pooler_output

        def clip_txt(text):
            return clip.get_text_features(**tokenizer([text], return_tensors="pt")).pooler_output

        want_dino = np.mean([cos(dino_cls(image), dino_cls(r)) for r in refs])
        want_clip_i = np.mean([cos(clip_img(image), clip_img(r)) for r in refs])
        want_clip_t = cos(clip_img(image), clip_txt("a red boat"))
        want_full = cos(clip_img(image), clip_txt("a red boat in flat cartoon style"))
    assert result["dino"] == pytest.approx(want_dino, abs=1e-4)
    assert result["clip_i"] == pytest.approx(want_clip_i, abs=1e-4)
    assert result["clip_t"] == pytest.approx(want_clip_t, abs=1e-4)
    assert result["clip_t_full"] == pytest.approx(want_full, abs=1e-4)
    # the mean over references is the mean of the one-reference scores
    singles = [scorer.score([image], [r])["dino"] for r in refs]
    assert result["dino"] == pytest.approx(sum(singles) / 2, abs=1e-6)


def test_preprocessing_follows_the_folder_configs(scorer, metric_models):
    """Pixel-exact: DINO squashes to 224 x 224, CLIP crops the centre (the hub configs; PIL backend)."""
    scorer.load()
    img = picture(6, (200, 90))
    dino_px = scorer._pixels(scorer._models["dino_processor"], [img])
    clip_px = scorer._pixels(scorer._models["clip_processor"], [img])
    assert dino_px.shape == clip_px.shape == (1, 3, 224, 224)
    assert torch.allclose(dino_px, dino_pixels(img), atol=1e-5)  # pixel-exact
    assert torch.allclose(clip_px, clip_pixels(img), atol=1e-5)


def test_availability_messages(metric_models, tmp_path, monkeypatch):
    dino_dir, clip_dir = metric_models
    ok, reason = StyleScorer(tmp_path / "missing", clip_dir).available()
    assert not ok and "does not exist" in reason and "STUDIO_DINO_MODEL" in reason

    # hub ids with nothing in the (empty) cache while offline
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("STUDIO_DINO_MODEL", raising=False)
    monkeypatch.delenv("STUDIO_CLIP_MODEL", raising=False)
    scorer = StyleScorer()
    ok, reason = scorer.available()
    assert not ok
    assert "facebook/dino-vits16 is not downloaded" in reason and "hf download facebook/dino-vits16" in reason
    assert "openai/clip-vit-base-patch32" in reason and "STUDIO_CLIP_MODEL" in reason
    with pytest.raises(StudioError, match="not downloaded"):
        scorer.score([picture(1)], [picture(2)])
    # online but download=False (the UI's shared scorer): the cache alone decides, no network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    ok, reason = StyleScorer(download=False).available()
    assert not ok and "facebook/dino-vits16 is not downloaded" in reason

    # a folder without its processor config or tokenizer
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    ok, reason = StyleScorer(dino_dir, tmp_path / "bare").available()
    assert not ok and "preprocessor_config.json" in reason and "tokenizer_config.json" in reason

    # the models swapped: transformers would load CLIP weights into a random ViT with a mere warning
    ok, reason = StyleScorer(clip_dir, dino_dir).available()
    assert not ok and f"DINO model {clip_dir} is a 'clip' model, not 'vit'" in reason
    # a folder that passes the checks but does not load: unavailable from then on, with the loader's reason
    broken = tmp_path / "broken"
    shutil.copytree(dino_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    scorer = StyleScorer(broken, clip_dir)
    with pytest.raises(StudioError, match="could not load"):
        scorer.load()
    assert scorer.available()[0] is False and "could not load" in scorer.available()[1]

    # the environment variables choose the models
    monkeypatch.setenv("STUDIO_DINO_MODEL", str(dino_dir))
    monkeypatch.setenv("STUDIO_CLIP_MODEL", str(clip_dir))
    assert StyleScorer().available() == (True, "")


@pytest.fixture(scope="module")
def template(tiny_backbone, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("metrics-template") / "run"
    ref = Image.new("RGB", (64, 64), (30, 160, 220))
    recipe = Recipe(steps=4, grad_accum=1, preview_every=2, preview_steps=2, checkpoint_every=0)
    prepare_run(TrainRequest([ref], "blue poster", "blue", recipe), run_dir, "tiny", "flux", 64)
    return train(tiny_backbone, run_dir)


def test_score_template_uses_final_previews(template, scorer):
    result = score_template(template, scorer)
    meta = json.loads((template / "template.json").read_text())
    assert result["step"] == 4
    assert result["previews"] == [f"previews/step_0004_p{i}.png" for i in range(len(meta["preview_prompts"]))]
    assert result["prompts"] == meta["preview_prompts"]
    images = [Image.open(template / p) for p in result["previews"]]
    refs = [Image.open(template / r) for r in meta["references"]]
    full = [f"{p} in blue poster style" for p in meta["preview_prompts"]]
    direct = scorer.score(images, refs, meta["preview_prompts"], full)
    for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
        assert result[key] == pytest.approx(direct[key], abs=1e-6)
        assert -1 <= result[key] <= 1


def test_score_template_says_why_not(template, metric_models, tmp_path):
    result = score_template(template, StyleScorer(tmp_path / "nope", metric_models[1]))
    assert set(result) == {"unavailable"} and "does not exist" in result["unavailable"]
    bare = tmp_path / "bare"
    bare.mkdir()
    meta = json.loads((template / "template.json").read_text())
    (bare / "template.json").write_text(json.dumps({**meta, "previews": []}))
    assert score_template(bare, StyleScorer(*metric_models)) == \
        {"unavailable": "this template has no previews to score"}
