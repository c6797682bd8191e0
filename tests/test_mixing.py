"""Template mixing: several template LoRAs at their own weights on the warm tiny backbone."""

import json

import numpy as np
import pytest
from PIL import Image

from studio.cli import main, publish
from studio.engine.generation import GenerateOptions, activate_templates, generate
from studio.engine.mixing import parse_mix_arg, resolve_mix, validate_mix
from studio.engine.recipe import Recipe
from studio.engine.training import TrainRequest, prepare_run, train
from studio.errors import InputError
from studio.store.templates import TemplateStore

STYLE = "flat poster"  # both templates share it, so "A alone" and "B alone" get the same final prompt


def trained(backbone, root, name, color):
    run_dir = root / name
    prepare_run(TrainRequest([Image.new("RGB", (64, 64), color)], STYLE, name,
                             Recipe(steps=30, lr=5e-3, preview_every=0)), run_dir, "tiny", "flux", 64)
    result = train(backbone, run_dir)
    return result, json.loads((result / "template.json").read_text())


@pytest.fixture(scope="module")
def pair(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return trained(tiny_backbone, root, "red", (220, 40, 30)), trained(tiny_backbone, root, "blue", (30, 90, 230))


def image(backbone, out, template, scale=1.0, mix=None, seed=4):
    options = GenerateOptions(prompt="a house", steps=6, seed=seed, lora_scale=scale,
                              mix=[{"template": str(f), "scale": s} for f, _, s in mix or []])
    path = generate(backbone, options, out, template, mix=mix)[0]
    return np.asarray(Image.open(path), dtype=np.float32), path


def test_mix_weights_interpolate_between_the_templates(tiny_backbone, pair, tmp_path):
    (a, meta_a), (b, meta_b) = pair
    alone_a, _ = image(tiny_backbone, tmp_path / "a", (a, meta_a))
    alone_b, _ = image(tiny_backbone, tmp_path / "b", (b, meta_b))
    only_a, _ = image(tiny_backbone, tmp_path / "10", (a, meta_a), 1.0, [(b, meta_b, 0.0)])
    only_b, _ = image(tiny_backbone, tmp_path / "01", (a, meta_a), 0.0, [(b, meta_b, 1.0)])
    half, path = image(tiny_backbone, tmp_path / "55", (a, meta_a), 0.5, [(b, meta_b, 0.5)])

    def dist(x, y):
        return float(np.abs(x - y).mean())

    assert dist(alone_a, alone_b) > 2.0  # two clearly different styles
    assert np.abs(only_a - alone_a).max() <= 1.0
    assert np.abs(only_b - alone_b).max() <= 1.0
    assert dist(half, alone_a) < dist(alone_b, alone_a) and dist(half, alone_b) < dist(alone_a, alone_b)
    assert min(dist(half, alone_a), dist(half, alone_b)) > 0.5  # really a mix, not one of the two
    params = json.loads(Image.open(path).text["studio"])
    assert params["mix"] == [{"template": meta_b.get("id") or "blue", "scale": 0.5}] and params["lora_scale"] == 0.5
    # both adapters are loaded and active at their weights
    active = set(tiny_backbone.transformer.active_adapters())
    assert len(active) == 2


def test_a_template_after_a_bare_generation_during_training_is_not_bare(tiny_backbone, pair, tmp_path):
    """activate_templates re-enables LoRA layers that a no-template generation switched off."""
    (a, meta_a), _ = pair
    styled, _ = image(tiny_backbone, tmp_path / "styled", (a, meta_a))
    activate_templates(tiny_backbone, [(a, 1.0)])
    tiny_backbone.pipe.disable_lora()  # what activate_templates([]) does while a training adapter exists
    again, _ = image(tiny_backbone, tmp_path / "again", (a, meta_a))
    assert np.array_equal(styled, again)


def test_mix_entries_are_validated(tiny_backbone, pair, tmp_path):
    (a, meta_a), (b, meta_b) = pair
    assert validate_mix(None) == []
    assert validate_mix([{"template": " x ", "scale": 1}]) == [{"template": "x", "scale": 1.0}]
    for bad in ("x", [{"scale": 1}], [{"template": "x", "scale": "big"}], [{"template": "x", "scale": 9}],
                [{"template": "x"}, {"template": "x"}], [{"template": str(i)} for i in range(5)]):
        with pytest.raises(InputError):
            validate_mix(bad)
    assert parse_mix_arg("ink-wash:0.5") == {"template": "ink-wash", "scale": 0.5}
    assert parse_mix_arg("ink") == {"template": "ink", "scale": 1.0}
    with pytest.raises(InputError, match="TEMPLATE:SCALE"):
        parse_mix_arg("ink:lots")
    with pytest.raises(InputError, match="template store"):
        resolve_mix(None, [{"template": "some-id"}])
    assert resolve_mix(None, [{"template": str(b), "scale": 0.3}]) == [(b, meta_b, 0.3)]
    with pytest.raises(InputError, match="main template"):
        generate(tiny_backbone, GenerateOptions(prompt="x", mix=[{"template": str(b)}]), tmp_path)
    with pytest.raises(InputError, match="itself"):
        generate(tiny_backbone, GenerateOptions(prompt="x", mix=[{"template": str(a)}]), tmp_path, (a, meta_a))
    with pytest.raises(InputError, match="sd3"):
        generate(tiny_backbone, GenerateOptions(prompt="x"), tmp_path, (a, meta_a),
                 mix=[(b, {**meta_b, "family": "sd3"}, 1.0)])


def test_cli_mix(pair, tmp_path, capsys):
    (a, _), (b, _) = pair
    store = TemplateStore(tmp_path / "store")
    ia, ib = publish(store, a, "red"), publish(store, b, "blue")
    out = tmp_path / "out"
    code = main(["--store", str(store.root), "generate", "--template", ia.id, "--mix", f"{ib.id}:0.6",
                 "--prompt", "a cow", "--steps", "4", "--out", str(out)])
    first = capsys.readouterr()
    assert code == 0, first.err
    params = json.loads(Image.open(sorted(out.glob("*.png"))[0]).text["studio"])
    assert params["mix"] == [{"template": ib.id, "scale": 0.6}]
    assert main(["--store", str(store.root), "generate", "--template", ia.id, "--mix", "nope:0.5",
                 "--prompt", "a cow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
