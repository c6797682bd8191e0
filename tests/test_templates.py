"""The template store: atomic create/rename/delete, fast listing that survives damaged folders,
exports, and imports that reject anything unsafe without leaving a trace in the store."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import stat
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.errors import InputError, NotFoundError
from studio.store import exchange, files, lora_formats, templates
from studio.store.templates import TemplateStore

H, R = 32, 4
FLUX_MODULES = (
    [f"transformer_blocks.{i}.attn.{t}" for i in range(2)
     for t in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")]
    + [f"single_transformer_blocks.{i}.{t}" for i in range(2)
       for t in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")]
    + ["proj_out"]
)
SHAPES = {"proj_mlp": (4 * H, H), "single_transformer_blocks.0.proj_out": (H, 5 * H),
          "single_transformer_blocks.1.proj_out": (H, 5 * H), "proj_out": (16, H)}


def flux_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small, valid diffusers-format FLUX LoRA over the paper's targets (real key names)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for m in FLUX_MODULES:
        out_f, in_f = SHAPES.get(m) or SHAPES.get(m.rsplit(".", 1)[-1]) or (H, H)
        state[f"transformer.{m}.lora_A.weight"] = torch.randn(R, in_f, generator=gen)
        state[f"transformer.{m}.lora_B.weight"] = torch.randn(out_f, R, generator=gen)
    return state


def deltas(state) -> dict[str, torch.Tensor]:
    return {k[:-len(".lora_A.weight")]: state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith(".lora_A.weight")}


def png(path: Path, color=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)


def build(staging: Path, style="watercolor painting", lora=None, metadata=None, **meta) -> Path:
    """Fill a staging folder the way training does."""
    save_file(lora if lora is not None else flux_lora(), str(staging / "lora.safetensors"), metadata=metadata)
    png(staging / "references" / "ref_00.png")
    png(staging / "previews" / "step_0000_p0_s0.png", (10, 200, 10))
    png(staging / "thumbnail.png")
    (staging / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    card = {"format_version": 1, "style_prompt": style, "backbone": "tiny", "family": "flux",
            "recipe": {"rank": R, "resolution": 64}, "references": ["references/ref_00.png"],
            "previews": ["previews/step_0000_p0_s0.png"], "thumbnail": "thumbnail.png", **meta}
    (staging / "template.json").write_text(json.dumps(card))
    return staging


@pytest.fixture()
def store(tmp_path) -> TemplateStore:
    return TemplateStore(tmp_path / "store")


def add(store: TemplateStore, name: str, **kw):
    return store.create(build(store.new_staging(), **kw), name)


def snapshot(store: TemplateStore) -> list[str]:
    """Everything in the store (an empty .staging folder itself does not count)."""
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p != store.staging_root)


# ------------------------------------------------------------------------------- life cycle


def test_create_get_list_rename_delete(store):
    info = add(store, "Watercolor Dreams")
    assert info.id == "watercolor-dreams" and info.path == store.root / "watercolor-dreams"
    assert info.name == "Watercolor Dreams" and info.style_prompt == "watercolor painting"
    assert info.family == "flux" and info.backbone == "tiny" and info.created
    on_disk = json.loads((info.path / "template.json").read_text())
    assert on_disk["id"] == "watercolor-dreams" and on_disk["name"] == "Watercolor Dreams"
    assert list(store.staging_root.iterdir()) == []
    assert info.thumbnail == info.path / "thumbnail.png"
    assert info.previews == [info.path / "previews" / "step_0000_p0_s0.png"]
    assert info.references == [info.path / "references" / "ref_00.png"]

    got = store.get("watercolor-dreams")
    assert got.meta == info.meta and [i.id for i in store.list()] == ["watercolor-dreams"]

    renamed = store.rename("watercolor-dreams", "  Aquarelle  ")
    assert renamed.name == "Aquarelle" and renamed.id == "watercolor-dreams"
    assert store.get("watercolor-dreams").name == "Aquarelle"
    assert sorted(p.name for p in info.path.iterdir()) == [
        "lora.safetensors", "metrics.jsonl", "previews", "references", "template.json", "thumbnail.png"]

    store.delete("watercolor-dreams")
    assert store.list() == [] and not info.path.exists()
    assert list(store.trash_root.iterdir()) == []
    with pytest.raises(NotFoundError, match="watercolor-dreams"):
        store.get("watercolor-dreams")
    with pytest.raises(NotFoundError):
        store.delete("watercolor-dreams")


def test_name_clash_gets_an_id_suffix(store):
    ids = [add(store, "Ink Wash").id for _ in range(3)]
    assert ids == ["ink-wash", "ink-wash-2", "ink-wash-3"]
    assert add(store, "ink   wash!").id == "ink-wash-4"


def test_create_retries_when_the_rename_loses_a_race(store, monkeypatch):
    add(store, "Ink")
    real_lexists = os.path.lexists
    calls = []

    def blind_once(path):  # another writer "takes" the id between our check and our rename
        calls.append(path)
        return False if len(calls) == 1 else real_lexists(path)

    monkeypatch.setattr(templates.os.path, "lexists", blind_once)
    info = add(store, "Ink")
    assert info.id == "ink-2" and info.meta["id"] == "ink-2"
    assert json.loads((store.root / "ink" / "template.json").read_text())["id"] == "ink"


def test_bad_names_and_ids(store):
    info = add(store, "Keep")
    for bad in ("", "   ", "a/b", "..", ".hidden", "x" * 81):
        with pytest.raises(InputError):
            store.rename(info.id, bad)
        with pytest.raises(InputError):
            store.create(build(store.new_staging()), bad)
    assert store.get("keep").name == "Keep"
    for bad in ("../keep", "keep/../keep", "..", ".", ".staging", "/etc", "a\\b", "", "x\x00"):
        with pytest.raises(NotFoundError):
            store.get(bad)
        with pytest.raises(NotFoundError):
            store.delete(bad)
    assert [i.id for i in store.list()] == ["keep"]


def test_create_checks_the_staging_folder(store, tmp_path):
    staging = build(store.new_staging())
    (staging / "lora.safetensors").unlink()
    with pytest.raises(InputError, match="lora.safetensors"):
        store.create(staging, "x")
    staging = build(store.new_staging())
    (staging / "template.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        store.create(staging, "x")
    staging = build(store.new_staging())
    (staging / "template.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="style_prompt"):
        store.create(staging, "x")
    staging = build(store.new_staging(), lora={"transformer.foo.lora_A.weight": torch.zeros(2, 2),
                                               "transformer.foo.lora_B.weight": torch.zeros(2, 2)})
    with pytest.raises(InputError, match="not a usable LoRA"):
        store.create(staging, "x")
    staging = build(store.new_staging(), family="sd3")
    with pytest.raises(InputError, match="FLUX"):
        store.create(staging, "x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(InputError, match="staging"):
        store.create(build(outside), "x")
    assert store.list() == []


def test_json_writes_are_atomic(store, monkeypatch):
    info = add(store, "Atomic")
    before = (info.path / "template.json").read_bytes()

    def crash(*a, **k):
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(files.json, "dump", crash)
    with pytest.raises(OSError):
        store.rename("atomic", "New name")
    assert (info.path / "template.json").read_bytes() == before
    assert sorted(p.name for p in info.path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------- listing


def test_list_is_newest_first_and_searchable(store):
    add(store, "Old Ink", style="ink wash", created="2024-01-01T00:00:00+00:00")
    add(store, "Watercolor", style="soft WATERCOLOR painting", created="2025-06-01T12:00:00+00:00")
    add(store, "Pixel Art", style="8-bit pixel art", created="2025-01-01T00:00:00Z")
    assert [i.name for i in store.list()] == ["Watercolor", "Pixel Art", "Old Ink"]
    assert [i.name for i in store.list("watercolor")] == ["Watercolor"]
    assert [i.name for i in store.list("INK")] == ["Old Ink"]
    assert [i.name for i in store.list("8-BIT art")] == ["Pixel Art"]  # every word must appear
    assert store.list("pixel ink") == []
    assert len(store.list("  ")) == 3


def test_an_import_is_listed_as_new_whenever_it_was_trained(store, tmp_path):
    """Imported templates sort by when they came into this store, not by their (old) training date."""
    old = TemplateStore(tmp_path / "elsewhere")
    add(old, "Vintage", created="2020-01-01T00:00:00+00:00")
    zipped = old.export_zip("vintage", tmp_path / "out")
    add(store, "Fresh")
    time.sleep(1.1)  # the stores' times have one-second steps
    imported = store.import_file(zipped)
    assert imported.meta["created"] == "2020-01-01T00:00:00+00:00" and imported.meta["added"] > "2026"
    assert [i.name for i in store.list()] == ["Vintage", "Fresh"]


def test_damaged_folders_are_skipped_with_a_warning(store, caplog):
    add(store, "Good")
    root = store.root
    bad_json = root / "bad-json"
    build(bad_json.mkdir() or bad_json)
    (bad_json / "template.json").write_text("{not json")
    no_lora = root / "no-lora"
    build(no_lora.mkdir() or no_lora)
    (no_lora / "lora.safetensors").unlink()
    no_card = root / "no-card"
    build(no_card.mkdir() or no_card)
    (no_card / "template.json").unlink()
    array = root / "array"
    build(array.mkdir() or array)
    (array / "template.json").write_text("[1, 2]")
    binary = root / "binary"
    build(binary.mkdir() or binary)
    (binary / "template.json").write_bytes(b"\xff\xfe\x00garbage")
    (root / "notes.txt").write_text("a random file in the store")
    hidden = root / ".hidden"
    build(hidden.mkdir() or hidden)
    build(store.new_staging())  # a complete template whose create() never happened (crash)
    with caplog.at_level(logging.WARNING, logger="studio.store.templates"):
        listed = store.list()
    assert [i.id for i in listed] == ["good"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("bad-json", "no-lora", "no-card", "array", "binary", ".hidden"):
        assert name in warned
    assert ".staging" not in warned and "notes.txt" not in warned  # ours / not a folder: no noise
    with pytest.raises(NotFoundError, match="damaged"):
        store.get("bad-json")


def test_listing_500_templates_is_fast(store):
    write_templates(store, 500)
    store.list()  # warm the OS cache once, as a running studio would be
    start = time.perf_counter()
    listed = store.list()
    elapsed = time.perf_counter() - start
    assert len(listed) == 500 and listed[0].id == "t499" and listed[-1].id == "t000"
    assert elapsed < 0.2, f"listing 500 templates took {elapsed * 1000:.0f} ms"
    start = time.perf_counter()
    found = [i.id for i in store.list("STYLE NUMBER 42")]
    assert found == [f"t{i:03d}" for i in reversed(range(500)) if "42" in str(i)]
    assert time.perf_counter() - start < 0.2


def test_crash_mid_create_leaves_nothing_listed(store, monkeypatch):
    staging = build(store.new_staging())

    def crash(src, dst):
        raise OSError(errno.EIO, "power cut")

    monkeypatch.setattr(templates.os, "rename", crash)
    with pytest.raises(OSError):
        store.create(staging, "Doomed")
    monkeypatch.undo()
    assert store.list() == [] and not (store.root / "doomed").exists()
    assert store.clean_staging(max_age_s=3600) == 0  # still fresh: kept
    assert store.clean_staging(max_age_s=-1) == 1
    assert list(store.staging_root.iterdir()) == []


def test_clean_staging_keeps_recent_work_and_empties_the_trash(store):
    old = build(store.new_staging())
    fresh = build(store.new_staging())
    past = time.time() - 7200
    for p in [old, *old.rglob("*")]:
        os.utime(p, (past, past))
    store.trash_root.mkdir()
    (store.trash_root / "gone-1234").mkdir()
    assert store.clean_staging(max_age_s=3600) == 2
    assert not old.exists() and fresh.exists() and list(store.trash_root.iterdir()) == []


# ------------------------------------------------------------------------------- export / import


def test_export_zip_import_round_trip(store, tmp_path):
    info = add(store, "Zip Me", metadata={"lora_adapter_metadata": json.dumps({"transformer.r": R,
                                                                                 "transformer.lora_alpha": R})})
    path = store.export_zip("zip-me", tmp_path / "out")
    assert path == tmp_path / "out" / "zip-me.zip"
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
    assert names == ["lora.safetensors", "metrics.jsonl", "previews/step_0000_p0_s0.png", "references/ref_00.png",
                     "template.json", "thumbnail.png"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    other = TemplateStore(tmp_path / "other")
    imported = other.import_file(path)
    assert imported.id == "zip-me" and imported.name == "Zip Me"
    for rel in names:
        assert (imported.path / rel).read_bytes() == (info.path / rel).read_bytes() or rel == "template.json"
    same = {k: v for k, v in imported.meta.items() if k not in ("id", "added")}
    assert same == {k: v for k, v in info.meta.items() if k not in ("id", "added")}
    again = store.import_file(path)  # same store: the name and the id get a suffix
    assert again.name == "Zip Me (2)" and again.id == "zip-me-2"
    assert again.previews and again.references and again.thumbnail


def test_zip_of_the_folder_itself_imports(store, tmp_path):
    info = add(store, "Folder")
    archive = tmp_path / "folder.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(info.path.rglob("*")):
            if p.is_file():
                zf.write(p, f"folder/{p.relative_to(info.path).as_posix()}")
    assert store.import_file(archive, name="From folder zip").references


def test_export_safetensors_import_round_trip(store, tmp_path):
    lora = flux_lora(1)
    adapter = json.dumps({"transformer.r": R, "transformer.lora_alpha": R})
    info = add(store, "Card", lora=lora, metadata={"lora_adapter_metadata": adapter})
    path = store.export_safetensors("card", tmp_path)
    assert path == tmp_path / "card.safetensors"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        assert set(f.keys()) == set(lora)
    assert header["format"] == "pt" and header["lora_adapter_metadata"] == adapter
    assert json.loads(header["studio_template"]) == info.meta
    other = TemplateStore(tmp_path / "other")
    imported = other.import_file(path)
    assert imported.name == "Card" and imported.id == "card"
    for key in ("style_prompt", "backbone", "family", "recipe", "created", "format_version"):
        assert imported.meta[key] == info.meta[key]
    assert imported.meta["previews"] == [] and imported.meta["references"] == []  # files did not travel
    assert "thumbnail" not in imported.meta and imported.thumbnail is None
    stored = load_file(str(imported.path / "lora.safetensors"))
    assert stored.keys() == lora.keys() and all(torch.equal(stored[k], lora[k]) for k in lora)
    with safe_open(str(imported.path / "lora.safetensors"), "pt") as f:
        assert "studio_template" not in f.metadata()  # the card lives in template.json only


def test_export_comfy_and_import_it_back(store, tmp_path):
    lora = flux_lora(2)
    add(store, "Comfy", lora=lora)
    path = store.export_comfy("comfy", tmp_path, "fp32")  # bf16 by default
    assert path.name == "comfy_comfy.safetensors"
    kohya = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight" in kohya
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * R
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["studio_template"])["name"] == "Comfy"
    back = store.import_file(path, name="Back")
    assert back.meta["style_prompt"] == "watercolor painting" and "imported" not in back.meta
    stored = load_file(str(back.path / "lora.safetensors"))
    assert set(stored) == set(lora)
    for m, d in deltas(stored).items():
        torch.testing.assert_close(d, deltas(lora)[m])


def test_export_comfy_folds_the_trained_alpha(store, tmp_path):
    lora = flux_lora(3)
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": R, "transformer.lora_alpha": 2 * R})}
    add(store, "Alpha", lora=lora, metadata=metadata)
    kohya = load_file(str(store.export_comfy("alpha", tmp_path, "fp32")))
    assert float(kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == R  # alpha = rank, scale in the weights
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * R
    back = lora_formats.kohya_to_diffusers(kohya, "flux")
    for m, d in deltas(back).items():
        torch.testing.assert_close(d, 2 * deltas(lora)[m])
    imported = TemplateStore(tmp_path / "other").import_file(store.export_safetensors("alpha", tmp_path))
    stored = load_file(str(imported.path / "lora.safetensors"))  # alpha folded in: diffusers loads scale 1
    for m, d in deltas(stored).items():
        torch.testing.assert_close(d, 2 * deltas(lora)[m])


def test_import_a_plain_kohya_lora_from_another_trainer(store, tmp_path):
    lora = flux_lora(4)
    path = tmp_path / "cel_shade-v2.safetensors"
    save_file(lora_formats.diffusers_to_kohya(lora, "flux"), str(path),  # 32 wide: the header names the model
              metadata={"modelspec.trigger_phrase": "cel shaded anime", "ss_network_dim": "4", "backbone": "flux-dev"})
    info = store.import_file(path)
    assert info.name == "cel_shade-v2" and info.id == "cel-shade-v2"
    assert info.style_prompt == "cel shaded anime" and info.meta["imported"] is True
    assert info.backbone == "flux-dev" and info.family == "flux"
    assert info.previews == [] and info.references == [] and info.thumbnail is None
    stored = load_file(str(info.path / "lora.safetensors"))
    assert all(k.startswith("transformer.") for k in stored)
    for m, d in deltas(stored).items():
        torch.testing.assert_close(d, deltas(lora)[m])
    assert [i.id for i in store.list()] == ["cel-shade-v2"]


def test_import_a_plain_sd3_lora(store, tmp_path):
    gen = torch.Generator().manual_seed(5)
    state = {}
    for i in range(2):
        for part in ("x_block_attn_qkv", "context_block_attn_qkv"):
            state[f"lora_unet_joint_blocks_{i}_{part}.lora_down.weight"] = torch.randn(4, 24, generator=gen)
            state[f"lora_unet_joint_blocks_{i}_{part}.lora_up.weight"] = torch.randn(72, 4, generator=gen)
    path = tmp_path / "sd3 style.safetensors"
    save_file(state, str(path), metadata={"backbone": "sd3.5-large"})  # 24 wide: no real model's shapes
    info = store.import_file(path)
    assert info.family == "sd3" and info.backbone == "sd3.5-large" and info.style_prompt == ""
    path2 = tmp_path / "medium.safetensors"
    save_file(state, str(path2), metadata={"modelspec.architecture": "stable-diffusion-v3-medium/lora"})
    assert store.import_file(path2).backbone == "sd3.5-medium"


def test_imported_names_are_sanitised_and_deduplicated(store, tmp_path):
    add(store, "Ink-Wash")
    path = tmp_path / "card.safetensors"
    meta = {"name": "Ink/Wash", "style_prompt": "ink", "family": "flux", "backbone": "flux-dev"}
    save_file(flux_lora(), str(path), metadata={"studio_template": json.dumps(meta)})
    assert store.import_file(path).name == "Ink-Wash (2)"
    odd = tmp_path / "..\\weird\tname.safetensors"
    save_file(flux_lora(), str(odd), metadata={"backbone": "tiny"})
    assert store.import_file(odd).name == "-weird name"
    with pytest.raises(InputError, match="cannot contain"):
        store.import_file(path, name="a/b")  # a name the user typed is not rewritten
    with pytest.raises(InputError, match="no such file"):
        store.import_file(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------- malicious imports


def template_members(store: TemplateStore) -> dict[str, bytes]:
    info = add(store, "Source")
    files = {p.relative_to(info.path).as_posix(): p.read_bytes() for p in info.path.rglob("*") if p.is_file()}
    store.delete("source")
    return files


def write_zip(path: Path, members: dict[str, bytes], extra=()) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names are one of the cases
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def symlink_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def pickled_lora() -> bytes:
    buf = io.BytesIO()
    torch.save(flux_lora(), buf)
    return buf.getvalue()


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_imports(tmp: Path, good: dict[str, bytes]) -> dict[str, tuple]:
    """case -> (a function making the file, a phrase the one-line error must contain)."""
    tensors = flux_lora()
    unknown = {**tensors, "transformer.transformer_blocks.0.attn.to_z.lora_A.weight": torch.zeros(4, H),
               "transformer.transformer_blocks.0.attn.to_z.lora_B.weight": torch.zeros(H, 4)}
    ranks = {**tensors, "transformer.proj_out.lora_B.weight": torch.zeros(16, 3)}
    card = json.loads(good["template.json"])
    no_prompt = json.dumps({k: v for k, v in card.items() if k != "style_prompt"})
    wrong_family = json.dumps({**card, "family": "sd3"})
    many = {f"previews/p{i}.json": b"{}" for i in range(exchange.MAX_ZIP_MEMBERS)}
    without = {name: {k: v for k, v in good.items() if k != name} for name in ("lora.safetensors", "template.json")}
    return {
        "zip ../ path": (lambda: write_zip(tmp / "a.zip", {**good, "../evil.json": b"{}"}), "unsafe path"),
        "zip nested ..": (lambda: write_zip(tmp / "a.zip", {**good, "references/../../evil.json": b"{}"}),
                          "unsafe path"),
        "zip absolute path": (lambda: write_zip(tmp / "a.zip", {**good, "/tmp/evil.json": b"{}"}), "unsafe path"),
        "zip symlink": (lambda: write_zip(tmp / "a.zip", good, [(symlink_member("references/x.png"), b"/etc/passwd")]),
                        "symbolic link"),
        "zip bomb ratio": (lambda: write_zip(tmp / "a.zip", {**good, "metrics.jsonl": b"\0" * (4 * 1024**2)}),
                           "zip bomb"),
        "zip too many members": (lambda: write_zip(tmp / "a.zip", {**good, **many}), "entries"),
        "zip executable": (lambda: write_zip(tmp / "a.zip", {**good, "run.sh": b"rm -rf /"}),
                           "not an allowed file type"),
        "zip hidden file": (lambda: write_zip(tmp / "a.zip", {**good, ".env": b"{}"}), "unsafe path"),
        "zip no lora": (lambda: write_zip(tmp / "a.zip", without["lora.safetensors"]), "no lora.safetensors"),
        "zip no card": (lambda: write_zip(tmp / "a.zip", without["template.json"]), "no template.json"),
        "zip no style prompt": (lambda: write_zip(tmp / "a.zip", {**good, "template.json": no_prompt}), "style_prompt"),
        "zip pickled lora": (lambda: write_zip(tmp / "a.zip", {**good, "lora.safetensors": pickled_lora()}),
                             "not a safetensors file"),
        "zip fake png": (lambda: write_zip(tmp / "a.zip", {**good, "references/ref_00.png": b"GIF89a..."}),
                         "not a PNG"),
        "zip duplicate": (lambda: write_zip(tmp / "a.zip", good, [(zipfile.ZipInfo("template.json"), b"{}")]),
                          "appears twice"),
        "zip wrong family": (lambda: write_zip(tmp / "a.zip", {**good, "template.json": wrong_family}), "FLUX"),
        "not a zip": (lambda: write(tmp / "fake.zip", b"not a zip"), "not a valid zip"),
        "pickle renamed .safetensors": (lambda: write(tmp / "p.safetensors", pickled_lora()),
                                        "not a safetensors file"),
        "raw pickle": (lambda: write(tmp / "p.safetensors", pickle.dumps({"a": 1})), "pickle"),
        ".pt file": (lambda: write(tmp / "lora.pt", pickled_lora()), "pickled"),
        ".ckpt file": (lambda: write(tmp / "lora.ckpt", pickled_lora()), "pickled"),
        "other file type": (lambda: write(tmp / "notes.txt", b"hello"), "unsupported file type"),
        "unknown tensor names": (lambda: save(tmp / "u.safetensors", unknown), "to_z"),
        "mismatched ranks": (lambda: save(tmp / "r.safetensors", ranks), "mismatched ranks"),
    }


CASES = ["zip ../ path", "zip nested ..", "zip absolute path", "zip symlink", "zip bomb ratio", "zip too many members",
         "zip executable", "zip hidden file", "zip no lora", "zip no card", "zip no style prompt", "zip pickled lora",
         "zip fake png", "zip duplicate", "zip wrong family", "not a zip", "pickle renamed .safetensors",
         "raw pickle", ".pt file", ".ckpt file", "other file type", "unknown tensor names", "mismatched ranks"]


@pytest.mark.parametrize("case", CASES)
def test_malicious_or_broken_imports_are_rejected_and_change_nothing(case, store, tmp_path):
    add(store, "Existing")
    cases = bad_imports(tmp_path, template_members(store))
    assert sorted(cases) == sorted(CASES)
    make, needle = cases[case]
    path = make()
    before = snapshot(store)
    with pytest.raises(InputError, match=needle) as err:
        store.import_file(path)
    assert "\n" not in str(err.value)
    assert snapshot(store) == before
    assert not (tmp_path / "evil.json").exists() and not Path("/tmp/evil.json").exists()


@pytest.mark.parametrize("limit, value, needle", [
    ("MAX_LORA_BYTES", 1000, "the limit is"),  # a declared LoRA size over the limit
    ("MAX_OTHER_BYTES", 100, "besides the LoRA exceed"),
])
def test_size_limits_are_checked_from_the_declared_sizes(limit, value, needle, store, tmp_path, monkeypatch):
    good = template_members(store)
    archive = write_zip(tmp_path / "big.zip", good)
    monkeypatch.setattr(exchange, limit, value)
    before = snapshot(store)
    with pytest.raises(InputError, match=needle):
        store.import_file(archive)
    assert snapshot(store) == before


def test_a_member_larger_than_declared_is_cut_off(store, tmp_path):
    """A forged header (file_size smaller than the data) must not make us write more."""
    good = template_members(store)
    archive = write_zip(tmp_path / "forged.zip", good)
    data = bytearray(archive.read_bytes())
    # patch the uncompressed size of metrics.jsonl in its central directory entry down to 1 byte
    pos, patched = data.find(b"PK\x01\x02"), 0
    while pos != -1:
        name_len = int.from_bytes(data[pos + 28:pos + 30], "little")
        if data[pos + 46:pos + 46 + name_len] == b"metrics.jsonl":
            data[pos + 24:pos + 28] = (1).to_bytes(4, "little")
            patched += 1
        pos = data.find(b"PK\x01\x02", pos + 4)
    archive.write_bytes(bytes(data))
    assert patched == 1
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("metrics.jsonl").file_size == 1
    before = snapshot(store)
    with pytest.raises(InputError):
        store.import_file(archive)
    assert snapshot(store) == before


def test_import_guesses_the_backbone_from_the_lora_width(store, tmp_path):
    """A bare LoRA says nothing about its model; its attention width does (tiny FLUX is 64 wide, FLUX.1 3072),
    so a LoRA trained in the demo studio imports as a tiny template and can be used there."""
    def bare(width: int, name: str) -> Path:
        state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, width),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(width, 4)}
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        return path

    assert store.import_file(bare(64, "demo")).backbone == "tiny"
    assert store.import_file(bare(3072, "real")).backbone == "flux-dev"
    with pytest.raises(InputError, match="match no known FLUX backbone"):  # fits no model: refused
        store.import_file(bare(100, "unknown"))


def test_tiny_widths_match_the_built_tiny_model(tiny_folder):
    from studio.store.exchange import BACKBONES_BY_WIDTH

    config = json.loads((Path(tiny_folder) / "transformer" / "config.json").read_text())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    assert BACKBONES_BY_WIDTH[("flux", width)] == "tiny"


# ------------------------------------------------------------------------------- template.json schema

POISON = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}, "orig_name": "x.png"}


def studio_meta() -> dict:
    """A template.json as the studio writes it: training's fields, a noise prior, a round-2 lineage, an import."""
    from dataclasses import asdict

    from studio.engine.recipe import Recipe

    return {
        "format_version": 1, "id": "ink-round-2", "name": "Ink · round 2", "style_prompt": "ink wash",
        "backbone": "tiny", "family": "flux", "base_model": "tiny", "recipe": {**asdict(Recipe()), "resolution": 64},
        "sampler": {"name": "style_friendly", "mu": -6.0, "sigma": 3.0, "shift": 3.0},
        "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"], "memory_tier": "bf16", "steps_done": 12,
        "created": "2025-06-01T12:00:00+00:00", "references": ["references/ref_00.png"],
        "captions": [None, "a robot", "a penguin"], "previews": ["previews/step_0012_p0.png"],
        "preview_prompts": ["a robot"], "thumbnail": "thumbnail.png", "final_loss": 0.25,
        "noise_prior": {"file": "noise_prior.safetensors", "kind": "channel", "samples": 3, "shape": [16, 1, 1],
                        "min_std": 0.05},
        "parent": "ink", "round": 2,
        "refine": {"parent_name": "Ink", "mode": "auto", "candidates": 4, "top_k": 2, "style_metric": "clip_i",
                   "synthetic": [{"source": "cand_01.png", "prompt": "a robot", "seed": 1, "style": 0.8, "text": 0.3,
                                  "score": 0.24, "file": "references/ref_01.png"}],
                   "scores": [{"source": "cand_00.png", "prompt": "a cat", "seed": 0, "style": 0.5, "text": 0.2,
                               "score": 0.1}]},
        "job_id": "20250601-120000-train-1a2b3c4d", "imported": True, "source_file": "ink.zip",
        "source_repo": "someone/ink-style",
    }


def test_the_schema_keeps_what_the_studio_writes_and_drops_the_rest():
    from studio.store.template_schema import sanitize

    meta = studio_meta()
    assert sanitize(meta) == meta  # nothing the studio itself writes is lost
    bad = {**meta, "evil": POISON, "name": "two\nlines", "round": "2", "parent": "../up", "created": "yesterday",
           "sampler": "fast", "thumbnail": ".hidden.png", "final_loss": float("nan"), "references": POISON,
           "recipe": {**meta["recipe"], "steps": True, "rank": 10**9, "lr": "0.1", "x": POISON},
           "previews": ["previews/a.png", "/abs.png", "../up.png", "C:/x.png", POISON],
           "captions": ["ok", 3, POISON],
           "refine": {**meta["refine"], "parent_name": POISON, "extra": POISON,
                      "synthetic": [POISON, {**POISON, "prompt": "a cat", "file": "references/ref_02.png"},
                                    {"prompt": "no file", "path": "/etc/hostname"}]}}
    clean = sanitize(bad)
    text = json.dumps(clean)
    assert "gradio.FileData" not in text and "/etc/hostname" not in text and "evil" not in clean
    for key in ("name", "round", "parent", "created", "sampler", "thumbnail", "references", "final_loss"):
        assert key not in clean, key
    assert clean["recipe"] == {k: v for k, v in meta["recipe"].items() if k not in ("steps", "rank", "lr")}
    assert clean["previews"] == ["previews/a.png"] and clean["captions"] == ["ok", None, None]
    assert clean["refine"]["synthetic"] == [{"prompt": "a cat", "file": "references/ref_02.png"}]
    assert "parent_name" not in clean["refine"] and "extra" not in clean["refine"]
    assert sanitize([1, 2]) == {} and sanitize(None) == {}


def test_the_schema_knows_every_recipe_field():
    """template_schema mirrors Recipe without importing torch: a new Recipe field must be added there too."""
    from dataclasses import asdict, fields

    from studio.engine.recipe import Recipe
    from studio.store.template_schema import RECIPE, sanitize

    assert set(RECIPE) == {f.name for f in fields(Recipe)}
    assert sanitize({"recipe": asdict(Recipe())})["recipe"] == asdict(Recipe())  # the defaults are in bounds


def poisoned_zip(store: TemplateStore, tmp_path: Path, **changes) -> Path:
    """An exported template whose template.json was edited: gradio file objects in its lineage and lists."""
    members = template_members(store)
    meta = json.loads(members["template.json"])
    meta.update({"parent": "elsewhere", "round": 2, "evil": POISON, "previews": meta["previews"] + [POISON],
                 "refine": {"mode": "human", "parent_name": "Elsewhere",
                            "synthetic": [POISON, {**POISON, "prompt": "a cat", "file": "references/ref_00.png"}]},
                 **changes})
    members["template.json"] = json.dumps(meta).encode()
    return write_zip(tmp_path / "poisoned.zip", members)


def test_an_imported_template_json_is_reduced_to_the_schema(store, tmp_path):
    info = store.import_file(poisoned_zip(store, tmp_path))
    on_disk = (info.path / "template.json").read_text()
    assert "gradio.FileData" not in on_disk and "/etc/hostname" not in on_disk and '"evil"' not in on_disk
    assert info.meta["refine"]["synthetic"] == [{"prompt": "a cat", "file": "references/ref_00.png"}]
    assert info.meta["previews"] == ["previews/step_0000_p0_s0.png"] and info.meta["round"] == 2
    assert store.get(info.id).meta == info.meta


def test_a_template_already_in_the_store_is_read_through_the_schema(store):
    """A folder written before imports were checked (or edited by hand) is listed with its checked fields only,
    and renaming it keeps the file's other fields on disk."""
    info = add(store, "Old", refine={"mode": "human", "synthetic": [POISON]}, parent="x", round=2, evil=POISON)
    listed = store.list()[0]
    assert "evil" not in listed.meta and listed.meta["refine"] == {"mode": "human", "synthetic": []}
    assert listed.references == [info.path / "references" / "ref_00.png"]
    store.rename(info.id, "Older")
    assert json.loads((info.path / "template.json").read_text())["evil"] == POISON
    assert store.get(info.id).name == "Older" and "evil" not in store.get(info.id).meta


# ------------------------------------------------------------------------------- backbones of imports


def bare_lora(tmp_path: Path, width: int, name: str, metadata=None) -> Path:
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, width),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(width, 4)}
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def test_an_imported_backbone_must_be_allowed(store, tmp_path, monkeypatch):
    """A template naming a folder or any hub repo as its backbone gets the model its LoRA's shapes belong to;
    when the shapes say nothing, the import is refused (a shared studio never loads what an import names)."""
    monkeypatch.delenv("STUDIO_BACKBONES", raising=False)
    monkeypatch.setenv("STUDIO_BACKBONE", "tiny")
    card = {"style_prompt": "ink", "backbone": "/srv/models/anything"}
    tiny_wide = bare_lora(tmp_path, 64, "tiny-wide", {"studio_template": json.dumps(card)})
    assert store.import_file(tiny_wide).backbone == "tiny"
    header_only = bare_lora(tmp_path, 3072, "flux-wide", {"backbone": "someone/any-model"})
    assert store.import_file(header_only).backbone == "flux-dev"

    zipped = poisoned_zip(store, tmp_path, backbone="someone/any-model")  # the test LoRA is 32 wide: no match
    before = snapshot(store)
    with pytest.raises(InputError, match="'someone/any-model' is not one this studio allows.*tiny, flux-dev"):
        store.import_file(zipped)
    assert snapshot(store) == before

    monkeypatch.setenv("STUDIO_BACKBONES", "other/model, someone/any-model")  # the operator allows it
    assert store.import_file(zipped).backbone == "someone/any-model"


# ------------------------------------------------------------------------------- paging


def write_templates(store: TemplateStore, n: int) -> None:
    """``n`` minimal template folders written directly (t000 oldest ... newest)."""
    for i in range(n):
        folder = store.root / f"t{i:03d}"
        folder.mkdir()
        (folder / "lora.safetensors").write_bytes(b"x")  # listing never opens it
        card = {"id": folder.name, "name": f"Style {i}", "style_prompt": f"style number {i}",
                "backbone": "flux-dev", "family": "flux",
                "created": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00",
                "recipe": {"rank": 32}, "references": [f"references/ref_{j:02d}.png" for j in range(10)]}
        (folder / "template.json").write_text(json.dumps(card))


def median_seconds(fn, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def test_the_listing_comes_in_pages_from_parsed_files_cached(store, monkeypatch):
    write_templates(store, 500)
    page = store.page()
    assert page.total == 500 and page.offset == 0 and page.limit == templates.DEFAULT_PAGE_SIZE == 48
    assert [i.id for i in page.items] == [f"t{i:03d}" for i in range(499, 451, -1)]
    last = store.page(offset=480, limit=48)
    assert [i.id for i in last.items] == [f"t{i:03d}" for i in range(19, -1, -1)] and last.total == 500
    assert store.page(limit=1000).limit == templates.MAX_PAGE_SIZE and len(store.page(limit=1000).items) == 200
    assert store.page(offset=1000).items == [] and store.page(offset=2.0, limit=1.0).items[0].id == "t497"
    found = store.page("STYLE NUMBER 42", limit=2)
    assert found.total == sum("42" in str(i) for i in range(500)) and [i.id for i in found.items] == ["t442", "t429"]
    for offset, limit in ((-1, None), (0, -5), ("many", None), (True, None), (0, 1.5)):
        with pytest.raises(InputError, match="whole number"):
            store.page(offset=offset, limit=limit)

    parsed = []
    real_read = templates.read_template_json
    monkeypatch.setattr(templates, "read_template_json", lambda *a: parsed.append(a) or real_read(*a))
    assert median_seconds(store.page) < 0.2  # generous: ~10 ms on a quiet machine
    assert parsed == []  # nothing parsed again: every file is cached by (mtime, size, inode)
    store.rename("t499", "Renamed")
    assert store.page().items[0].name == "Renamed" and len(parsed) >= 1


def test_studio_api_lists_a_page_of_summaries_quickly(tmp_path):
    from studio.api import StudioAPI
    from studio.jobs.jobs import Jobs

    jobs = Jobs(tmp_path / "data")
    try:
        write_templates(jobs.store, 500)
        api = StudioAPI(jobs)
        page = api.templates()
        assert page["total"] == 500 and len(page["templates"]) == 48 and page["offset"] == 0
        first = page["templates"][0]
        assert set(first) == {"id", "name", "style_prompt", "backbone", "family", "created", "thumbnail", "imported",
                              "round", "parent"}
        assert first["id"] == "t499" and first["thumbnail"] is None
        assert [t["id"] for t in api.templates("style number 42", 1, 2)["templates"]] == ["t429", "t428"]
        assert median_seconds(api.templates) < 0.2
        assert len(api.template_list()) == 500
    finally:
        jobs.queue.close()
