"""LoRAs that load right everywhere and LoRAs from everywhere (issue 14), on full-size FLUX.1-dev shapes.

Exports of a rank-32, alpha-16 template must give the template's deltas (0.5 * B @ A) through ComfyUI's
rule and through diffusers' loader; imports from other tools must give the source file's deltas through
diffusers' loader. Shapes come from FLUX.1-dev's transformer on the meta device; only a handful of modules
get tensors, and deltas are compared through random probes (``B @ (A @ P)``) to stay small.

ComfyUI's rule, transcribed (comfy/lora.py): a module's change is ``up @ down * alpha / rank``, ``alpha``
read from the ``<module>.alpha`` tensor, ``rank`` when there is none; the header (``lora_adapter_metadata``)
is not read. Diffusers-format ``transformer.<path>`` keys map onto ComfyUI's fused layers at their offsets.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.errors import InputError
from studio.store import lora_keys, lora_shapes
from studio.store.templates import TemplateStore

RANK, ALPHA = 32, 16
SCALE = ALPHA / RANK
H = 3072
MODULES = (
    [f"transformer_blocks.0.attn.{t}" for t in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out")]
    + ["transformer_blocks.18.ff.net.0.proj", "transformer_blocks.18.norm1_context.linear"]
    + [f"single_transformer_blocks.0.{t}" for t in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")]
    + ["single_transformer_blocks.37.attn.to_q", "single_transformer_blocks.37.attn.to_v",  # no to_k: padded
       "single_transformer_blocks.37.norm.linear", "proj_out", "norm_out.linear"]
)
ADAPTER = json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.use_rslora": False})


def shapes() -> dict[str, tuple[int, int]]:
    return lora_shapes.linear_shapes("flux-dev")


def make_state(modules=MODULES, rank=RANK, seed=0) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA on ``modules`` at FLUX.1-dev's shapes (small random values)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        out_f, in_f = shapes()[m]
        state[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.05
        state[f"transformer.{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.05
    return state


@pytest.fixture(scope="module")
def probes() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return {w: torch.randn(w, 3, generator=gen, dtype=torch.float64) for w in sorted({i for _, i in shapes().values()})}


def diffusers_probe(state, probes, scales=None) -> dict[str, torch.Tensor]:
    """module -> scale * B @ (A @ P) of a diffusers-format state dict (keys with or without ``transformer.``)."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")].removeprefix("transformer.")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            s = (scales or {}).get(module, 1.0)
            delta = s * (b.double() @ (a.double() @ probes[a.shape[1]]))
            if delta.abs().max() > 0:  # a zero B (a padded piece loaded as its own LoRA) changes nothing
                out[module] = delta
    return out


def comfy_probe(state, probes) -> dict[str, torch.Tensor]:
    """ComfyUI's rule on kohya keys, each fused layer's change split into the diffusers modules it holds."""
    table = {m.kohya: m for m in lora_keys.module_table("flux")}
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[:-len(".lora_down.weight")]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
        up = state[f"{name}.lora_up.weight"].double()
        delta = alpha / down.shape[0] * (up @ (down.double() @ probes[down.shape[1]]))
        entry = table[name]
        if entry.swap == "always":  # original rows: shift, scale; diffusers: scale, shift
            first, second = delta.chunk(2)
            delta = torch.cat([second, first])
        rows = [shapes()[t][0] for t in entry.targets]
        for target, piece in zip(entry.targets, delta.split(rows), strict=True):
            if piece.abs().max() > 0:
                out[target] = piece
    return out


def assert_same(got: dict, want: dict, rtol=1e-5, atol=1e-6):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=rtol, atol=atol * float(want[m].abs().max()), msg=m)


def peft_scales(metadata: dict, state) -> dict[str, float]:
    """PEFT's scale per module, transcribed: ``lora_alpha / r`` (``alpha_pattern`` wins), from the
    adapter config diffusers hands to peft (``lora_state_dict(..., return_lora_metadata=True)``)."""
    config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    scales = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")].removeprefix("transformer.")
            alpha = (config.get("alpha_pattern") or {}).get(module, config.get("lora_alpha", a.shape[0]))
            scales[module] = alpha / config.get("rank_pattern", {}).get(module, config.get("r", a.shape[0]))
    return scales


def diffusers_load(path):
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FluxLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)


def png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 40, 40)).save(path)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A stored FLUX.1-dev template trained with rank 32 and alpha 16 (as training writes it)."""
    store = TemplateStore(tmp_path_factory.mktemp("store"))
    staging = store.new_staging()
    state = make_state()
    save_file(state, str(staging / "lora.safetensors"), metadata={"lora_adapter_metadata": ADAPTER})
    png(staging / "references" / "ref_00.png")
    png(staging / "references" / "ref_01.png")
    card = {"format_version": 1, "style_prompt": "watercolor painting", "backbone": "flux-dev", "family": "flux",
            "recipe": {"rank": RANK, "alpha": ALPHA, "resolution": 512}, "steps_done": 300,
            "created": "2025-06-01T12:00:00+00:00", "captions": ["a cat", None],
            "references": ["references/ref_00.png", "references/ref_01.png"]}
    (staging / "template.json").write_text(json.dumps(card))
    info = store.create(staging, "Watercolor")
    return store, info, state


# ------------------------------------------------------------------------------- exports


def test_diffusers_export_gives_the_template_strength_in_comfyui_and_diffusers(template, probes, tmp_path):
    store, info, state = template
    want = diffusers_probe(state, probes, {m: SCALE for m in MODULES})
    path = store.export_safetensors(info.id, tmp_path)
    exported = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in exported)
    assert_same(diffusers_probe(exported, probes), want)  # ComfyUI: no alpha tensor -> scale 1
    theirs, metadata = diffusers_load(path)
    assert metadata["transformer.lora_alpha"] == metadata["transformer.r"] == RANK
    assert_same(diffusers_probe(theirs, probes, peft_scales(metadata, theirs)), want)
    with safe_open(str(info.path / "lora.safetensors"), "pt") as f:
        assert f.metadata()["lora_adapter_metadata"] == ADAPTER


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_comfy_export_gives_the_template_strength_in_comfyui_and_diffusers(template, probes, tmp_path, precision):
    store, info, state = template
    want = diffusers_probe(state, probes, {m: SCALE for m in MODULES})
    path = store.export_comfy(info.id, tmp_path, precision)
    kohya = load_file(str(path))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {t.dtype for k, t in kohya.items() if not k.endswith(".alpha")} == {dtype}
    for key, t in kohya.items():  # alpha = rank everywhere: no tool can get the scale wrong
        if key.endswith(".alpha"):
            assert float(t) == kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
    tol = {"rtol": 2e-2, "atol": 2e-2} if precision == "bf16" else {}
    assert_same(comfy_probe(kohya, probes), want, **tol)
    theirs, _ = diffusers_load(path)  # diffusers' kohya converter (drops the final layer's alpha)
    theirs = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in theirs.items()}
    assert_same(diffusers_probe(theirs, probes), want, **tol)
    assert "lora_unet_single_blocks_37_linear1.lora_up.weight" in kohya  # to_k padded: diffusers needs every row
    assert kohya["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (3 * H + 4 * H, 2 * RANK)


def test_bf16_is_the_default_and_half_the_size(template, tmp_path):
    store, info, _ = template
    small = store.export_comfy(info.id, tmp_path / "a")
    big = store.export_comfy(info.id, tmp_path / "b", "fp32")
    assert small.stat().st_size < 0.55 * big.stat().st_size
    with pytest.raises(InputError, match="unknown export precision 'fp8'"):
        store.export_comfy(info.id, tmp_path, "fp8")


def kohya_version(header) -> str | None:
    """sd-scripts / A1111 / Forge: ``ss_base_model_version`` starts with ``flux`` or ``sd3``."""
    version = header.get("ss_base_model_version", "")
    return "flux" if version.startswith("flux") else "sd3" if version.startswith("sd3") else None


def modelspec_version(header) -> str | None:
    """ComfyUI / SwarmUI model spec: ``modelspec.architecture`` starts with ``flux-1`` or ``stable-diffusion-3``
    (``stable-diffusion-v3`` in older files)."""
    arch = header.get("modelspec.architecture", "")
    if arch.startswith("flux-1"):
        return "flux"
    return "sd3" if arch.startswith(("stable-diffusion-3", "stable-diffusion-v3")) else None


def test_exports_carry_the_metadata_other_tools_read(template, tmp_path):
    store, info, _ = template
    for path in (store.export_safetensors(info.id, tmp_path), store.export_comfy(info.id, tmp_path)):
        with safe_open(str(path), "pt") as f:
            header = f.metadata()
        assert header["ss_network_module"] == "networks.lora_flux"
        assert header["ss_network_dim"] == header["ss_network_alpha"] == str(RANK)
        assert header["ss_base_model_version"] == "flux1" and header["ss_output_name"] == "Watercolor"
        assert header["ss_resolution"] == "(512, 512)" and header["ss_steps"] == "300"
        assert "watercolor painting" in header["ss_training_comment"]
        tags = json.loads(header["ss_tag_frequency"])
        assert tags == {"2_watercolor painting": {"in watercolor painting style": 2, "a cat": 1, "an image": 1}}
        assert header["modelspec.sai_model_spec"] == "1.0.0"
        assert header["modelspec.architecture"] == "flux-1-dev/lora"
        assert header["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
        assert header["modelspec.title"] == "Watercolor"
        assert header["modelspec.trigger_phrase"] == "in watercolor painting style"
        assert header["modelspec.resolution"] == "512x512" and header["modelspec.date"] == "2025-06-01"
        assert json.loads(header["studio_template"])["name"] == "Watercolor"
        assert kohya_version(header) == modelspec_version(header) == "flux"


def test_an_sd3_export_is_classified_as_sd3(tmp_path):
    store = TemplateStore(tmp_path / "store")
    staging = store.new_staging()
    sd3 = lora_shapes.linear_shapes("sd3.5-large")
    gen = torch.Generator().manual_seed(1)
    state = {}
    for m in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
        state[f"transformer.{m}.lora_A.weight"] = torch.randn(4, sd3[m][1], generator=gen)
        state[f"transformer.{m}.lora_B.weight"] = torch.randn(sd3[m][0], 4, generator=gen)
    save_file(state, str(staging / "lora.safetensors"))
    (staging / "template.json").write_text(json.dumps({"style_prompt": "ink", "backbone": "sd3.5-large",
                                                       "family": "sd3"}))
    info = store.create(staging, "Ink")
    for path in (store.export_safetensors(info.id, tmp_path), store.export_comfy(info.id, tmp_path)):
        with safe_open(str(path), "pt") as f:
            header = f.metadata()
        assert header["modelspec.architecture"] == "stable-diffusion-3-large/lora"
        assert kohya_version(header) == modelspec_version(header) == "sd3"


# ------------------------------------------------------------------------------- imports


def import_file(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    store = TemplateStore(tmp_path / f"store-{path.stem}")
    info = store.import_file(path)
    return path, info, load_file(str(info.path / "lora.safetensors"))


def to_kohya(state, alpha):
    """A kohya/sd-scripts file of ``state`` (our converter, checked against diffusers' in test_lora_formats),
    then with sd-scripts' own alpha: fused modules get ``alpha`` and the up matrices compensate."""
    from studio.store import lora_formats

    kohya = lora_formats.diffusers_to_kohya(state, "flux")
    for key in [k for k in kohya if k.endswith(".alpha")]:
        up = key.replace(".alpha", ".lora_up.weight")
        kohya[up] = kohya[up] * (float(kohya[key]) / alpha)
        kohya[key] = torch.tensor(float(alpha))
    return kohya


def test_import_kohya_with_a_text_encoder_part(tmp_path, probes):
    state = make_state(seed=2)
    kohya = to_kohya(state, alpha=8.0)
    gen = torch.Generator().manual_seed(3)
    for name in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        kohya[f"{name}.lora_down.weight"] = torch.randn(4, 768, generator=gen)
        kohya[f"{name}.lora_up.weight"] = torch.randn(768 if "q_proj" in name else 3072, 4, generator=gen)
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    path, info, stored = import_file(tmp_path, "kohya_te.safetensors", kohya)
    assert info.backbone == "flux-dev" and info.family == "flux"
    assert info.meta["import_notes"] and "text-encoder part" in info.meta["import_notes"][0]
    ours = diffusers_probe(stored, probes)
    assert_same(ours, comfy_probe({k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, probes), rtol=1e-4)
    assert_same(ours, diffusers_probe(state, probes), rtol=1e-4)
    theirs, _ = diffusers_load(path)
    theirs = {k: v for k, v in theirs.items() if not k.startswith("text_encoder")}
    theirs = diffusers_probe({k if k.startswith("transformer.") else f"transformer.{k}": v
                              for k, v in theirs.items()}, probes)
    # diffusers' kohya converter drops the final layer's alpha (8 here, rank 32): proj_out and norm_out come
    # back 4x too strong there; every other module must match it
    final = {"proj_out", "norm_out.linear"}
    torch.testing.assert_close(theirs["proj_out"], RANK / 8 * ours["proj_out"])
    assert_same({m: d for m, d in theirs.items() if m not in final}, {m: d for m, d in ours.items() if m not in final},
                rtol=1e-4)


def test_import_xlabs_through_diffusers_converter(tmp_path, probes):
    gen = torch.Generator().manual_seed(4)
    xlabs = {}
    for i in (0, 18):
        for part, rows in (("qkv_lora1", 3 * H), ("proj_lora1", H), ("qkv_lora2", 3 * H), ("proj_lora2", H)):
            xlabs[f"double_blocks.{i}.processor.{part}.down.weight"] = torch.randn(16, H, generator=gen) * 0.05
            xlabs[f"double_blocks.{i}.processor.{part}.up.weight"] = torch.randn(rows, 16, generator=gen) * 0.05
    path, info, stored = import_file(tmp_path, "xlabs.safetensors", xlabs)
    assert info.backbone == "flux-dev"
    theirs, _ = diffusers_load(path)
    assert len(diffusers_probe(theirs, probes)) == 16  # q, k, v, out for image and text, 2 blocks
    assert_same(diffusers_probe(stored, probes), diffusers_probe(theirs, probes))


def onetrainer(state, alpha) -> dict[str, torch.Tensor]:
    """OneTrainer's names: ``lora_transformer_<diffusers path, dots -> underscores>``, kohya parts, an alpha."""
    out = {}
    for key, t in state.items():
        module = key.removeprefix("transformer.").rsplit(".", 2)[0]
        name = "lora_transformer_" + module.replace(".", "_")
        if key.endswith(".lora_A.weight"):
            out[f"{name}.lora_down.weight"] = t
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        else:
            out[f"{name}.lora_up.weight"] = t
    return out


def test_import_onetrainer(tmp_path, probes):
    state = make_state(seed=5)
    path, info, stored = import_file(tmp_path, "onetrainer.safetensors", onetrainer(state, alpha=8))
    want = diffusers_probe(state, probes, {m: 8 / RANK for m in MODULES})  # alpha / rank, as ComfyUI applies it
    assert_same(diffusers_probe(stored, probes), want)
    # diffusers' converter maps OneTrainer's attention modules and proj_out; other modules inside a block
    # (proj_mlp, ff, norms) it names after the block alone, so only these are compared with it
    theirs, _ = diffusers_load(path)
    theirs = diffusers_probe(theirs, probes)
    mapped = {m for m in MODULES if ".attn." in m or m == "proj_out"}
    assert mapped <= set(theirs)
    assert_same({m: theirs[m] for m in mapped}, {m: want[m] for m in mapped})


def test_import_peft_base_model_names(tmp_path, probes):
    state = make_state(seed=6)
    peft = {"base_model.model." + k.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.default.weight"): v
            for k, v in state.items()}
    _, info, stored = import_file(tmp_path, "peft.safetensors", peft)
    assert info.backbone == "flux-dev"
    assert_same(diffusers_probe(stored, probes), diffusers_probe(state, probes))
    # PEFT keys on the original (BFL) layout, as fal's trainers write them
    originals = {m.kohya: m.original for m in lora_keys.module_table("flux")}
    parts = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    bfl = {}
    for key, t in to_kohya(state, RANK).items():
        name, part = key.split(".", 1)
        bfl[f"base_model.model.{originals[name]}.{parts[part]}"] = t
    _, _, stored = import_file(tmp_path, "peft_bfl.safetensors", bfl)
    assert_same(diffusers_probe(stored, probes), diffusers_probe(state, probes), rtol=1e-4)


# ------------------------------------------------------------------------------- refusals


def refused(tmp_path, tensors, needle, metadata=None):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    store = TemplateStore(tmp_path / "refusing")
    with pytest.raises(InputError, match=needle) as err:
        store.import_file(path)
    assert "\n" not in str(err.value) and str(err.value).startswith("bad.safetensors")
    assert store.list() == []
    return str(err.value)


@pytest.mark.parametrize("algorithm,keys", [
    ("LoKr", ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2")),
    ("LoHa", ("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a", "lora_unet_double_blocks_0_img_attn_qkv.hada_w1_b")),
    ("LyCORIS", ("lycoris_transformer_blocks_0_attn_to_q.oft_blocks",)),
])
def test_lycoris_formats_are_named(tmp_path, algorithm, keys):
    message = refused(tmp_path, {k: torch.zeros(4, 4) for k in keys}, f"{algorithm}.* is not supported")
    assert "not a known" not in message


def test_a_width_no_backbone_has_is_refused(tmp_path):
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 1024),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(1024, 4)}
    refused(tmp_path, state, re.escape("match no known FLUX backbone: transformer_blocks.0.attn.to_q is 1024 -> "
                                       "1024 here (tiny 64 -> 64; FLUX.1-dev 3072 -> 3072)"))


def test_right_width_wrong_layer_is_refused(tmp_path):
    state = make_state(["transformer_blocks.0.attn.to_q"])
    state["transformer.proj_out.lora_A.weight"] = torch.randn(RANK, H)
    state["transformer.proj_out.lora_B.weight"] = torch.randn(32, RANK)  # FLUX.1-dev's proj_out has 64 rows
    refused(tmp_path, state, re.escape("proj_out is 3072 -> 32 here, FLUX.1-dev's is 3072 -> 64"))


def test_schnell_is_refused(tmp_path):
    refused(tmp_path, make_state(["transformer_blocks.0.attn.to_q"]), "FLUX.1-schnell LoRA.*no schnell backbone",
            metadata={"modelspec.architecture": "flux-1-schnell/lora"})


def test_a_text_encoder_only_lora_is_refused(tmp_path):
    refused(tmp_path, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
                       "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)},
            "only a text-encoder LoRA")


# ------------------------------------------------------------------------------- names


def test_a_bare_file_takes_its_own_names(tmp_path):
    state = make_state(["transformer_blocks.0.attn.to_q"])
    _, info, _ = import_file(tmp_path, "x1.safetensors", state,
                             {"ss_output_name": "Inky", "modelspec.trigger_phrase": "in ink wash style"})
    assert info.name == "Inky" and info.style_prompt == "ink wash"
    tags = json.dumps({"10_sketch": {"pencil sketch": 10, "a dog": 3, "hatching": 10, "a cat": 2}})
    _, info, _ = import_file(tmp_path, "x2.safetensors", state,
                             {"modelspec.title": "Sketchy", "ss_tag_frequency": tags})
    assert info.name == "Sketchy" and info.style_prompt == "pencil sketch, hatching"
    _, info, _ = import_file(tmp_path, "plain_file.safetensors", state)
    assert info.name == "plain_file" and info.style_prompt == ""


def test_our_export_without_its_card_comes_back_by_its_metadata(template, tmp_path):
    store, info, _ = template
    path = store.export_comfy(info.id, tmp_path)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = {k: v for k, v in f.metadata().items() if k != "studio_template"}  # e.g. re-saved by a tool
    _, back, _ = import_file(tmp_path, "renamed.safetensors", tensors, header)
    assert back.name == "Watercolor" and back.style_prompt == "watercolor painting" and back.backbone == "flux-dev"


# ------------------------------------------------------------------------------- CLI


def test_store_option_after_the_subcommand(tmp_path, capsys):
    from studio.cli import main

    store = TemplateStore(tmp_path / "s")
    staging = store.new_staging()
    save_file(make_state(["transformer_blocks.0.attn.to_q"]), str(staging / "lora.safetensors"))
    (staging / "template.json").write_text(json.dumps({"style_prompt": "ink", "backbone": "flux-dev"}))
    store.create(staging, "Ink")
    assert main(["templates", "list", "--store", str(store.root)]) == 0
    assert capsys.readouterr().out.startswith("ink\tInk\tink")
    assert main(["--store", str(tmp_path / "empty"), "templates", "list"]) == 0
    assert capsys.readouterr().out == ""
