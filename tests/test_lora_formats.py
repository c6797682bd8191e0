"""LoRA key formats: diffusers <-> kohya/ComfyUI conversion checked on weight deltas, against
diffusers' own converters (kohya LoRA loader, original-checkpoint loader), and file validation."""

from __future__ import annotations

import json
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from studio.errors import InputError
from studio.store import lora_files, lora_keys
from studio.store import lora_formats as lf

# The paper's LoRA targets (studio/backbones/flux.py, sd3.py), matched like peft does: by suffix.
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp", "proj_out")
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SMALL_FLUX = dict(num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=32, pooled_projection_dim=32, in_channels=16, axes_dims_rope=(2, 2, 4),
                  guidance_embeds=True)


def linear_shapes(family: str, **config) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear of a real diffusers transformer, built on the meta device."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls(**config)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def make_lora(shapes, targets=None, rank=4, seed=0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_f, in_f) in shapes.items():
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen).to(dtype)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen).to(dtype)
    return state


def diffusers_deltas(state) -> dict[str, torch.Tensor]:
    """module -> B @ A (scale 1)."""
    return {k[len("transformer."):-len(".lora_A.weight")]: state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith(".lora_A.weight")}


def kohya_deltas(state) -> dict[str, torch.Tensor]:
    """kohya module -> alpha / rank * up @ down."""
    out = {}
    for k in state:
        if k.endswith(".lora_down.weight"):
            name = k[:-len(".lora_down.weight")]
            down, up = state[k], state[f"{name}.lora_up.weight"]
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
            out[name] = alpha / down.shape[0] * up @ down
    return out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


@pytest.fixture(scope="module")
def small_flux():
    shapes = linear_shapes("flux", **SMALL_FLUX)
    return shapes, make_lora(shapes, FLUX_TARGETS)


# ------------------------------------------------------------------------------- FLUX


def test_paper_targets_give_the_expected_keys(small_flux):
    _, state = small_flux
    modules = set(diffusers_deltas(state))
    expected = {f"transformer_blocks.{i}.attn.{t}" for i in range(2) for t in
                ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    expected |= {f"single_transformer_blocks.{i}.{t}" for i in range(2) for t in
                 ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")}
    assert modules == expected | {"proj_out"}
    assert lora_keys.analyse(state) == ("diffusers", "flux")


def test_flux_to_kohya_covers_every_key_with_comfy_names(small_flux):
    _, state = small_flux
    kohya = lf.diffusers_to_kohya(state, "flux")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    expected = {f"lora_unet_double_blocks_{i}_{m}" for i in range(2) for m in ("img_attn_qkv", "img_attn_proj",
                                                                               "txt_attn_qkv")}
    expected |= {f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2")}
    expected |= {"lora_unet_final_layer_linear"}
    assert names == expected
    for name in names:  # each module: down, up and a scalar alpha = its rank (our alpha = rank)
        down, up, alpha = (kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"],
                           kohya[f"{name}.alpha"])
        assert alpha.ndim == 0 and alpha.dtype == torch.float32 and float(alpha) == down.shape[0]
        assert up.shape[1] == down.shape[0]
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)  # rank 3 x 4
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 16)
    # every diffusers module is represented by exactly one kohya module of the table
    table = {t: m.kohya for m in lora_keys.module_table("flux") for t in m.targets}
    assert {table[m] for m in diffusers_deltas(state)} == names


def test_fused_deltas_equal_the_stacked_separate_deltas(small_flux):
    _, state = small_flux
    ours = diffusers_deltas(state)
    fused = kohya_deltas(lf.diffusers_to_kohya(state, "flux"))
    for i in range(2):
        b = f"transformer_blocks.{i}.attn"
        torch.testing.assert_close(fused[f"lora_unet_double_blocks_{i}_img_attn_qkv"],
                                   torch.cat([ours[f"{b}.to_q"], ours[f"{b}.to_k"], ours[f"{b}.to_v"]]))
        torch.testing.assert_close(fused[f"lora_unet_double_blocks_{i}_txt_attn_qkv"],
                                   torch.cat([ours[f"{b}.add_q_proj"], ours[f"{b}.add_k_proj"],
                                              ours[f"{b}.add_v_proj"]]))
        torch.testing.assert_close(fused[f"lora_unet_double_blocks_{i}_img_attn_proj"], ours[f"{b}.to_out.0"])
        s = f"single_transformer_blocks.{i}"
        torch.testing.assert_close(fused[f"lora_unet_single_blocks_{i}_linear1"],
                                   torch.cat([ours[f"{s}.attn.to_q"], ours[f"{s}.attn.to_k"],
                                              ours[f"{s}.attn.to_v"], ours[f"{s}.proj_mlp"]]))
        torch.testing.assert_close(fused[f"lora_unet_single_blocks_{i}_linear2"], ours[f"{s}.proj_out"])
    torch.testing.assert_close(fused["lora_unet_final_layer_linear"], ours["proj_out"])


def test_round_trip_reproduces_the_lora_exactly(small_flux):
    _, state = small_flux
    back = lf.kohya_to_diffusers(lf.diffusers_to_kohya(state, "flux"), "flux")
    assert set(back) == set(state)
    for k in state:  # block-diagonal fused LoRAs split back into the original rank-4 pieces
        assert torch.equal(back[k], state[k]), k


def test_every_linear_layer_converts_including_swapped_final_norm():
    shapes = linear_shapes("flux", **SMALL_FLUX)
    state = make_lora(shapes, rank=3, seed=1)  # every Linear of the transformer
    assert len(diffusers_deltas(state)) == len(shapes)
    assert set(diffusers_deltas(state)) <= lora_keys.diffusers_modules("flux")
    kohya = lf.diffusers_to_kohya(state, "flux")
    ours, fused = diffusers_deltas(state), kohya_deltas(kohya)
    torch.testing.assert_close(fused["lora_unet_final_layer_adaLN_modulation_1"],
                               swap_halves(ours["norm_out.linear"]))
    torch.testing.assert_close(fused["lora_unet_double_blocks_0_img_mod_lin"],
                               ours["transformer_blocks.0.norm1.linear"])
    torch.testing.assert_close(fused["lora_unet_txt_in"], ours["context_embedder"])
    torch.testing.assert_close(fused["lora_unet_guidance_in_out_layer"],
                               ours["time_text_embed.guidance_embedder.linear_2"])
    back = lf.kohya_to_diffusers(kohya, "flux")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_partial_fused_module_pads_missing_pieces():
    shapes = linear_shapes("flux", **SMALL_FLUX)
    state = make_lora(shapes, ("attn.to_q", "attn.to_v", "proj_mlp"), rank=2, seed=2)
    kohya = lf.diffusers_to_kohya(state, "flux")
    ours, fused = diffusers_deltas(state), kohya_deltas(kohya)
    zeros = torch.zeros(32, 32)
    b, s = "transformer_blocks.0.attn", "single_transformer_blocks.0"
    torch.testing.assert_close(fused["lora_unet_double_blocks_0_img_attn_qkv"],
                               torch.cat([ours[f"{b}.to_q"], zeros, ours[f"{b}.to_v"]]))
    torch.testing.assert_close(fused["lora_unet_single_blocks_0_linear1"],
                               torch.cat([ours[f"{s}.attn.to_q"], zeros, ours[f"{s}.attn.to_v"],
                                          ours[f"{s}.proj_mlp"]]))
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 6  # 3 pieces x rank 2
    back = lf.kohya_to_diffusers(kohya, "flux")
    assert set(back) == set(state)  # the uncovered to_k does not come back as a zero LoRA


def test_scale_other_than_one_goes_into_alpha():
    shapes = linear_shapes("flux", **SMALL_FLUX)
    state = make_lora(shapes, FLUX_TARGETS, rank=4, seed=3)
    kohya = lf.diffusers_to_kohya(state, "flux", scale=0.5)  # e.g. lora_alpha 2 on rank 4
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0
    assert float(kohya["lora_unet_single_blocks_0_linear2.alpha"]) == 2.0
    fused, ours = kohya_deltas(kohya), diffusers_deltas(state)
    torch.testing.assert_close(fused["lora_unet_single_blocks_0_linear2"],
                               0.5 * ours["single_transformer_blocks.0.proj_out"])
    back = diffusers_deltas(lf.kohya_to_diffusers(kohya, "flux"))
    for m in ours:
        torch.testing.assert_close(back[m], 0.5 * ours[m])


def test_dense_kohya_lora_splits_exactly_and_matches_diffusers():
    """Another trainer's fused LoRA: dense up, alpha != rank, ComfyUI's dotted key form too."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    gen = torch.Generator().manual_seed(4)
    h, rank = 32, 6
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, h, generator=gen),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * h, rank, generator=gen),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0),
        "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight": torch.randn(rank, h, generator=gen),
        "lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight": torch.randn(h, rank, generator=gen),
        "lora_unet_double_blocks_0_txt_attn_proj.alpha": torch.tensor(12.0),
    }
    fused = kohya_deltas(kohya)
    ours = diffusers_deltas(lf.kohya_to_diffusers(kohya, "flux"))
    q, k, v = fused["lora_unet_double_blocks_0_img_attn_qkv"].chunk(3)
    b = "transformer_blocks.0.attn"
    torch.testing.assert_close(ours[f"{b}.to_q"], q)
    torch.testing.assert_close(ours[f"{b}.to_v"], v)
    torch.testing.assert_close(ours[f"{b}.to_add_out"], fused["lora_unet_double_blocks_0_txt_attn_proj"])
    theirs = diffusers_deltas(_convert_kohya_flux_lora_to_diffusers(dict(kohya)))
    assert set(theirs) == set(ours)
    for m in ours:
        torch.testing.assert_close(ours[m], theirs[m])
    comfy = {k.replace("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv"): t
             for k, t in kohya.items()}
    assert lora_keys.analyse(comfy) == ("kohya", "flux")
    for m, d in diffusers_deltas(lf.kohya_to_diffusers(comfy, "flux")).items():
        torch.testing.assert_close(d, ours[m])


def _probe(widths, k=6, seed=5):
    """Random right-hand sides per input width: deltas are compared as delta @ P (cheap, exact)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(n, k, generator=gen, dtype=torch.float64) for n in sorted(set(widths))}


def test_full_size_flux_kohya_output_loads_in_diffusers_with_the_same_deltas():
    """diffusers' own kohya loader (FluxPipeline.lora_state_dict) reads our export: same deltas.

    Full-size widths (3072) because diffusers hardcodes FLUX's linear1 split; deltas are
    compared through random probes (B @ (A @ P)) to stay small.
    """
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    shapes = linear_shapes("flux", num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = make_lora(shapes, FLUX_TARGETS, rank=4, seed=6)
    state.update(make_lora({"norm_out.linear": shapes["norm_out.linear"]}, rank=4, seed=7))
    kohya = lf.diffusers_to_kohya(state, "flux")
    theirs = FluxLoraLoaderMixin.lora_state_dict(dict(kohya))
    # diffusers' converter names the final layer's modules without the "transformer." prefix
    theirs = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in theirs.items()}
    assert set(theirs) == set(state)
    probes = _probe([a.shape[1] for k, a in state.items() if k.endswith("lora_A.weight")])
    for key in state:
        if key.endswith(".lora_A.weight"):
            bkey = key.replace("lora_A", "lora_B")
            p = probes[state[key].shape[1]]
            expected = state[bkey].double() @ (state[key].double() @ p)
            got = theirs[bkey].double() @ (theirs[key].double() @ p)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            assert theirs[key].shape == state[key].shape  # it recovers the rank-4 pieces too


class Checkpoint(dict):
    """An original-format checkpoint for diffusers' single-file converters: the LoRA's deltas
    (as delta @ P probes) under their kohya names mapped back to dotted original keys; any
    other key the converter asks for (biases, norms, frozen layers) gets a dummy tensor."""

    DUMMY = 3 * 3072 + 12288  # splits like FLUX's linear1 and halves/thirds evenly

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(self.DUMMY)

    def __missing__(self, key):
        return torch.zeros(self.DUMMY)


def original_checkpoint(kohya, originals, probes) -> Checkpoint:
    ckpt = Checkpoint()
    for name, delta_fn in kohya_probe_deltas(kohya, probes).items():
        ckpt[originals[name] + ".weight"] = delta_fn
    return ckpt


def kohya_probe_deltas(kohya, probes):
    out = {}
    for k in kohya:
        if k.endswith(".lora_down.weight"):
            name = k[:-len(".lora_down.weight")]
            down, up = kohya[k].double(), kohya[f"{name}.lora_up.weight"].double()
            out[name] = float(kohya[f"{name}.alpha"]) / down.shape[0] * up @ (down @ probes[down.shape[1]])
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_names_and_layout_match_diffusers_original_checkpoint_converter(family):
    """ComfyUI loads ``lora_unet_<original key, dots -> underscores>``. Feeding our fused deltas
    under those original keys to diffusers' original->diffusers checkpoint converter must use
    every key (the names exist) and give back each diffusers module's own delta (q/k/v order,
    linear1 split, shift/scale swaps are right)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    if family == "flux":
        shapes = linear_shapes("flux", num_layers=2, num_single_layers=2, guidance_embeds=True)
        convert = convert_flux_transformer_checkpoint_to_diffusers
    else:  # SD3.5 Medium-like: dual attention in block 0; block 1 is context_pre_only
        shapes = linear_shapes("sd3", num_layers=2, dual_attention_layers=(0,), attention_head_dim=16,
                               num_attention_heads=4, caption_projection_dim=64, joint_attention_dim=64,
                               pooled_projection_dim=32)
        convert = convert_sd3_transformer_checkpoint_to_diffusers
    state = make_lora(shapes, rank=3, seed=8)  # every Linear layer
    kohya = lf.diffusers_to_kohya(state, family)
    originals = {m.kohya: m.original for m in lora_keys.module_table(family)}
    assert all(m.kohya == "lora_unet_" + m.original.replace(".", "_") for m in lora_keys.module_table(family))
    probes = _probe([a.shape[1] for k, a in state.items() if k.endswith("lora_A.weight")])
    ckpt = original_checkpoint(kohya, originals, probes)
    n_keys = len(ckpt)
    converted = convert(ckpt)
    assert len(ckpt) == 0, f"keys diffusers does not know: {sorted(ckpt)}"
    assert n_keys == len({k for k in kohya if k.endswith(".lora_down.weight")})
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key[len("transformer."):-len(".lora_A.weight")]
            a, b = state[key].double(), state[key.replace("lora_A", "lora_B")].double()
            expected = b @ (a @ probes[a.shape[1]])
            torch.testing.assert_close(converted[module + ".weight"], expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- SD3


def test_sd3_paper_targets_round_trip():
    shapes = linear_shapes("sd3", num_layers=3, attention_head_dim=8, num_attention_heads=4,
                           caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32)
    state = make_lora(shapes, SD3_TARGETS, rank=4, seed=9)
    assert "transformer.transformer_blocks.2.attn.to_add_out.lora_A.weight" not in state  # context_pre_only
    assert lora_keys.analyse(state, family_hint="sd3") == ("diffusers", "sd3")
    kohya = lf.diffusers_to_kohya(state, "sd3")
    names = {k.split(".")[0] for k in kohya}
    assert names == ({f"lora_unet_joint_blocks_{i}_{s}_block_attn_{p}" for i in range(3) for s in ("x", "context")
                      for p in ("qkv", "proj")} - {"lora_unet_joint_blocks_2_context_block_attn_proj"})
    ours, fused = diffusers_deltas(state), kohya_deltas(kohya)
    b = "transformer_blocks.1.attn"
    torch.testing.assert_close(fused["lora_unet_joint_blocks_1_context_block_attn_qkv"],
                               torch.cat([ours[f"{b}.add_q_proj"], ours[f"{b}.add_k_proj"], ours[f"{b}.add_v_proj"]]))
    torch.testing.assert_close(fused["lora_unet_joint_blocks_1_x_block_attn_proj"], ours[f"{b}.to_out.0"])
    assert float(kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 12
    back = lf.kohya_to_diffusers(kohya, "sd3")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_sd3_last_context_norm_is_swapped_only_in_the_last_block():
    shapes = linear_shapes("sd3", num_layers=2, attention_head_dim=8, num_attention_heads=4,
                           caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32)
    state = make_lora({k: v for k, v in shapes.items() if "norm1_context" in k}, rank=2, seed=10)
    fused, ours = kohya_deltas(lf.diffusers_to_kohya(state, "sd3")), diffusers_deltas(state)
    torch.testing.assert_close(fused["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"],
                               ours["transformer_blocks.0.norm1_context.linear"])
    torch.testing.assert_close(fused["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"],
                               swap_halves(ours["transformer_blocks.1.norm1_context.linear"]))


def test_family_detection():
    flux_only = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(2, 8),
                 "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(32, 2)}
    assert lora_keys.analyse(flux_only, family_hint="sd3")[1] == "flux"
    sd3_only = {"transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.zeros(2, 8),
                "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight": torch.zeros(8, 2)}
    assert lora_keys.analyse(sd3_only)[1] == "sd3"
    deep = {"transformer.transformer_blocks.30.attn.to_q.lora_A.weight": torch.zeros(2, 8),
            "transformer.transformer_blocks.30.attn.to_q.lora_B.weight": torch.zeros(8, 2)}
    assert lora_keys.analyse(deep)[1] == "sd3"  # FLUX has 19 double blocks

    def joint(width):
        return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, width),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(width, 2)}
    assert lora_keys.analyse(joint(3072))[1] == "flux"
    assert lora_keys.analyse(joint(2432))[1] == "sd3"  # SD3.5 Large width
    assert lora_keys.analyse(joint(32), family_hint="sd3")[1] == "sd3"
    kohya = pair("lora_unet_joint_blocks_0_x_block_attn_qkv", (2, 8), (24, 2))
    assert lora_keys.analyse(kohya) == ("kohya", "sd3")


# ------------------------------------------------------------------------------- validation


def good_state():
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4),
            "transformer.single_transformer_blocks.1.proj_out.lora_A.weight": torch.randn(4, 160),
            "transformer.single_transformer_blocks.1.proj_out.lora_B.weight": torch.randn(32, 4)}


def pair(module: str, down_shape, up_shape, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """One LoRA module in diffusers (``transformer....``) or kohya (``lora_unet_...``) keys."""
    down, up = (".lora_A.weight", ".lora_B.weight") if module.startswith("transformer.") else \
        (".lora_down.weight", ".lora_up.weight")
    return {module + down: torch.zeros(down_shape, dtype=dtype), module + up: torch.zeros(up_shape)}


def bad_states():
    q = "transformer.transformer_blocks.0.attn.to_q"
    return {
        "unknown name": ({**good_state(), **pair("transformer.transformer_blocks.0.attn.to_x", (4, 32), (32, 4))},
                         "to_x"),
        "not a lora key": ({**good_state(), "model.weight": torch.zeros(2)}, "model.weight"),
        "no prefix": ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)}, "transformer."),
        "text encoder": ({**good_state(), **pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", (4, 8), (8, 4))},
                         "text-encoder"),
        "ranks": (pair(q, (4, 32), (32, 5)), "mismatched ranks"),
        "missing B": ({f"{q}.lora_A.weight": torch.zeros(4, 32)}, "lora_B"),
        "3-D": (pair(q, (4, 32, 1), (32, 4)), "2-D"),
        "rank": (pair(q, (513, 2), (2, 513)), "rank 513"),
        "dtype": (pair(q, (4, 32), (32, 4), dtype=torch.int32), "I32"),
        "mixed formats": ({**good_state(), **pair("lora_unet_double_blocks_0_img_attn_proj", (4, 32), (32, 4))},
                          "mixes"),
        "mixed families": ({**good_state(), **pair("transformer.transformer_blocks.0.attn2.to_q", (4, 32), (32, 4))},
                           "mixes FLUX"),
        "bad fused rows": (pair("lora_unet_double_blocks_0_img_attn_qkv", (4, 32), (97, 4)), "3 x n"),
        "block 19": (pair("lora_unet_double_blocks_19_img_attn_proj", (4, 32), (32, 4)), "double_blocks_19"),
    }


@pytest.mark.parametrize("case", list(bad_states()))
def test_validate_lora_rejects(case, tmp_path):
    state, needle = bad_states()[case]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(InputError, match=re.escape(needle)) as err:
        lora_files.validate_lora(path)
    assert "\n" not in str(err.value) and str(err.value).startswith("bad.safetensors")


def test_validate_lora_accepts_and_reports_family(tmp_path):
    path = tmp_path / "ok.safetensors"
    state = good_state()
    save_file(state, str(path))
    assert lora_files.validate_lora(path) == "flux"
    save_file(lf.diffusers_to_kohya(state, "flux"), str(path))
    assert lora_files.validate_lora(path) == "flux"
    loaded = lora_files.load_lora(path)
    assert loaded.source_format == "kohya" and loaded.converted
    assert set(loaded.state) == set(state)
    for m, d in diffusers_deltas(loaded.state).items():
        torch.testing.assert_close(d, diffusers_deltas(state)[m])


def test_never_unpickles(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: called.append(1))
    pt = tmp_path / "lora.safetensors"
    torch.save(good_state(), pt)  # a zip-based torch checkpoint renamed
    with pytest.raises(InputError, match="not a safetensors file"):
        lora_files.validate_lora(pt)
    pt.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(InputError, match="pickle"):
        lora_files.load_lora(pt)
    assert not called


def test_malformed_safetensors_files(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(good_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(InputError, match="truncated"):
        lora_files.validate_lora(path)
    path.write_bytes(data + b"\0" * 4)
    with pytest.raises(InputError, match="trailing"):
        lora_files.validate_lora(path)
    header = json.dumps({"t": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(InputError, match="malformed"):
        lora_files.validate_lora(path)
    path.write_bytes(b"")
    with pytest.raises(InputError, match="not a safetensors"):
        lora_files.validate_lora(path)


def test_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    save_file(good_state(), str(path))
    monkeypatch.setattr(lora_files, "MAX_LORA_BYTES", 100)
    with pytest.raises(InputError, match="limit"):
        lora_files.validate_lora(path)


def test_load_lora_folds_alpha_and_adapter_metadata(tmp_path):
    state = good_state()
    path = tmp_path / "a.safetensors"
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern":
            {"single_transformer_blocks.1.proj_out": 2}}
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    loaded = lora_files.load_lora(path)
    assert loaded.converted
    got, ref = diffusers_deltas(loaded.state), diffusers_deltas(state)
    torch.testing.assert_close(got["transformer_blocks.0.attn.to_q"], 2.0 * ref["transformer_blocks.0.attn.to_q"])
    torch.testing.assert_close(got["single_transformer_blocks.1.proj_out"],
                               0.5 * ref["single_transformer_blocks.1.proj_out"])
    with_alpha = {**state, "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(1.0)}
    save_file(with_alpha, str(path))
    loaded = lora_files.load_lora(path)
    assert not any(k.endswith(".alpha") for k in loaded.state)
    torch.testing.assert_close(diffusers_deltas(loaded.state)["transformer_blocks.0.attn.to_q"],
                               0.25 * ref["transformer_blocks.0.attn.to_q"])
    plain = tmp_path / "p.safetensors"
    save_file(state, str(plain), metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4,
                                                                                "transformer.lora_alpha": 4})})
    assert not lora_files.load_lora(plain).converted


def test_non_finite_values_rejected(tmp_path):
    state = good_state()
    state["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    assert lora_files.validate_lora(path) == "flux"  # the header is fine ...
    with pytest.raises(InputError, match="NaN"):
        lora_files.load_lora(path)  # ... the values are not
