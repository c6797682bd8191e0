"""The evaluation harness on the tiny backbone: the CI smoke run, resuming, styles folders, configurations."""

import csv
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from studio.errors import InputError
from studio.styles import eval_report, evaluate
from studio.styles.eval_config import PAPER_PROMPTS, EvalSettings, parse_config, resolve_configs
from studio.styles.eval_report import write_reports
from studio.styles.evaluate import Evaluation, run_evaluation, settings_from_args
from studio.styles.metrics import StyleScorer
from studio.styles.style_sets import load_styles

pytestmark = pytest.mark.slow  # starts the app or a worker process

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["flat_cartoon/sd3", "flat_cartoon/style_friendly", "watercolor/sd3", "watercolor/style_friendly"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, metric_models):
    """The CI smoke run, as a user types it: two styles x (sd3, style_friendly), 2 prompts x 1 seed.

    Through the command's main(argv) in this process (`python -m studio.evaluate` is `sys.exit(main())`,
    started for real by tests/test_architecture.py): a second interpreter would only add ~10 CPU-seconds of
    imports. capsys is per test, so the output is caught here.
    """
    import torch

    out = tmp_path_factory.mktemp("eval") / "out"
    args = ["--backbone", "tiny", "--styles", str(ROOT / "assets" / "eval" / "styles"), "--out", str(out),
            "--configs", "sd3,style_friendly", "--prompts", "2", "--seeds", "1", "--steps", "20",
            "--gen-steps", "4", "--dino-model", str(metric_models[0]), "--clip-model", str(metric_models[1])]
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # the tiny backbone it loads sets one thread; later modules get theirs back
    try:
        with (pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]),
              redirect_stdout(stdout), redirect_stderr(stderr)):
            mp.chdir(ROOT)
            code = evaluate.main(args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr.getvalue()[-3000:]
    assert stdout.getvalue().strip() == str(out / "table.md")
    return out, args


def unit_result(out: Path, unit: str) -> dict:
    return json.loads((out / "units" / unit / "result.json").read_text())


def test_smoke_run_writes_table_results_and_grids(smoke):
    out, _ = smoke
    table = (out / "table.md").read_text()
    assert "| sd3 | SD3 sampler, shift 3 |" in table and "| style_friendly | style-friendly, mu -6, sigma 3 |" in table
    assert "CLIP-T (content)" in table and "*content* prompt" in table and "Scores are missing" not in table
    assert "paper" not in table.split("## DINO per style")[0].split("## Mean")[1]  # Table 2 rows only for flux-dev

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(f"{r['style']}/{r['config']}" for r in rows) == UNITS
    for row in rows:
        for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
            assert -1 <= float(row[key]) <= 1
        assert row["n_images"] == "2" and not row["scores_missing"]

    results = json.loads((out / "results.json").read_text())
    assert results["prompts"] == list(PAPER_PROMPTS[:2]) and results["seeds"] == [0]
    assert results["complete_styles"] == ["flat_cartoon", "watercolor"]
    for unit in results["units"]:
        assert [(i["prompt_index"], i["seed"]) for i in unit["per_image"]] == [(0, 0), (1, 0)]
        assert all(-1 <= i[k] <= 1 for i in unit["per_image"] for k in ("dino", "clip_i", "clip_t"))
    for cfg, mean in results["mean_over_complete_styles"].items():
        per_style = [u["dino"] for u in results["units"] if u["config"] == cfg]
        assert mean["dino"] == pytest.approx(sum(per_style) / len(per_style))
        assert f"{mean['dino']:.3f}" in table

    for style in ("flat_cartoon", "watercolor"):
        grid = Image.open(out / "grids" / f"{style}.png")
        assert grid.size == (150 + 3 * 192, 30 + 3 * 192)  # label + reference + 2 images; base model + a row per config
        files = sorted(p.name for p in (out / "units" / style / "sd3" / "images").iterdir())
        assert files == ["p00_0.png", "p01_0.png"]
        meta = json.loads(Image.open(out / "units" / style / "sd3" / "images" / "p00_0.png").text["studio"])
        assert meta["final_prompt"].startswith(f"{PAPER_PROMPTS[0]} in ") and meta["steps"] == 4
    # checkpoints of finished units are dropped, the template stays
    run = out / "units" / "watercolor" / "sd3" / "run"
    assert (run / "result" / "lora.safetensors").is_file() and not (run / "checkpoint").exists()


def test_rerun_redoes_only_what_is_missing(smoke, tiny_backbone):
    out, args = smoke
    settings = settings_from_args(args)
    before = {u: unit_result(out, u) for u in UNITS}

    # a unit trained before Recipe grew a field (here: default_content) still counts as up to date
    spec_path = out / "units" / "watercolor" / "style_friendly" / "spec.json"
    spec = json.loads(spec_path.read_text())
    del spec["train"]["recipe"]["default_content"]
    spec_path.write_text(json.dumps(spec))

    summary = run_evaluation(settings, backbone=tiny_backbone)
    assert summary == {"trained": [], "generated": [], "scored": [], "skipped": UNITS}
    assert {u: unit_result(out, u) for u in UNITS} == before

    # a unit deleted from scratch is retrained (same seeds: same images, same scores); one whose
    # result.json is gone is only rescored
    shutil.rmtree(out / "units" / "watercolor" / "sd3")
    (out / "units" / "flat_cartoon" / "style_friendly" / "result.json").unlink()
    summary = run_evaluation(settings, backbone=tiny_backbone)
    assert summary["trained"] == ["watercolor/sd3"] and summary["generated"] == ["watercolor/sd3"]
    assert sorted(summary["scored"]) == ["flat_cartoon/style_friendly", "watercolor/sd3"]
    assert summary["skipped"] == ["flat_cartoon/sd3", "watercolor/style_friendly"]
    for unit in ("watercolor/sd3", "flat_cartoon/style_friendly"):
        for key in ("dino", "clip_i", "clip_t"):
            assert unit_result(out, unit)[key] == pytest.approx(before[unit][key], abs=1e-3)
    log = (out / "eval.log").read_text()
    assert log.count("watercolor/sd3: trained") == 2 and log.count("flat_cartoon/sd3: trained") == 1


@pytest.fixture
def one_style(tmp_path):
    styles = tmp_path / "styles"
    styles.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(styles / "red.png")
    (styles / "red.txt").write_text("red poster\n")
    return styles


def test_crash_mid_unit_resumes_training_from_its_checkpoint(one_style, tmp_path, tiny_backbone, monkeypatch):
    settings = EvalSettings(one_style, tmp_path / "out", configs=resolve_configs("ck", ["ck:checkpoint_every=5"]),
                            prompts=1, seeds=1, steps=12, gen_steps=2, score=False)
    seen: list[int] = []
    original = evaluate._BarObserver.on_step

    def crash_at_8(self, report):
        seen.append(report.step)
        if report.step == 8:
            raise RuntimeError("power cut")
        original(self, report)

    monkeypatch.setattr(evaluate._BarObserver, "on_step", crash_at_8)
    with pytest.raises(RuntimeError, match="power cut"):
        run_evaluation(settings, backbone=tiny_backbone)
    unit = tmp_path / "out" / "units" / "red" / "ck"
    assert (unit / "run" / "checkpoint").is_dir() and not (unit / "result.json").exists()

    seen.clear()
    monkeypatch.setattr(evaluate._BarObserver, "on_step", lambda self, r: seen.append(r.step))
    summary = run_evaluation(settings, backbone=tiny_backbone)
    assert seen == list(range(6, 13))  # resumed after the step-5 checkpoint
    assert summary["trained"] == ["red/ck"]
    steps = [json.loads(line)["step"] for line in (unit / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    result = json.loads((unit / "result.json").read_text())
    assert result["dino"] is None and "turned off" in result["scores_missing"]


def test_missing_metric_models_then_scored_without_retraining(one_style, tmp_path, tiny_backbone, metric_models):
    base = dict(styles_dir=one_style, out_dir=tmp_path / "out", configs=resolve_configs("sd3"), prompts=1,
                seeds=1, steps=3, gen_steps=2)
    summary = run_evaluation(EvalSettings(**base, dino_model=str(tmp_path / "no-dino"),
                                          clip_model=str(metric_models[1])), backbone=tiny_backbone)
    assert summary["trained"] == ["red/sd3"] and summary["scored"] == []
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Scores are missing" in table and "no-dino does not exist" in table and "| sd3 |" in table
    assert (tmp_path / "out" / "grids" / "red.png").is_file()

    summary = run_evaluation(EvalSettings(**base, dino_model=str(metric_models[0]),
                                          clip_model=str(metric_models[1])), backbone=tiny_backbone)
    assert summary["trained"] == [] and summary["generated"] == [] and summary["scored"] == ["red/sd3"]
    assert "Scores are missing" not in (tmp_path / "out" / "table.md").read_text()

    # more seeds: only the new images are generated, nothing is retrained
    summary = run_evaluation(EvalSettings(**{**base, "seeds": 2}, dino_model=str(metric_models[0]),
                                          clip_model=str(metric_models[1])), backbone=tiny_backbone)
    assert summary["trained"] == [] and summary["generated"] == ["red/sd3"]
    unit = tmp_path / "out" / "units" / "red" / "sd3"
    assert len(list((unit / "images").glob("*.png"))) == 2

    # the LoRA deleted to save disk: rescoring finished images does not need it
    shutil.rmtree(unit / "run" / "result")
    (unit / "result.json").unlink()
    summary = run_evaluation(EvalSettings(**{**base, "seeds": 2}, dino_model=str(metric_models[0]),
                                          clip_model=str(metric_models[1])), backbone=tiny_backbone)
    assert summary["trained"] == [] and summary["scored"] == ["red/sd3"]


def test_styles_folder_formats(tmp_path):
    styles = tmp_path / "styles"
    (styles / "ink").mkdir(parents=True)
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (32, 32)).save(styles / "ink" / name)
    (styles / "ink" / "style.txt").write_text("\nink wash painting\n")
    (styles / "ink" / "caption.txt").write_text("a mountain\na river\n")
    Image.new("RGB", (32, 32)).save(styles / "Neon Sign!.png")
    (styles / "Neon Sign!.txt").write_text("neon sign")
    (styles / "notes.md").write_text("ignored")
    (styles / ".hidden").mkdir()
    got = load_styles(styles)
    assert [(s.name, s.style_prompt, [p.name for p in s.images], s.captions) for s in got] == [
        ("neon-sign", "neon sign", ["Neon Sign!.png"], None),
        ("ink", "ink wash painting", ["a.jpg", "b.png"], ["a mountain", "a river"]),
    ]
    (styles / "ink" / "caption.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(InputError, match="one caption line for all images or one per image"):
        load_styles(styles)
    (styles / "ink" / "caption.txt").unlink()
    (styles / "ink" / "style.txt").unlink()
    with pytest.raises(InputError, match=r"style 'ink' has no style prompt: write it into ink/style.txt"):
        load_styles(styles)

    (styles / "styles.json").write_text(json.dumps({"styles": [
        {"name": "house", "style_prompt": "watercolor painting", "images": ["ink/a.jpg"], "captions": ["A house"]},
    ]}))
    [style] = load_styles(styles)  # the manifest wins
    assert (style.name, style.images, style.captions) == ("house", [styles / "ink" / "a.jpg"], ["A house"])
    (styles / "styles.json").write_text(json.dumps([{"style_prompt": "x"}]))
    with pytest.raises(InputError, match="non-empty list"):
        load_styles(styles)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no styles found"):
        load_styles(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        load_styles(tmp_path / "nope")


def test_configurations():
    assert [c.name for c in resolve_configs(None)] == ["sd3", "style_friendly"]
    custom = resolve_configs("sd3,sigma2", ["lowlr:lr=5e-5,sigma=2,gradient_checkpointing=false,mu=none"])
    assert [(c.name, c.overrides) for c in custom] == [
        ("sd3", {"sampler": "sd3"}), ("sigma2", {"sampler": "style_friendly", "sigma": 2.0}),
        ("lowlr", {"lr": 5e-5, "sigma": 2.0, "gradient_checkpointing": False, "mu": None}),
    ]
    settings = EvalSettings(Path("."), Path("."), configs=custom, steps=7, resolution=128)
    recipe = settings.recipe(custom[2])
    assert (recipe.steps, recipe.resolution, recipe.lr, recipe.preview_every) == (7, 128, 5e-5, 0)
    assert eval_report.describe_config(parse_config("offset0.01"), "flux") == \
        "style-friendly, mu -6, sigma 3, offset noise 0.01"
    assert eval_report.describe_config(custom[2], "sd3") == \
        "style-friendly, mu -6, sigma 2, lr 5e-05, gradient_checkpointing False"
    for bad, message in [("nope", "unknown configuration"), ("x:rank=abc", "expected int"),
                         ("x:colour=red", "unknown recipe field"), ("x:sampler=ddpm", "sampler must be one of"),
                         ("a b:lr=1e-4", "configuration name"), ("x:lr", "expected key=value")]:
        with pytest.raises(InputError, match=message):
            parse_config(bad)
    with pytest.raises(InputError, match="--prompts"):
        EvalSettings(Path("."), Path("."), prompts=24).validate()


def test_paper_prompts_and_flux_reference_rows(tmp_path):
    assert len(PAPER_PROMPTS) == 23 and PAPER_PROMPTS[0] == "An Opera house in Sydney"
    assert PAPER_PROMPTS[-1] == "A wood cabin" and "The letter 'G'" in PAPER_PROMPTS
    # no results yet, a FLUX.1-dev run: the table already shows the paper's numbers to compare against
    settings = EvalSettings(ROOT / "assets" / "eval" / "styles", tmp_path, configs=resolve_configs("sd3,sigma2"))
    ev = Evaluation(settings, backbone=SimpleNamespace(backbone_id="flux-dev", family="flux"),
                    scorer=StyleScorer(tmp_path / "x", tmp_path / "y"))
    write_reports(ev)
    table = (tmp_path / "table.md").read_text()
    assert "| *paper, FLUX.1-dev* | *Table 2: SD3 sampler* | *0.373* | *0.645* | *0.350* |" in table
    assert "*0.461* | *0.686* | *0.344*" in table and "*0.478* | *0.691* | *0.343*" in table
    assert "Progress: 0 of 4 units finished" in table
