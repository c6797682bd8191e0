"""Refine (StyleDrop's round 2 with feedback) on the tiny backbone, through the app's API and the CLI.

The ablations: round 2's training set is the parent's references plus exactly the chosen synthetic
images (pixel for pixel, captioned with their content prompts); the new template records its
parent, its round and those images; automatic feedback keeps the argmax of style x text as the
metric models score the candidates (recomputed here independently); without the metric models
automatic feedback says so before anything is queued.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from app_helpers import wait_done
from gradio_client import Client, handle_file
from PIL import Image

from studio.cli import main
from studio.styles import refine
from studio.styles.eval_config import PAPER_PROMPTS
from studio.styles.metrics import StyleScorer

pytestmark = pytest.mark.slow  # starts the app or a worker process

FAST = {"steps": 6, "preview_every": 3, "grad_accum": 1, "rank": 4}
ROUND2 = {"steps": 4, "preview_every": 2}  # changes to the parent's recipe a refinement may make


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def expected_picks(scorer: StyleScorer, candidates: list[Path], prompts: list[str], references: list[Path],
                   k: int) -> list[str]:
    """Independently of studio.styles.refine: CLIP-I x CLIP-T (clipped at 0), best k, ties by the style score."""
    result = scorer.score([Image.open(c).convert("RGB") for c in candidates],
                          [Image.open(r).convert("RGB") for r in references], prompts)
    style, text = result["per_image"]["clip_i"], result["per_image"]["clip_t"]
    score = [max(s, 0.0) * max(t, 0.0) for s, t in zip(style, text, strict=True)]
    order = sorted(range(len(candidates)), key=lambda i: (-score[i], -style[i], i))
    return [candidates[i].name for i in order[:k]]



@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("refs") / "ref.png"
    img = Image.new("RGB", (96, 64), (230, 120, 40))
    img.paste((40, 90, 200), (0, 0, 48, 32))
    img.save(path)
    return str(path)


# -- the pure parts -------------------------------------------------------------------------------


def test_candidate_prompts_are_diverse_and_deterministic():
    prompts = refine.candidate_prompts(8)
    assert prompts == refine.candidate_prompts(8) and len(set(prompts)) == 8
    assert set(prompts) <= set(PAPER_PROMPTS)
    assert prompts[0] == PAPER_PROMPTS[0] and prompts[1] == PAPER_PROMPTS[7]  # spread out, not the first eight
    assert set(refine.candidate_prompts(16)) | set(refine.candidate_prompts(7, offset=16)) == set(PAPER_PROMPTS)
    with pytest.raises(Exception, match="between 1 and"):
        refine.candidate_prompts(0)


def test_automatic_pick_is_the_argmax_of_style_times_text():
    assert refine.feedback_score(0.8, 0.3) == pytest.approx(0.24)
    assert refine.feedback_score(-0.5, -0.5) == 0.0  # two failures never beat a neutral image
    scores = [refine.feedback_score(s, t) for s, t in ((0.9, 0.1), (0.6, 0.3), (0.7, 0.35), (0.95, -0.2))]
    assert refine.pick_top_k(scores, 1) == [2]  # not the best style alone (3), not the best text alone
    assert refine.pick_top_k(scores, 2) == [2, 1]
    assert refine.pick_top_k([0.0, 0.0, 0.0], 2, tiebreak=[0.1, 0.5, 0.3]) == [1, 2]
    with pytest.raises(Exception, match="at least one"):
        refine.pick_top_k(scores, 0)


def test_names_and_recipe_of_a_round(tmp_path):
    from studio.store.templates import TemplateInfo

    parent = TemplateInfo("ink", tmp_path, {"name": "Ink", "recipe": {"steps": 300, "rank": 16, "resolution": 64}})
    assert refine.refined_name(parent) == "Ink · round 2"
    assert refine.refined_name(parent, {"ink · ROUND 2"}) == "Ink · round 2 (2)"
    second = TemplateInfo("ink-2", tmp_path, {"name": "Ink · round 2", "round": 2})
    assert refine.refined_name(second) == "Ink · round 3"
    recipe = refine.parent_recipe(parent, {"steps": 40})
    assert (recipe.steps, recipe.rank, recipe.resolution) == (40, 16, 64)  # the parent's, but for the change
    with pytest.raises(Exception, match="cannot change rank"):
        refine.parent_recipe(parent, {"rank": 4})


# -- through the app's API (gradio_client, real worker) --------------------------------------------


@pytest.fixture(scope="module")
def client(app):
    c = Client(app.url, verbose=False, analytics_enabled=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def parent(client, ref) -> dict:
    job = client.predict([handle_file(ref)], "flat poster", "Poster", FAST, api_name="/train")
    status = wait_done(client, job, ok=True)
    return client.predict(status["template_id"], api_name="/template")


@pytest.fixture(scope="module")
def candidates(client, parent) -> list[str]:
    return client.predict(parent["id"], 4, {"steps": 2}, api_name="/refine_candidates")


def test_endpoints_are_named(client):
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/refine_candidates", "/refine"} <= named


def test_candidates_show_other_subjects_and_carry_their_prompt(candidates):
    assert len(candidates) == 4
    assert [refine.read_candidate_prompt(c) for c in candidates] == refine.candidate_prompts(4)
    finals = [json.loads(Image.open(c).text["studio"]) for c in candidates]
    assert [f["seed"] for f in finals] == [0, 1, 2, 3]
    assert finals[1]["final_prompt"] == f"{PAPER_PROMPTS[7]} in flat poster style"


def test_human_feedback_trains_on_references_plus_favourites(client, app, parent, candidates):
    chosen = [candidates[1], candidates[3]]
    job = client.predict(parent["id"], [handle_file(c) for c in chosen], "human", ROUND2, api_name="/refine")
    status = wait_done(client, job, ok=True)
    assert status["total_steps"] == ROUND2["steps"] and status["name"] == "Poster · round 2"

    # Ablation: round 2's training set is the parent's reference plus exactly the two favourites.
    run = app.root / "runs" / job
    request = json.loads((run / "request.json").read_text())
    assert request["references"] == ["ref_00.png", "ref_01.png", "ref_02.png"]
    assert np.array_equal(pixels(run / "references" / "ref_00.png"), pixels(parent["references"][0]))
    for name, picked in zip(request["references"][1:], chosen, strict=True):
        assert np.array_equal(pixels(run / "references" / name), pixels(picked))
    prompts = refine.candidate_prompts(4)
    assert request["captions"] == [None, prompts[1], prompts[3]]  # each pick captioned with its subject
    assert request["recipe"]["rank"] == FAST["rank"] and request["recipe"]["steps"] == ROUND2["steps"]

    # The new template: linked to its parent, with the synthetic images it learned from.
    child = client.predict(status["template_id"], api_name="/template")
    assert child["parent"] == parent["id"] and child["round"] == 2 and child["id"] != parent["id"]
    assert len(child["references"]) == 1  # synthetic images are not style references
    lineage = child["lineage"]
    assert lineage["mode"] == "human" and lineage["parent_name"] == "Poster"
    assert [s["prompt"] for s in lineage["synthetic"]] == [prompts[1], prompts[3]]
    meta = json.loads((Path(child["references"][0]).parent.parent / "template.json").read_text())
    assert meta["parent"] == parent["id"] and meta["round"] == 2
    assert [s["file"] for s in meta["refine"]["synthetic"]] == ["references/ref_01.png", "references/ref_02.png"]
    assert meta["captions"] == request["captions"]
    # ...and the parent is untouched.
    again = client.predict(parent["id"], api_name="/template")
    assert again["round"] == 1 and again["lineage"] is None and again["previews"] == parent["previews"]


def test_automatic_feedback_keeps_the_best_style_times_text(client, app, parent, candidates, metric_models):
    job = client.predict(parent["id"], [], "auto", {"candidates": 4, "top_k": 2, "candidate_steps": 2, **ROUND2},
                         api_name="/refine")
    status = wait_done(client, job, ok=True)
    run = app.root / "runs" / job
    made = sorted((run / refine.CANDIDATES_DIR).glob("cand_*.png"))
    assert len(made) == 4
    for mine, theirs in zip(made, candidates, strict=True):  # the same pictures a human would pick from
        assert np.array_equal(pixels(mine), pixels(theirs))

    dino, clip = metric_models
    want = expected_picks(StyleScorer(dino, clip, device="cpu"), made, refine.candidate_prompts(4),
                          [Path(p) for p in parent["references"]], k=2)
    meta = json.loads((app.root / "templates_store" / status["template_id"] / "template.json").read_text())
    assert meta["parent"] == parent["id"] and meta["round"] == 2 and meta["refine"]["mode"] == "auto"
    assert [s["source"] for s in meta["refine"]["synthetic"]] == want
    assert len(meta["refine"]["scores"]) == 4 and meta["refine"]["top_k"] == 2
    for entry in meta["refine"]["scores"]:
        assert entry["score"] == pytest.approx(refine.feedback_score(entry["style"], entry["text"]), abs=1e-5)
    request = json.loads((run / "request.json").read_text())  # ablation: the picks are the training set
    for name, source in zip(request["references"][1:], want, strict=True):
        assert np.array_equal(pixels(run / "references" / name), pixels(run / refine.CANDIDATES_DIR / source))


def test_refine_bad_inputs_say_why(client, parent, candidates):
    def error(*args) -> str:
        with pytest.raises(Exception) as info:
            client.predict(*args, api_name="/refine")
        return str(info.value)

    assert "cannot refine" in error("no-such-template", [], "auto", {})
    assert "picks its own images" in error(parent["id"], [handle_file(candidates[0])], "auto", {})
    assert "at least one" in error(parent["id"], [], "human", {})
    assert "1 to 4" in error(parent["id"], [], "auto", {"candidates": 4, "top_k": 5})
    assert "cannot change rank" in error(parent["id"], [handle_file(candidates[0])], "human", {"rank": 8})
    assert "unknown feedback" in error(parent["id"], [], "vibes", {})
    assert client.predict(api_name="/templates")["templates"]  # still serving


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_candidates_favourites_auto_and_no_metric_models(tmp_path, ref, metric_models, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("STUDIO_DINO_MODEL", raising=False)
    monkeypatch.delenv("STUDIO_CLIP_MODEL", raising=False)
    store = tmp_path / "store"
    cli = ["--store", str(store)]
    assert main([*cli, "train", "--images", ref, "--style", "ink wash", "--name", "Ink", "--backbone", "tiny",
                 "--steps", "4", "--preview-every", "2", "--grad-accum", "1", "--rank", "4"]) == 0
    capsys.readouterr()

    # human feedback: 1) make candidates, 2) train on the favourites
    assert main([*cli, "refine", "ink", "--candidates", "3", "--candidate-steps", "2", "--out",
                 str(tmp_path / "cands")]) == 0
    files = capsys.readouterr().out.split()
    assert len(files) == 3 and all(Path(f).is_file() for f in files)
    assert main([*cli, "refine", "ink", "--images", files[2], "--steps", "3", "--preview-every", "0"]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((folder / "template.json").read_text())
    assert (meta["name"], meta["parent"], meta["round"]) == ("Ink · round 2", "ink", 2)
    assert meta["refine"]["synthetic"][0]["prompt"] == refine.candidate_prompts(3)[2]
    assert np.array_equal(pixels(folder / meta["refine"]["synthetic"][0]["file"]), pixels(files[2]))

    # automatic feedback without the metric models: one clear line, exit 2, nothing written
    before = sorted(p.name for p in store.iterdir())
    assert main([*cli, "refine", "ink", "--auto", "--candidates", "3", "--top-k", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: automatic feedback needs the CLIP and DINO") and len(err.splitlines()) == 1
    assert "by hand" in err and sorted(p.name for p in store.iterdir()) == before

    # ...the same through the API object: refused before anything is queued
    from studio.api import StudioAPI
    from studio.errors import InputError
    from studio.jobs.jobs import Jobs
    from studio.jobs.queue import Settings

    jobs = Jobs(settings=Settings(runs_dir=tmp_path / "api-runs", store_dir=store))
    with pytest.raises(InputError, match="automatic feedback needs the CLIP and DINO"):
        StudioAPI(jobs, backbone="tiny").refine("ink", None, "auto", {})
    assert not [p for p in (tmp_path / "api-runs").iterdir() if not p.name.startswith(".")]

    # automatic feedback with them: a round 3 of the refined template
    dino, clip = metric_models
    monkeypatch.setenv("STUDIO_DINO_MODEL", str(dino))
    monkeypatch.setenv("STUDIO_CLIP_MODEL", str(clip))
    assert main([*cli, "refine", folder.name, "--auto", "--candidates", "3", "--top-k", "1", "--candidate-steps",
                 "2", "--steps", "3", "--preview-every", "0"]) == 0
    captured = capsys.readouterr()
    third = json.loads((Path(captured.out.strip().splitlines()[-1]) / "template.json").read_text())
    assert (third["name"], third["parent"], third["round"]) == ("Ink · round 3", folder.name, 3)
    assert third["refine"]["mode"] == "auto" and "CLIP picked" in captured.err
    # round 3 learns from the original reference plus its own pick, not round 2's picks
    assert len(third["references"]) == 1 and len(third["captions"]) == 2
