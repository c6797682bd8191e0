"""Only the registry's backbones and the operator's may be used by a request: a shared studio must never fetch or
load a folder or hub repository a user (or an imported template) names."""

from __future__ import annotations

import json

import pytest
from queue_helpers import make_settings, write_image
from test_templates import build

from studio.engine import backbones
from studio.engine.backbones import KNOWN_BACKBONES, allowed_backbones, is_allowed, resolve_allowed
from studio.errors import InputError
from studio.jobs.jobs import Jobs


@pytest.fixture(autouse=True)
def no_operator_config(monkeypatch):
    monkeypatch.setenv("STUDIO_BACKBONE", "tiny")
    monkeypatch.delenv("STUDIO_BACKBONES", raising=False)


@pytest.fixture
def index_reads(monkeypatch) -> list[str]:
    """Every model_index.json resolve() reads (a folder's, or a hub repo's through a download)."""
    reads: list[str] = []
    real = backbones._read_model_index
    monkeypatch.setattr(backbones, "_read_model_index", lambda source: reads.append(source) or real(source))
    return reads


@pytest.fixture
def jobs(request, tmp_path):
    j = Jobs(settings=make_settings(request, "sqlite", tmp_path / "data"))
    yield j
    j.queue.close()


def job_folders(jobs: Jobs) -> list:
    return [p for p in jobs.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_only_registry_ids_and_configured_backbones_are_allowed(tiny_folder, monkeypatch, index_reads):
    assert all(is_allowed(name) for name in KNOWN_BACKBONES) and resolve_allowed("tiny").family == "flux"
    for name in (str(tiny_folder), "someone/any-model", "../models/x", "", " ", "a" * 400, "tiny\x00"):
        assert not is_allowed(name), name
    with pytest.raises(InputError, match=r"'someone/any-model' is not allowed here: use one of tiny, flux-dev"):
        resolve_allowed("someone/any-model")
    with pytest.raises(InputError, match="STUDIO_BACKBONES"):
        resolve_allowed(str(tiny_folder))
    assert index_reads == []  # refused before anything was read or downloaded

    monkeypatch.setenv("STUDIO_BACKBONES", f"someone/any-model, {tiny_folder}/")
    assert allowed_backbones()[:len(KNOWN_BACKBONES)] == list(KNOWN_BACKBONES)
    assert is_allowed("someone/any-model") and is_allowed(str(tiny_folder))
    assert resolve_allowed(str(tiny_folder)).family == "flux"  # the operator's folder works as before
    monkeypatch.delenv("STUDIO_BACKBONES")
    monkeypatch.setenv("STUDIO_BACKBONE", str(tiny_folder))  # also what `app.py --backbone FOLDER` sets
    assert is_allowed(str(tiny_folder)) and not is_allowed("someone/any-model")


def test_submit_refuses_other_backbones_before_writing(jobs, tmp_path, tiny_folder, index_reads, monkeypatch):
    image = write_image(tmp_path / "ref.png")
    for backbone in (str(tiny_folder), "someone/any-model", "/etc"):
        with pytest.raises(InputError, match="is not allowed here"):
            jobs.submit_train([image], "red poster", "Poster", recipe={"steps": 2}, backbone=backbone)
    with pytest.raises(InputError, match="is not allowed here"):
        jobs.submit_generate(None, {"prompt": "a cat"}, backbone="someone/any-model")

    # A template whose template.json names another backbone (written before imports were checked)
    legacy = jobs.store.root / "legacy"
    build(legacy.mkdir() or legacy, backbone="someone/any-model")
    with pytest.raises(InputError, match="'someone/any-model' is not allowed here"):
        jobs.submit_generate("legacy", {"prompt": "a cat"})
    assert job_folders(jobs) == [] and jobs.queue.pending() == [] and index_reads == []

    monkeypatch.setenv("STUDIO_BACKBONES", str(tiny_folder))  # the operator allows the folder: it trains
    job_id = jobs.submit_train([image], "red poster", "Poster", recipe={"steps": 2}, backbone=str(tiny_folder))
    assert json.loads((jobs.job_dir(job_id) / "job.json").read_text())["backbone"] == str(tiny_folder)
