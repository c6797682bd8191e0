"""The weight-free style metrics (issue 16): zero for identical images, a palette shift farther than
slight noise, deterministic, strict about their input."""

import numpy as np
import pytest
from PIL import Image

from studio.errors import InputError
from studio.styles import weightfree
from studio.styles.synthetic_styles import STYLES, render_style
from studio.styles.weightfree import (
    WeightFreeScorer,
    colour_distance,
    content_distance,
    rgb_to_lab,
    texture_distance,
)

METRICS = {"colour": colour_distance, "texture": texture_distance, "content": content_distance}


def _noised(img: Image.Image, sigma: float = 4.0, seed: int = 0) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    noisy = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _palette_shifted(img: Image.Image) -> Image.Image:
    """The same picture with its channels rotated (red -> green -> blue -> red): another palette."""
    return Image.fromarray(np.asarray(img)[..., [2, 0, 1]].copy())


@pytest.fixture(scope="module")
def pictures():
    """Varied test pictures: three synthetic style references (outlines, dots, soft pastel) and a 96 x 72 one."""
    chosen = [s for s in STYLES if s.name in ("outline-cartoon", "pop-dots", "soft-pastel")]
    pics = [render_style(s) for s in chosen]
    pics.append(render_style(STYLES[0]).resize((96, 72), Image.Resampling.BICUBIC))
    return pics


@pytest.mark.parametrize("name", sorted(METRICS))
def test_zero_for_identical_images(name, pictures):
    for img in pictures:
        assert METRICS[name](img, img.copy()) == 0.0


@pytest.mark.parametrize("name", sorted(METRICS))
def test_palette_shift_is_farther_than_slight_noise(name, pictures):
    for img in pictures:
        noisy, shifted = METRICS[name](img, _noised(img)), METRICS[name](img, _palette_shifted(img))
        assert 0 < noisy < shifted, (name, noisy, shifted)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_deterministic_and_symmetric(name, pictures):
    a, b = pictures[0], pictures[1]
    first = METRICS[name](a, b)
    weightfree._texture_net.cache_clear()  # the random network is rebuilt from its seed
    weightfree._directions.cache_clear()
    assert METRICS[name](a, b) == first
    assert METRICS[name](b, a) == pytest.approx(first, abs=1e-12)


def test_lab_conversion_matches_known_values():
    lab = rgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], (100, 0, 0), atol=0.01)
    np.testing.assert_allclose(lab[1], (0, 0, 0), atol=0.01)
    np.testing.assert_allclose(lab[2], (53.24, 80.09, 67.20), atol=0.05)
    with pytest.raises(InputError):
        rgb_to_lab(np.array([[np.nan, 0, 0]]))


def test_scorer_means_references_and_base_images(pictures):
    images, refs = pictures[:2], pictures[2:3]
    result = WeightFreeScorer().score(images, refs, base_images=images)
    assert result["content"] == 0.0 and result["per_image"]["content"] == [0.0, 0.0]
    for key in ("colour", "texture"):
        per = [METRICS[key](img, refs[0]) for img in images]
        assert result["per_image"][key] == pytest.approx(per)
        assert result[key] == pytest.approx(sum(per) / 2)
    # two references: the mean over them, as DINO / CLIP-I do
    two = WeightFreeScorer().score(images[:1], pictures[2:4])
    assert two["colour"] == pytest.approx(np.mean([colour_distance(images[0], r) for r in pictures[2:4]]))
    assert two["content"] is None and two["per_image"]["content"] is None


def test_scorer_refuses_bad_input(pictures):
    scorer = WeightFreeScorer()
    with pytest.raises(InputError, match="at least one"):
        scorer.score([], pictures)
    with pytest.raises(InputError, match="one base image per image"):
        scorer.score(pictures[:2], pictures[:1], base_images=pictures[:1])
    with pytest.raises(InputError, match="PIL image"):
        scorer.score([np.zeros((8, 8, 3))], pictures[:1])
    with pytest.raises(InputError, match="PIL image"):
        colour_distance(pictures[0], "a.png")
