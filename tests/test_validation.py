"""Every request checked at the door: strict types, finite numbers and bounded sizes, refused before queueing.

Each bad value is one a plain range check let through (a bool passes ``1 <= x <= 512``, NaN passes any
``if x < lo`` test, a fractional rank reaches peft, ``resolution 100000`` reaches the worker and runs out
of memory), or one that was refused only after GPU work (meme captions, comic gutters). Store-level and
fast: no worker runs; a request that reached the queue would show up as a job folder.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from queue_helpers import make_settings, write_image

from studio.api import StudioAPI
from studio.cli import main
from studio.engine.generation import GenerateOptions
from studio.engine.recipe import PRESETS, Recipe
from studio.errors import InputError
from studio.jobs.jobs import Jobs, parse_generate_options, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
NAN, INF = math.nan, math.inf

# (recipe field, bad value, words the message must contain)
BAD_RECIPES = [
    ("rank", True, "LoRA rank"), ("rank", 1.5, "LoRA rank"), ("rank", "32", "LoRA rank"),
    ("steps", True, "steps"), ("steps", 2.5, "steps"), ("steps", 10**7, "steps"),
    ("grad_accum", 0.5, "grad_accum"), ("grad_accum", 10**6, "grad_accum"),
    ("seed", 2**70, "seed"), ("seed", -1, "seed"), ("seed", True, "seed"), ("seed", 0.5, "seed"),
    ("resolution", "abc", "resolution"), ("resolution", 64.5, "resolution"),
    ("preview_every", True, "preview_every"), ("preview_every", 1.5, "preview_every"),
    ("checkpoint_every", 10**9, "checkpoint_every"), ("preview_steps", 10**6, "preview denoising steps"),
    ("preview_steps", True, "preview denoising steps"),
    ("lr", "1e-4", "learning rate"), ("lr", [1e-4], "learning rate"),
    ("alpha", INF, "alpha"), ("alpha", True, "alpha"),
    ("mu", NAN, "mu"), ("mu", INF, "mu"), ("mu", 1e308, "mu"), ("mu", "low", "mu"),
    ("sigma", INF, "sigma"), ("sigma", 1e308, "sigma"), ("shift", INF, "shift"), ("shift", True, "shift"),
    ("offset_noise", True, "offset noise"),
    ("train_guidance", NAN, "training guidance"), ("train_guidance", 1e308, "training guidance"),
    ("train_guidance", True, "training guidance"),
    ("preview_prompt", 5, "preview prompt"), ("default_content", ["a cat"], "default content"),
    ("default_content", "", "default content"), ("gradient_checkpointing", "yes", "gradient checkpointing"),
    ("micro_batch", True, "micro-batch"), ("micro_batch", 0, "micro-batch"), ("micro_batch", 2.5, "micro-batch"),
    ("micro_batch", 10**6, "micro-batch"), ("compile_blocks", "yes", "compile blocks"),
    ("compile_blocks", 1, "compile blocks"), ("tier", "fp16", "memory tier"),
    ("preset", ["quick"], "unknown preset"),
]

# (GenerateOptions field(s), words the message must contain)
BAD_OPTIONS = [
    ({"guidance": NAN}, "guidance"), ({"guidance": 1e308}, "guidance"), ({"guidance": INF}, "guidance"),
    ({"guidance": True}, "guidance"),
    ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"), ({"seed": 1.5}, "seed"),
    ({"steps": True}, "steps"), ({"steps": 4.5}, "steps"),
    ({"num_images": True}, "num_images"), ({"num_images": 2.5}, "num_images"),
    ({"lora_scale": True}, "lora_scale"), ({"lora_scale": NAN}, "lora_scale"),
    ({"resolution": 100000}, "resolution"), ({"resolution": "abc"}, "resolution"), ({"resolution": True}, "resolution"),
    ({"width": 33}, "multiple of 16 from 32 to 2048"), ({"height": 1000}, "multiple of 16 from 32 to 2048"),
    ({"height": 2050}, "multiple of 16 from 32 to 2048"), ({"width": "512"}, "multiple of 16 from 32 to 2048"),
    ({"aspect": ["1:1"]}, "aspect"), ({"wrap_style": "no"}, "wrap_style"),
    ({"prompt": 5}, "prompt must be a text"),
    ({"width": 2048, "height": 2048, "num_images": 8}, "too much for one request"),
]


@pytest.fixture
def jobs(request, tmp_path):
    j = Jobs(settings=make_settings(request, "sqlite", tmp_path / "data"))
    yield j
    j.queue.close()


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "upload" / "ref.png")


def nothing_queued(jobs: Jobs) -> bool:
    folders = [p for p in jobs.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folders == [] and jobs.queue.pending() == []


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text and "Traceback" not in text
    return text


# -- the recipe -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "words"), BAD_RECIPES,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_RECIPES])
def test_bad_recipe_values_are_refused_with_the_setting_named(field, value, words):
    with pytest.raises(InputError) as info:
        parse_recipe({field: value})
    assert words in one_line(info)


@pytest.mark.parametrize("recipe", ["quick", ["steps", 100], [["steps", 5]], 300, ("preset", "quick")],
                         ids=["string", "list", "pairs", "number", "tuple"])
def test_recipe_options_that_are_not_an_object_are_refused_not_ignored(recipe):
    with pytest.raises(InputError, match="must be a JSON object") as info:
        parse_recipe(recipe)
    one_line(info)


def test_valid_defaults_presets_and_integral_floats_pass():
    assert Recipe().validate() == Recipe()
    for preset in PRESETS:
        assert parse_recipe({"preset": preset}) == Recipe.from_preset(preset)
    recipe = parse_recipe({"preset": "quick", "steps": 300.0, "rank": 16.0, "seed": 2**32 - 1, "mu": -6,
                           "sigma": 3, "lr": 1e-4, "resolution": 2048, "preview_prompt": "  "})
    assert (recipe.steps, recipe.rank, recipe.resolution) == (300, 16, 2048)
    assert type(recipe.steps) is int and type(recipe.rank) is int and recipe.preview_prompt is None
    assert isinstance(recipe.mu, float) and recipe.seed == 2**32 - 1


# -- generation options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "words"), BAD_OPTIONS, ids=[json.dumps(b) for b, _ in BAD_OPTIONS])
def test_bad_generation_options_are_refused_with_the_option_named(bad, words):
    with pytest.raises(InputError) as info:
        parse_generate_options({"prompt": "a cat", **bad})
    assert words in one_line(info)


@pytest.mark.parametrize("options", [["prompt", "a cat"], "a cat", [["prompt", "a cat"]], 7])
def test_generation_options_that_are_not_an_object_are_refused(options):
    with pytest.raises(InputError, match="must be a JSON object") as info:
        parse_generate_options(options)
    one_line(info)


def test_valid_generation_options_pass_and_are_normalised():
    assert GenerateOptions(prompt="a cat").validate().seed == 0
    opts = parse_generate_options({"prompt": "a cat", "steps": 4.0, "seed": 2**32 - 1, "width": 512, "height": 768,
                                   "num_images": 8, "guidance": 3, "lora_scale": -4})
    assert (opts.steps, opts.width, opts.height, opts.num_images) == (4, 512, 768, 8)
    assert type(opts.steps) is int and opts.guidance == 3.0 and opts.lora_scale == -4.0


# -- Jobs.submit_*: refused before anything is written or queued ---------------------------------------------


@pytest.mark.parametrize("recipe", [{"rank": True}, {"rank": 1.5}, {"mu": NAN}, {"sigma": INF}, {"seed": 2**70},
                                    {"alpha": INF}, {"train_guidance": 1e308}, {"steps": True},
                                    [["steps", 300]], {"preview_prompt": ["x"]}])
def test_submit_train_refuses_bad_recipes_before_queueing(jobs, image, recipe):
    with pytest.raises(InputError) as info:
        jobs.submit_train([image], "watercolor", "x", recipe=recipe, backbone="tiny")
    one_line(info)
    assert nothing_queued(jobs)


@pytest.mark.parametrize("options", [{"resolution": 100000}, {"resolution": "abc"}, {"width": 33},
                                     {"guidance": NAN}, {"guidance": 1e308}, {"seed": 2**70}, {"num_images": True},
                                     {"resolution": 2048, "num_images": 8},
                                     {"width": 2048, "resolution": 2048, "num_images": 8}, [["prompt", "a cat"]]])
def test_submit_generate_refuses_bad_options_before_queueing(jobs, options):
    request = {"prompt": "a cat", **options} if isinstance(options, dict) else options
    with pytest.raises(InputError) as info:
        jobs.submit_generate(None, request, backbone="tiny")
    one_line(info)
    assert nothing_queued(jobs)


def test_submit_still_queues_good_requests(jobs, image):
    assert jobs.submit_generate(None, {"prompt": "a cat", "steps": 2, "resolution": 2048, "num_images": 4},
                                backbone="tiny")
    assert jobs.submit_train([image], "watercolor", "x", recipe={"preset": "quick", "steps": 2.0}, backbone="tiny")
    assert len(jobs.queue.pending()) == 2


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"style_prompt": 5}, "style prompt must be a text"), ({"name": ["a"]}, "template name must be a text"),
    ({"backbone": 3}, "backbone must be a text"), ({"captions": "a lighthouse"}, "captions must be a list"),
    ({"captions": [5]}, "captions must be a list"),
])
def test_submit_train_refuses_wrong_types_of_the_other_fields(jobs, image, kwargs, words):
    request = {"images": [image], "style_prompt": "watercolor", "name": "x", "backbone": "tiny", **kwargs}
    with pytest.raises(InputError, match=words):
        jobs.submit_train(**request)
    assert nothing_queued(jobs)


# -- a template's stored recipe (template.json) ---------------------------------------------------------------


def test_a_stored_resolution_out_of_range_is_refused_before_generating():
    from studio.engine.generation import output_size
    from studio.engine.recipe import check_recipe_dict

    with pytest.raises(InputError, match=r"template.json's recipe: resolution must be a whole number from 32"):
        check_recipe_dict({"resolution": 100000, "steps": 300}, "template.json's recipe")
    with pytest.raises(InputError, match="LoRA rank"):
        check_recipe_dict({"rank": 1.5})
    with pytest.raises(InputError, match="must be a JSON object"):
        check_recipe_dict(["resolution", 512])
    assert check_recipe_dict({"resolution": 512.0, "future_field": 1}) == {"resolution": 512, "future_field": 1}

    options = GenerateOptions(prompt="a cat").validate()
    for stored in (100000, "abc", True):
        meta = {"name": "Huge", "recipe": {"resolution": stored}}
        with pytest.raises(InputError, match=r"template 'Huge' has an unusable stored training resolution"):
            output_size(options, 512, meta)
    meta = {"name": "Huge", "recipe": {"resolution": 100000}}
    assert output_size(GenerateOptions(prompt="a cat", resolution=256).validate(), 512, meta) == (256, 256)
    assert output_size(GenerateOptions(prompt="a cat", width=64, height=128).validate(), 512, meta) == (64, 128)
    assert output_size(options, 512, {"recipe": {"resolution": 1024}}) == (1024, 1024)
    with pytest.raises(InputError, match="too much for one request"):
        output_size(GenerateOptions(prompt="a cat", num_images=8).validate(), 512, {"recipe": {"resolution": 2048}})


def test_generate_refuses_a_bad_stored_resolution_before_loading_the_lora(tiny_backbone, tmp_path):
    from studio.engine.generation import generate

    folder = tmp_path / "imported"
    folder.mkdir()
    meta = {"name": "Imported", "family": "flux", "recipe": {"resolution": 100000}}
    with pytest.raises(InputError, match="unusable stored training resolution 100000"):
        generate(tiny_backbone, GenerateOptions(prompt="a cat", steps=1), tmp_path / "out", (folder, meta))
    assert not (tmp_path / "out").exists()


# -- the API: comics, memes and options refused before any generation is queued -------------------------------


def no_progress(message: str) -> None:
    raise AssertionError(f"a generation was queued and waited for: {message}")


@pytest.mark.parametrize(("mode", "options", "words"), [
    ("meme", {"top": "x" * 400}, "top caption is too long"),
    ("meme", {"bottom": "y" * 301}, "bottom caption is too long"),
    ("meme", {"top": 123}, "top caption must be a text"),
    ("meme", {"top": "ok", "meme_style": ["classic"]}, "meme_style must be a text"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "gutter": 10**9}, "gutter"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "gutter": True}, "gutter"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "border": -1}, "border"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "border": 2.5}, "border"),
    ("multi-panel", {"panels": ["a cat | " + "z" * 400, "a dog"]}, "panel caption is too long"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "captions": ["one"]}, "one caption per panel"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "captions": "both"}, "captions must be a list"),
    ("multi-panel", {"panels": [1, 2]}, "panel 1 must be a text"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "layout": 4}, "layout must be a text"),
    ("multi-panel", {"single_shot": "no", "panels": ["a cat", "a dog"]}, "single_shot must be true or false"),
    ("multi-panel", {"panels": ["a cat", "a dog"], "steps": True}, "steps"),
    ("text-to-image", {"resolution": 100000}, "resolution"),
])
def test_api_refuses_comic_and_meme_parameters_before_generating(jobs, mode, options, words):
    api = StudioAPI(jobs, backbone="tiny")
    with pytest.raises(InputError) as info:
        api.generate(None, "a cat", mode, options, progress=no_progress)
    assert words in one_line(info)
    assert nothing_queued(jobs)


@pytest.mark.parametrize("options", ["quick", ["preset", "quick"]])
def test_api_train_refuses_options_that_are_not_an_object(jobs, image, options):
    with pytest.raises(InputError, match="options must be a JSON object") as info:
        StudioAPI(jobs, backbone="tiny").train([str(image)], "watercolor", "x", options)
    one_line(info)
    assert nothing_queued(jobs)


# -- the CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "words"), [
    (["generate", "--prompt", "a cat", "--guidance", "nan"], "guidance"),
    (["generate", "--prompt", "a cat", "--width", "33"], "width must be a multiple of 16 from 32 to 2048"),
    (["generate", "--prompt", "a cat", "--seed", str(2**40)], "seed"),
    (["generate", "--prompt", "a cat", "--scale", "inf"], "lora_scale"),
    (["generate", "--prompt", "a cat", "--out", "/proc/studio-test/out"], "cannot use '/proc/studio-test/out'"),
    (["templates", "export", "any", "--out", "/proc/studio-test"], "cannot use '/proc/studio-test'"),
    (["train", "--images", "x.png", "--style", "ink", "--steps", "1", "--preview-every", "0", "--mu", "nan"], "mu"),
    (["train", "--images", "x.png", "--style", "ink", "--steps", "1", "--preview-every", "0", "--sigma", "inf"],
     "sigma"),
])
def test_cli_bad_values_are_one_line_errors(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "x.png")
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    code = main(["--store", str(tmp_path / "store"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def _limit_memory() -> None:  # an old build that tried 100000 px would fail here instead of filling the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))


def test_cli_process_refuses_a_huge_resolution_before_loading_a_model(tmp_path):
    """``--resolution 100000`` used to start a generation that filled the machine's memory."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STUDIO_STORE": str(tmp_path / "store"),
           "STUDIO_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "studio", "generate", "--prompt", "a cat", "--resolution", "100000",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: resolution must be a whole number from 32 to 2048 (got 100000)"), err
    assert not (tmp_path / "out").exists()
