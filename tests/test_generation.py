"""Generation with a template on the warm tiny backbone."""

import json

import numpy as np
import pytest
from PIL import Image

from studio.engine.generation import ASPECTS, GenerateOptions, final_prompt, generate, size_for_aspect
from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, prepare_run, train
from studio.errors import CancelledError, InputError


@pytest.fixture(scope="module")
def template(tiny_backbone, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    ref = Image.new("RGB", (64, 64), (30, 160, 220))
    prepare_run(TrainRequest([ref], "blue poster", "blue", Recipe(steps=30, lr=5e-3, preview_every=0)),
                run_dir, "tiny", "flux", 64)
    result = train(tiny_backbone, run_dir)
    return result, json.loads((result / "template.json").read_text())


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.float32)


def test_scale_zero_is_the_base_model_and_scale_one_differs(tiny_backbone, template, tmp_path):
    opts = dict(prompt="a boat", steps=6, seed=3)
    base = generate(tiny_backbone, GenerateOptions(**opts), tmp_path / "base")[0]
    zero = generate(tiny_backbone, GenerateOptions(**opts, lora_scale=0.0), tmp_path / "zero", template)[0]
    one = generate(tiny_backbone, GenerateOptions(**opts), tmp_path / "one", template)[0]
    # same final prompt for a fair comparison: the base run is not wrapped (no template style)
    wrapped = generate(tiny_backbone, GenerateOptions(prompt="a boat in blue poster style", steps=6, seed=3),
                       tmp_path / "wrapped")[0]
    assert np.abs(pixels(zero) - pixels(wrapped)).max() <= 1.0
    assert np.abs(pixels(one) - pixels(wrapped)).mean() > 0.5
    assert np.abs(pixels(base) - pixels(wrapped)).mean() > 0  # the style words matter too


def test_png_metadata_seeds_and_sizes(tiny_backbone, template, tmp_path):
    files = generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=4, seed=10, num_images=2,
                                                    aspect="16:9"), tmp_path, template, stem="t")
    assert [f.name for f in files] == ["t_10.png", "t_11.png"]
    image = Image.open(files[1])
    params = json.loads(image.text["studio"])
    assert params["seed"] == 11 and params["final_prompt"] == "a cow in blue poster style"
    assert params["template"] == template[1].get("id") and "Seed: 11" in image.text["parameters"]
    assert image.width > image.height and image.width % 16 == 0 and image.height % 16 == 0


def test_prompt_wrapping():
    assert final_prompt("a cat", "ink wash") == "a cat in ink wash style"
    assert final_prompt("a cat in ink wash style", "ink wash") == "a cat in ink wash style"
    assert final_prompt("a cat", "ink wash", wrap=False) == "a cat"
    assert final_prompt("a cat", None) == "a cat"


@pytest.mark.parametrize("aspect", list(ASPECTS))
@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_aspect_sizes(aspect, resolution):
    w, h = size_for_aspect(aspect, resolution)
    aw, ah = ASPECTS[aspect]
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w / h - aw / ah) < 0.35 * aw / ah
    assert w * h <= resolution * resolution


@pytest.mark.parametrize("bad", [dict(prompt=" "), dict(prompt="x", aspect="5:7"), dict(prompt="x", num_images=0),
                                 dict(prompt="x", steps=0), dict(prompt="x", width=8)])
def test_bad_options(bad):
    with pytest.raises(InputError):
        GenerateOptions(**bad).validate()


def test_wrong_family_template_is_refused(tiny_backbone, template, tmp_path):
    folder, meta = template
    with pytest.raises(InputError, match="sd3"):
        generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=2), tmp_path, (folder, {**meta, "family": "sd3"}))


@pytest.mark.parametrize("path", ["pipeline", "stepwise", "fusion"])
def test_cancel_is_seen_between_denoising_steps(tiny_backbone, template, tmp_path, path):
    """A cancel ends a picture after the denoising step in flight, not after all of them."""
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 3

    opts = dict(prompt="a boat", steps=12, seed=3, should_stop=should_stop)
    with pytest.raises(CancelledError, match="after denoising step 3"):
        if path == "pipeline":
            generate(tiny_backbone, GenerateOptions(prompt="a boat", steps=12, seed=3), tmp_path, template,
                     should_stop=should_stop)
        elif path == "stepwise":
            cond = tiny_backbone.encode_prompts(["a boat"])[0]
            tiny_backbone.generate_stepwise(cond, **{k: v for k, v in opts.items() if k != "prompt"})
        else:
            generate(tiny_backbone, GenerateOptions(prompt="a boat", steps=12, seed=3, fusion_weight=0.5), tmp_path,
                     template, should_stop=should_stop)
    assert len(asked) == 3 and not list(tmp_path.glob("*.png"))
    # the pipeline is fine afterwards: the next picture is the one an uncancelled run draws
    again = generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=4, seed=1), tmp_path / "a")[0]
    fresh = generate(tiny_backbone, GenerateOptions(prompt="a cow", steps=4, seed=1), tmp_path / "b")[0]
    assert np.array_equal(pixels(again), pixels(fresh))


def test_the_parameters_text_names_every_lora_and_the_schedule():
    from studio.engine.generation import parameters_text

    base = {"final_prompt": "a boat in ink style", "steps": 20, "guidance": 3.5, "seed": 4, "width": 64, "height": 64,
            "backbone": "tiny", "template": "ink", "lora_scale": 1.0}
    plain = parameters_text(base)
    assert "LoRA: ink @ 1.0, Model: tiny" in plain and "schedule" not in plain
    mixed = parameters_text({**base, "mix": [{"template": "neon", "scale": 0.5}], "style_schedule": 0.4,
                             "fusion_weight": 0.7, "noise_prior": True})
    assert "LoRA: ink @ 1.0, neon @ 0.5" in mixed and "Style schedule: first 40% of the steps" in mixed
    assert "Fusion weight: 0.7" in mixed and "Noise prior" in mixed
    assert "LoRA: none" in parameters_text({**base, "template": None})
