"""The evaluation with training seeds and the weight-free metrics (issue 16), on the tiny backbone."""

import json

import pytest
from PIL import Image

from studio.errors import InputError
from studio.styles.eval_config import EvalSettings, resolve_configs
from studio.styles.eval_stats import Aggregate, mean_se
from studio.styles.evaluate import main, run_evaluation
from studio.styles.synthetic_styles import write_style_set
from studio.styles.weightfree import METRIC_VERSION


@pytest.fixture
def two_styles(tmp_path):
    """Two synthetic styles (the set's generator, then trimmed to keep the run short)."""
    folder = tmp_path / "styles"
    for path in write_style_set(folder):
        if path.name not in ("pop-dots", "mosaic"):
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
    return folder


def test_training_seeds_weightfree_scores_base_images_and_resume(two_styles, tmp_path, tiny_backbone):
    settings = EvalSettings(two_styles, tmp_path / "out", configs=resolve_configs("sd3,sigma2"), prompts=1,
                            seeds=2, train_seeds=2, steps=3, gen_steps=2, score=False)
    summary = run_evaluation(settings, backbone=tiny_backbone)
    out = tmp_path / "out"
    assert sorted(summary["trained"]) == sorted(f"{s}/{c}" for s in ("mosaic", "pop-dots")
                                                for c in ("sd3", "sd3@train1", "sigma2", "sigma2@train1"))
    for unit, seed in (("sd3", 0), ("sd3@train1", 1)):
        request = json.loads((out / "units" / "mosaic" / unit / "run" / "request.json").read_text())
        assert request["recipe"]["seed"] == seed
        result = json.loads((out / "units" / "mosaic" / unit / "result.json").read_text())
        assert result["train_seed"] == seed and result["weightfree_version"] == METRIC_VERSION
        assert result["dino"] is None and result["colour"] > 0 and 0 < result["texture"] <= 1
        assert 0 <= result["content"] <= 2 and len(result["per_image"]) == 2
        assert all({"colour", "texture", "content"} <= set(item) for item in result["per_image"])
    base = out / "base" / "mosaic"
    assert sorted(p.name for p in (base / "images").iterdir()) == ["p00_0.png", "p00_1.png"]
    meta = json.loads(Image.open(base / "images" / "p00_0.png").text["studio"])
    assert meta["final_prompt"] == "An Opera house in Sydney in colorful mosaic style" and not meta.get("template")
    assert json.loads((base / "result.json").read_text())["content"] == 0.0

    table = (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["train_seeds"] == 2 and results["complete_styles"] == ["mosaic", "pop-dots"]
    colours = [u["colour"] for u in results["units"] if u["config"] == "sd3"]
    per_seed = [sum(u["colour"] for u in results["units"] if u["config"] == "sd3" and u["train_seed"] == k) / 2
                for k in (0, 1)]
    mean, se = mean_se(per_seed)
    assert results["mean_over_complete_styles"]["sd3"]["colour"] == pytest.approx(sum(colours) / 4)
    assert results["se_over_train_seeds"]["sd3"]["colour"] == pytest.approx(se)
    assert f"| sd3 | SD3 sampler, shift 3 | – | – | – | {mean:.2f} ± {se:.2f} |" in table
    assert "| *base model* |" in table and "## Paired difference to sd3" in table and "## DINO per style" not in table
    assert "**Scores are missing** (DINO / CLIP)" in table
    assert (out / "grids" / "overview.png").is_file()
    grid = Image.open(out / "grids" / "mosaic.png")
    assert grid.size == (150 + 3 * 192, 30 + 5 * 192)  # base row + 2 configs x 2 training seeds

    # resume: a unit cut off while generating makes only its missing image, an old-version score is
    # recomputed, nothing is retrained, the rest is skipped
    (out / "units" / "pop-dots" / "sigma2@train1" / "images" / "p00_1.png").unlink()
    (out / "units" / "pop-dots" / "sigma2@train1" / "result.json").unlink()
    stale = out / "units" / "mosaic" / "sd3" / "result.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "weightfree_version": 0}))
    summary = run_evaluation(settings, backbone=tiny_backbone)
    assert summary["trained"] == [] and summary["generated"] == ["pop-dots/sigma2@train1"]
    assert "mosaic/sd3" not in summary["skipped"] and len(summary["skipped"]) == 6
    assert json.loads(stale.read_text())["weightfree_version"] == METRIC_VERSION


def test_report_only_and_train_seed_checks(two_styles, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--styles", str(two_styles), "--out", str(out), "--configs", "sd3,uniform", "--train-seeds", "3",
                 "--report-only"]) == 0
    table = (out / "table.md").read_text()
    assert "Progress: 0 of 12 units finished" in table and not (out / "units").exists()
    for bad in (0, 21, True, 1.5):
        with pytest.raises(InputError, match="--train-seeds"):
            EvalSettings(two_styles, out, train_seeds=bad).validate()


def test_aggregate_pairs_by_style():
    rows = [{"style": s, "config": c, "train_seed": k, "colour": base + delta + 0.1 * k}
            for s, base in (("a", 10.0), ("b", 20.0), ("c", 30.0))
            for c, delta in (("sd3", 0.0), ("sf", -1.0 if s != "c" else 0.5)) for k in (0, 1)]
    agg = Aggregate(rows, ["a", "b", "c", "d"], ["sd3", "sf"], 2)
    assert agg.complete == ["a", "b", "c"]
    assert agg.style_value("a", "sd3", "colour") == pytest.approx((10.05, 0.05))
    mean, se = agg.config_value("sd3", "colour")
    assert mean == pytest.approx(20.05) and se == pytest.approx(0.05)
    paired = agg.paired("sf", "sd3", "colour")
    assert paired["mean"] == pytest.approx(-0.5) and (paired["better"], paired["worse"], paired["n"]) == (2, 1, 3)
    assert mean_se([]) == (None, None) and mean_se([1.0, None]) == (1.0, None)
