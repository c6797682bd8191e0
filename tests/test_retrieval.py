"""Style retrieval (the CLIP index over the template store) and cached template scores, with the tiny
random-weight metric models: they tell a red picture from a blue one, which is all these tests need."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.api import StudioAPI
from studio.errors import InputError
from studio.jobs.jobs import Jobs
from studio.store.templates import TemplateStore
from studio.styles.metrics import StyleScorer, build_tiny_metric_models, score_template
from studio.styles.retrieval import INDEX_DIR, RetrievalUnavailable, StyleIndex, template_images, template_scores
from studio.ui import present

RED, BLUE, GREEN = (215, 40, 35), (35, 50, 210), (40, 190, 60)


@pytest.fixture(scope="module")
def scorer(metric_models):
    return StyleScorer(*metric_models, device="cpu")


@pytest.fixture
def no_models(tmp_path):
    return StyleScorer(tmp_path / "no-dino", tmp_path / "no-clip", device="cpu")


def picture(colour, seed: int, size=(80, 64)) -> Image.Image:
    """A flat colour with grain and a lighter block: clearly that colour's "style"."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, float)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    arr[8:30, 10:40] = np.clip(arr[8:30, 10:40] + 40, 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def add_template(store: TemplateStore, tid: str, colour, name: str | None = None, style: str = "flat poster",
                 base_colour=None, n_refs: int = 2) -> Path:
    """A template folder as training writes it (references, step-0 and final previews, template.json).

    Written straight into the store, as another process sharing the data folder would: the index must
    follow what is on disk. The step-0 previews (the base model) get ``base_colour``, which must never count.
    """
    folder = store.root / tid
    (folder / "references").mkdir(parents=True)
    (folder / "previews").mkdir()
    refs, previews = [], []
    for i in range(n_refs):
        picture(colour, 10 * i + 1).save(folder / "references" / f"ref_{i:02d}.png")
        refs.append(f"references/ref_{i:02d}.png")
    for step, c in ((0, base_colour or colour), (12, colour)):
        for p in range(2):
            name_ = f"step_{step:04d}_p{p}.png"
            picture(c, 100 + step + p).save(folder / "previews" / name_)
            previews.append(f"previews/{name_}")
    meta = {"name": name or tid, "style_prompt": style, "backbone": "tiny", "family": "flux",
            "created": f"2026-01-0{len(list(store.root.iterdir())) % 9 + 1}T00:00:00+00:00",
            "references": refs, "previews": previews, "preview_prompts": ["a cat", "a boat"]}
    (folder / "template.json").write_text(json.dumps(meta))
    (folder / "lora.safetensors").write_bytes(b"")  # the index never reads it; the store only checks it is there
    return folder


@pytest.fixture
def store(tmp_path) -> TemplateStore:
    store = TemplateStore(tmp_path / "store")
    add_template(store, "red-poster", RED, "Crimson poster", "bold red poster", base_colour=BLUE)
    add_template(store, "blue-wash", BLUE, "Blue wash", "blue watercolor wash")
    return store


def query_file(tmp_path: Path, colour, seed: int = 999) -> str:
    path = tmp_path / f"query_{seed}.png"
    picture(colour, seed, (120, 90)).save(path)
    return str(path)


def test_template_images_are_references_and_final_previews(store):
    info = store.get("red-poster")
    images = template_images(info)
    assert [k for k, _ in images] == ["reference", "reference", "preview", "preview"]
    assert [p.name for _, p in images[2:]] == ["step_0012_p0.png", "step_0012_p1.png"]  # never step 0


def test_sync_follows_templates_as_they_come_and_go(store, scorer, tmp_path):
    index = StyleIndex(store, scorer)
    assert index.sync() == {"added": 8, "removed": 0, "total": 8}
    assert index.path.parent == store.root / INDEX_DIR and index.path.is_file()
    assert [t.id for t in store.list()] and INDEX_DIR not in {t.id for t in store.list()}  # never a template
    # nothing changed: nothing embedded, nothing written
    before = index.path.stat().st_mtime_ns
    assert index.sync() == {"added": 0, "removed": 0, "total": 8} and index.embedded == 8
    assert index.path.stat().st_mtime_ns == before
    # a template comes: only its images are embedded
    add_template(store, "green", GREEN)
    assert index.sync() == {"added": 4, "removed": 0, "total": 12} and index.embedded == 12
    # a template goes
    store.delete("blue-wash")
    assert index.sync() == {"added": 0, "removed": 4, "total": 8}
    # a changed file is embedded again
    picture(BLUE, 5).save(store.root / "green" / "references" / "ref_00.png")
    assert index.sync() == {"added": 1, "removed": 1, "total": 8}
    # another process (a second index object) sees the same file and embeds nothing
    other = StyleIndex(store, scorer)
    assert other.sync()["added"] == 0 and other.embedded == 0
    # the index is a cache: delete it and the next sync rebuilds it
    shutil.rmtree(store.root / INDEX_DIR)
    assert index.sync() == {"added": 8, "removed": 0, "total": 8}
    # a damaged file is rebuilt too (never unpickled)
    index.path.write_bytes(b"PK\x03\x04 not an index")
    assert StyleIndex(store, scorer).sync()["added"] == 8


def test_unreadable_images_are_skipped_once(store, scorer):
    bad = store.root / "red-poster" / "references" / "ref_01.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    index = StyleIndex(store, scorer)
    assert index.sync()["total"] == 7
    assert index.sync()["added"] == 0 and index.embedded == 7  # remembered, not retried


def test_a_new_index_for_a_new_clip_model(store, scorer, tmp_path):
    index = StyleIndex(store, scorer)
    index.sync()
    other_dino, other_clip = build_tiny_metric_models(tmp_path / "other", seed=1)
    other = StyleIndex(store, StyleScorer(other_dino, other_clip, device="cpu"))
    assert other.path != index.path and other.sync()["added"] == 8


def test_image_search_ranks_the_same_style_first(store, scorer, tmp_path):
    add_template(store, "green", GREEN, "Green")
    index = StyleIndex(store, scorer)
    for colour, first in ((RED, "red-poster"), (BLUE, "blue-wash"), (GREEN, "green")):
        result = index.search_images([query_file(tmp_path, colour)], k=3)
        assert result.mode == "image" and [h.template.id for h in result.hits][0] == first
        sims = [h.similarity for h in result.hits]
        assert sims == sorted(sims, reverse=True) and sims[0] > 0.9 and sims[0] - sims[1] > 0.05
        assert result.hits[0].closest.parent.parent == store.root / first
        assert all("step_0000" not in h.closest.name for h in result.hits)  # the base model never stands for a style
    # several images: the mean over them of each one's best match
    two = [query_file(tmp_path, RED, 1), query_file(tmp_path, BLUE, 2)]
    hits = {h.template.id: h.similarity for h in index.search_images(two, k=3).hits}
    singles = [{h.template.id: h.similarity for h in index.search_images([q], k=3).hits} for q in two]
    assert hits["green"] == pytest.approx((singles[0]["green"] + singles[1]["green"]) / 2, abs=1e-5)
    # the threshold keeps only templates that are alike enough
    only = index.search_images([query_file(tmp_path, RED)], k=3, min_similarity=0.9)
    assert [h.template.id for h in only.hits] == ["red-poster"]
    assert index.search_images([query_file(tmp_path, RED)], k=1).hits[0].template.id == "red-poster"


def test_image_search_matches_by_hand(store, scorer, tmp_path):
    """A template's similarity is the best cosine between the query and its references / final previews."""
    query = query_file(tmp_path, RED)
    hit = {h.template.id: h for h in StyleIndex(store, scorer).search_images([query]).hits}
    q = scorer.embed_images([Image.open(query).convert("RGB")])
    for tid in ("red-poster", "blue-wash"):
        files = [p for _, p in template_images(store.get(tid))]
        feats = scorer.embed_images([Image.open(f).convert("RGB") for f in files])
        assert hit[tid].similarity == pytest.approx(float((q @ feats.T).max()), abs=1e-5)


def test_text_search_names_first_then_by_look(store, scorer):
    index = StyleIndex(store, scorer)
    result = index.search_text("watercolor", k=5)
    assert result.mode == "text" and [h.template.id for h in result.hits] == ["blue-wash", "red-poster"]
    assert [h.matched for h in result.hits] == ["name", "look"]
    # the order by look is CLIP's text-image similarity, best image per template
    result = index.search_text("a picture of a dog", k=5)
    assert {h.matched for h in result.hits} == {"look"}
    text = scorer.embed_texts(["a picture of a dog"])
    want = {}
    for tid in ("red-poster", "blue-wash"):
        files = [p for _, p in template_images(store.get(tid))]
        want[tid] = float((text @ scorer.embed_images([Image.open(f).convert("RGB") for f in files]).T).max())
    assert [h.template.id for h in result.hits] == sorted(want, key=want.get, reverse=True)
    for h in result.hits:
        assert h.similarity == pytest.approx(want[h.template.id], abs=1e-5)
    assert len(index.search_text("poster", k=1).hits) == 1
    with pytest.raises(InputError, match="type something"):
        index.search_text("  ")
    with pytest.raises(InputError, match="1 to 100"):
        index.search_text("x", k=0)


def test_without_the_metric_models_text_finds_names_and_images_say_why(store, no_models, tmp_path):
    index = StyleIndex(store, no_models)
    result = index.search_text("wash")
    assert result.mode == "names" and [h.template.id for h in result.hits] == ["blue-wash"]
    assert result.hits[0].similarity is None and "metric models" in result.note and "STUDIO_CLIP_MODEL" in result.note
    with pytest.raises(RetrievalUnavailable, match="needs the metric models") as info:
        index.search_images([query_file(tmp_path, RED)])
    assert "hf download openai/clip-vit-base-patch32" in str(info.value)
    assert str(info.value).count("hf download openai/clip-vit-base-patch32") == 1  # said once, not twice
    # a bad query file is reported as such, before anything about models
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a supported image"):
        index.search_images([str(text)])
    assert not (store.root / INDEX_DIR).exists()


def test_scores_are_computed_once_and_follow_the_previews(store, scorer):
    first = template_scores(store, "red-poster", scorer)
    direct = score_template(store.root / "red-poster", scorer)
    assert first["available"] and first["n_images"] == 2 and first["step"] == 12
    for key in ("dino", "clip_i", "clip_t", "clip_t_full"):
        assert first[key] == pytest.approx(direct[key], abs=1e-6)
    cache = store.root / INDEX_DIR / "scores" / "red-poster.json"
    saved = json.loads(cache.read_text())
    saved["scores"]["dino"] = 0.123  # a marker: the next call must come from the cache
    cache.write_text(json.dumps(saved))
    assert template_scores(store, "red-poster", scorer)["dino"] == 0.123
    store.rename("red-poster", "Renamed")  # the name does not change the scores
    assert template_scores(store, "red-poster", scorer)["dino"] == 0.123
    picture(GREEN, 7).save(store.root / "red-poster" / "previews" / "step_0012_p0.png")  # a changed preview
    assert template_scores(store, "red-poster", scorer)["dino"] == pytest.approx(
        score_template(store.root / "red-poster", scorer)["dino"], abs=1e-6)
    # scores of a template that is gone are dropped at the next index sync
    store.delete("red-poster")
    StyleIndex(store, scorer).sync()
    assert not cache.exists()


def test_scores_say_why_not(store, scorer, no_models):
    missing = template_scores(store, "blue-wash", no_models)
    assert missing["available"] is False and missing["models_missing"]
    assert "STUDIO_DINO_MODEL" in missing["reason"] and "hf download facebook/dino-vits16" in missing["reason"]
    meta = json.loads((store.root / "blue-wash" / "template.json").read_text())
    (store.root / "blue-wash" / "template.json").write_text(json.dumps({**meta, "previews": []}))
    nothing = template_scores(store, "blue-wash", scorer)
    assert nothing == {"available": False, "models_missing": False, "reason": "this template has no previews to score"}
    assert present.scores_markdown(nothing) == "**No scores:** this template has no previews to score."
    text = present.scores_markdown(missing)
    assert text.startswith("**Scores unavailable:** the metric models") and "Find a style" in text


def test_the_studio_api(store, scorer, no_models, tmp_path):
    api = StudioAPI(Jobs(tmp_path / "data"))
    api.store = store
    api.index = StyleIndex(store, scorer)
    api.warm_index().join(60)  # what app.py does at start: the index is ready before the first search
    assert api.index.embedded == 8 and api.index.path.is_file()
    red = query_file(tmp_path, RED)
    found = api.search_templates("", {"path": red}, 2)
    assert found["mode"] == "image" and [t["id"] for t in found["results"]] == ["red-poster", "blue-wash"]
    assert found["results"][0]["name"] == "Crimson poster" and found["results"][0]["similarity"] > 0.9
    assert api.search_templates("wash")["results"][0]["matched"] == "name"
    similar = api.similar_templates([red])  # default threshold: only the one that is alike
    assert [t["id"] for t in similar["results"]] == ["red-poster"]
    assert api.similar_templates([red], 3, 0.0)["results"][1]["id"] == "blue-wash"
    scores = api.template_scores("blue-wash")
    assert scores["available"] and -1 <= scores["dino"] <= 1
    with pytest.raises(InputError, match="give a text or an image"):
        api.search_templates("", None)
    with pytest.raises(InputError, match="whole number"):
        api.search_templates("x", None, "many")
    # without the models: a suggestion quietly has nothing, an explicit image search says why
    api.index = StyleIndex(store, no_models)
    quiet = api.similar_templates([red])
    assert quiet["results"] == [] and quiet["mode"] == "unavailable" and "metric models" in quiet["note"]
    with pytest.raises(RetrievalUnavailable):
        api.search_templates(None, red)
    assert api.search_templates("poster")["mode"] == "names"
    assert api.template_scores("blue-wash")["available"] is False


def test_page_helpers():
    found = {"mode": "image", "results": [
        {"name": "A", "thumbnail": "a.png", "similarity": 0.914},
        {"name": "B", "thumbnail": None, "previews": [], "references": [], "similarity": 0.5}]}
    items = present.search_items(found)  # no picture: a card with its name, so tiles and results stay in step
    assert items[0] == ("a.png", "A") and items[1][1] == "B" and Path(items[1][0]).is_file()
    found["results"][0]["closest_image"] = "ref.png"  # the template's picture closest to the query
    assert present.search_items(found)[0] == ("ref.png", "A")
    assert present.search_note(found) == "Most like your picture: **A** 91 % alike · **B** 50 % alike."
    assert present.search_note({"mode": "text", "results": [], "note": "why"}) == "why"
    assert present.gallery_label(found).startswith("Most like your picture")
    assert present.gallery_label(None) == present.GALLERY_LABEL
    assert present.similar_markdown(found) == (
        "**You may already have this style.** **A** (91 % alike) and **B** (50 % alike) look like your references: "
        "pick one and use it instead of training again — or just go on.")
    one = present.similar_markdown({"results": [{"name": "My *best*", "similarity": 0.8}]})
    assert "**My \\*best\\*** (80 % alike) looks like" in one  # names cannot break the Markdown
    assert present.similar_markdown({"results": []}) == ""
    card = present.scores_markdown({"available": True, "dino": 0.712, "clip_i": 0.83, "clip_t": 0.291,
                                    "n_images": 3})
    assert "on its 3 final previews" in card and "Style (DINO) **0.71**" in card and "Prompt (CLIP-T) **0.29**" in card
    assert "DINO 0.48" in card  # the paper's yardstick
