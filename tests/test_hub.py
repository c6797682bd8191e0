"""Hub sharing and importing with a fake HfApi (the Hub network is the one thing mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_templates import add

from studio.errors import InputError, StudioError
from studio.store import hub
from studio.store.templates import TemplateStore


class FakeApi:
    """Records what a share would send; keeps a copy of the uploaded folder."""

    calls: list = []
    uploaded: dict[str, bytes] = {}
    fail_with: Exception | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        if FakeApi.fail_with:
            raise FakeApi.fail_with
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))
        full = repo_id if "/" in repo_id else f"artist/{repo_id}"
        return type("RepoUrl", (), {"repo_id": full})()

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        FakeApi.calls.append(("upload_folder", repo_id))
        root = Path(folder_path)
        FakeApi.uploaded = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def list_repo_files(self, repo_id):
        return sorted(FakeApi.uploaded)


@pytest.fixture()
def store(tmp_path) -> TemplateStore:
    return TemplateStore(tmp_path / "store")


@pytest.fixture(autouse=True)
def fake_hub(monkeypatch, tmp_path):
    FakeApi.calls, FakeApi.uploaded, FakeApi.fail_with = [], {}, None
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_OFFLINE", False)

    def download(repo_id, filename, token=None):
        path = tmp_path / "hub-cache" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(FakeApi.uploaded[filename])
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", download)


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_share_uploads_lora_previews_and_a_model_card(store):
    info = add(store, "Watercolor", base_model="black-forest-labs/FLUX.1-dev", backbone="flux-dev",
               preview_prompts=["A friendly robot"])
    url = hub.share(store, info.id, "my-watercolor", "hf_secret_token", private=True)
    assert url.endswith("/artist/my-watercolor")
    assert ("create_repo", "my-watercolor", True, True) in FakeApi.calls
    assert ("upload_folder", "artist/my-watercolor") in FakeApi.calls
    files = FakeApi.uploaded
    assert {"README.md", f"{info.id}.safetensors", "images/sample_0.png"} <= set(files)
    readme = files["README.md"].decode()
    meta = front_matter(readme)
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert meta["instance_prompt"] == "watercolor painting"
    assert meta["library_name"] == "diffusers" and "lora" in meta["tags"]
    assert meta["widget"][0]["output"]["url"] == "images/sample_0.png"
    assert "A friendly robot in watercolor painting style" == meta["widget"][0]["text"]
    assert 'load_lora_weights("artist/my-watercolor"' in readme  # the full id after create_repo
    assert "hf_secret_token" not in readme


def test_a_shared_template_imports_back_with_its_card(store):
    info = add(store, "Ink")
    hub.share(store, info.id, "artist/ink", "tok")
    imported = hub.import_from_hub(store, "artist/ink")
    assert imported.style_prompt == "watercolor painting"
    assert imported.meta["source_repo"] == "artist/ink"
    assert imported.id != info.id


def test_the_token_is_never_stored_or_logged(store, caplog, tmp_path):
    info = add(store, "Secret")
    caplog.set_level("DEBUG")
    hub.share(store, info.id, "artist/secret", "hf_TOPSECRET")
    assert "hf_TOPSECRET" not in caplog.text
    on_disk = b"".join(p.read_bytes() for p in Path(store.root).rglob("*") if p.is_file())
    assert b"hf_TOPSECRET" not in on_disk


def test_clear_messages(store, monkeypatch):
    info = add(store, "X")
    with pytest.raises(InputError, match="token"):
        hub.share(store, info.id, "artist/x", "")
    with pytest.raises(InputError, match="not a valid Hub repository name"):
        hub.share(store, info.id, "bad name/with/slashes", "tok")
    FakeApi.fail_with = ConnectionError("no route")
    with pytest.raises(StudioError, match="cannot be reached"):
        hub.share(store, info.id, "artist/x", "tok")
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StudioError, match="offline"):
        hub.share(store, info.id, "artist/x", "tok")
    with pytest.raises(InputError, match="full repository id"):
        hub.import_from_hub(store, "justaname")


def test_model_card_for_the_tiny_model_has_no_hub_base(store):
    info = add(store, "Tiny one")
    card = hub.build_model_card(store.get(info.id), "artist/t", "t.safetensors", [])
    meta = front_matter(str(card))
    assert "base_model" not in meta or meta["base_model"] is None
    assert "tiny demo model" in str(card)
    json.dumps(meta)  # plain data
