"""Memory tiers: which tier a card gets, the refusal message, and a LoRA trained on a quantised base.

(Every phase of a job, text-encoder placements and the prompt cache: tests/test_memory_phases.py and
tests/test_text_encoder_placement.py.)

Tier selection is pure arithmetic on parameter counts read from the real model configs (on the
meta device), so full-size FLUX.1-dev / SD3.5 are checked here without a GPU or a download. The
round trip trains the tiny FLUX model with its transformer quantised by optimum-quanto (the
backend that runs on CPUs; bitsandbytes takes over on CUDA) and loads the LoRA into the plain,
unquantised tiny pipeline.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.engine import memory as M
from studio.engine.backbones import quantize
from studio.engine.recipe import Recipe
from studio.errors import InputError, InsufficientMemoryError

GB = M.GB
RAM = 64 * GB


def plan(gpu_gb: float, resolution: int, override: str | None = None, arch: str = "flux-dev", ram: int = RAM):
    return M.choose_tier(int(gpu_gb * GB), ram, arch, resolution, override)


def test_parameter_counts_come_from_the_real_configs():
    flux = M.arch_params("flux-dev")
    assert 11.85e9 < flux.transformer_params < 11.95e9  # FLUX.1-dev: "12B"
    assert 4.8e9 < flux.text_encoder_params < 4.95e9  # T5-XXL encoder + CLIP-L
    assert 89e6 < flux.lora_params(32) < 91e6  # rank 32 on the paper's nine targets
    assert (flux.blocks, flux.hidden, flux.text_tokens) == (57, 3072, 512)
    large = M.arch_params("sd3.5-large")
    assert 8.0e9 < large.transformer_params < 8.1e9 and large.blocks == 38
    assert 5.5e9 < large.text_encoder_params < 5.7e9  # T5-XXL + CLIP-L + CLIP-G


@pytest.mark.parametrize(("gpu_gb", "tier_512", "tier_1024"), [
    (80, "bf16", "bf16"),
    (48, "bf16", "bf16"),
    (40, "bf16", "bf16"),
    (32, "fp8", "fp8"),  # bf16 FLUX fits, but not with T5 on the GPU to encode: fp8 beats a CPU encode
    (24, "fp8", "fp8"),
    (16, "nf4", "nf4"),
    (12, "nf4", "nf4"),
])
def test_flux_dev_tier_per_card(gpu_gb, tier_512, tier_1024):
    for resolution, tier in ((512, tier_512), (1024, tier_1024)):
        chosen = plan(gpu_gb, resolution)
        assert chosen.tier.name == tier, (gpu_gb, resolution)
        assert chosen.peak_bytes <= gpu_gb * GB * M.USABLE_FRACTION
        assert chosen.on_gpu and chosen.gradient_checkpointing
        text = chosen.describe()
        assert f"tier {tier}" in text and f"of {gpu_gb:.1f} GB at {resolution} px" in text


def test_text_encoder_placement_per_card():
    assert plan(80, 1024).text_encoder_placement == "gpu" and not plan(80, 1024).offload_text_encoders
    assert plan(32, 1024).text_encoder_placement == "gpu"  # fp8 FLUX + bf16 T5 while encoding: 24.5 GB
    assert plan(24, 1024).text_encoder_placement == "gpu-8bit"  # fp8 FLUX + a bf16 T5-XXL would not fit
    assert plan(16, 1024).text_encoder_placement == "gpu-4bit"
    assert plan(12, 1024).text_encoder_placement == "cpu-fp32"  # the last resort, with a time estimate
    assert "per new prompt, an estimate" in plan(12, 1024).describe()
    # 8 GB of RAM cannot hold T5 while training: the 32 GB card keeps an 8-bit T5 on the GPU instead
    low_ram = plan(32, 1024, ram=8 * GB)
    assert low_ram.tier.name == "fp8" and low_ram.text_encoder_placement == "gpu-8bit"
    large = plan(32, 1024, arch="sd3.5-large")
    assert (large.tier.name, large.text_encoder_placement) == ("bf16", "swap") and large.offload_text_encoders


def test_peak_grows_with_resolution_and_shrinks_with_the_tier():
    flux = M.arch_params("flux-dev")
    peaks = {(t, r): M.estimate_peak(flux, M.TIERS[t], r, offload_text_encoders=True)["peak"]
             for t in M.TIER_ORDER for r in (512, 1024)}
    for tier in M.TIER_ORDER:
        assert peaks[tier, 1024] > peaks[tier, 512]
    for res in (512, 1024):
        assert peaks["bf16", res] > peaks["fp8", res] > peaks["nf4", res]
    no_ckpt = M.estimate_peak(flux, M.TIERS["nf4"], 1024, checkpointing=False, offload_text_encoders=True)
    assert no_ckpt["activations"] > 10 * M.estimate_peak(flux, M.TIERS["nf4"], 1024,
                                                          offload_text_encoders=True)["activations"]


def test_sd35_large_fits_smaller_cards_than_flux():
    assert plan(24, 1024, arch="sd3.5-large").tier.name == "fp8"
    assert plan(40, 1024, arch="sd3.5-large").tier.name == "bf16"
    assert plan(12, 512, arch="sd3.5-large").tier.name == "nf4"
    assert plan(12, 512, arch="sd3.5-medium").tier.name == "bf16"


def test_override_is_obeyed_when_it_fits():
    assert plan(80, 1024, "nf4").tier.name == "nf4"
    assert plan(80, 512, "int8").tier.name == "int8"  # never chosen by auto, kept by name
    assert plan(80, 512, "fp8").tier.name == "fp8"
    assert all(plan(gpu, res).tier.name != "int8" for gpu in (12, 16, 24, 32, 40, 80) for res in (512, 1024))


def test_override_that_does_not_fit_is_refused_with_what_would():
    with pytest.raises(InsufficientMemoryError) as err:
        plan(16, 1024, "int8")
    message = str(err.value)
    assert "flux-dev needs ~" in message and "at 1024 px in tier int8" in message
    assert "this GPU has 16.0 GB" in message and "use tier nf4 (~" in message


def test_refusal_suggests_a_smaller_size_when_that_fits():
    flux = M.arch_params("flux-dev")
    peak = {r: M.estimate_peak(flux, M.TIERS["int8"], r, offload_text_encoders=True)["peak"] for r in (512, 1024)}
    card = (peak[512] + peak[1024]) / 2 / M.USABLE_FRACTION  # int8 fits at 512 px, not at 1024 px
    with pytest.raises(InsufficientMemoryError, match=r"or (768|512) px \(~") as err:
        plan(card / GB, 1024, "int8")
    size = int(str(err.value).split(" or ")[1].split(" px")[0])
    assert plan(card / GB, size, "int8").tier.name == "int8"  # what it suggests does fit


def test_nothing_fits_an_8_gb_card():
    for resolution in (512, 1024):
        with pytest.raises(InsufficientMemoryError) as err:
            plan(8, resolution)
        message = str(err.value)
        assert f"at {resolution} px even in its smallest tier, tier nf4" in message
        assert "this GPU has 8.0 GB" in message and "nothing fits" in message


def test_cpu_and_tiny_keep_the_unquantised_model(tiny_folder):
    cpu = M.choose_tier(None, 24 * GB, str(tiny_folder), 64)
    assert cpu.tier.name == "bf16" and not cpu.on_gpu and not cpu.offload_text_encoders
    assert cpu.text_encoder_placement == "cpu-fp32" and "fp32 on the CPU" in cpu.describe()
    if not torch.cuda.is_available():
        assert M.plan_for("tiny").tier.name == "bf16"
    tiny = M.arch_params(str(tiny_folder))
    assert tiny.family == "flux" and tiny.text_tokens == 32 and tiny.blocks == 2
    with pytest.raises(InsufficientMemoryError, match="on the CPU"):
        M.choose_tier(None, 8 * GB, "flux-dev", 512)  # FLUX.1-dev in fp32 does not fit 8 GB of RAM


def test_tier_setting_is_validated(monkeypatch):
    with pytest.raises(InputError, match="memory tier"):
        Recipe(tier="int3").validate()
    monkeypatch.setenv("STUDIO_TIER", "nf4")
    assert M.requested_tier("auto") == "nf4" and M.requested_tier("int8") == "int8"
    monkeypatch.setenv("STUDIO_TIER", "huge")
    with pytest.raises(InputError, match="STUDIO_TIER"):
        M.requested_tier("auto")


def test_missing_backend_is_a_clear_message(monkeypatch):
    monkeypatch.setenv("STUDIO_QUANT_BACKEND", "bitsandbytes")
    with pytest.raises(InputError, match="pip install optimum-quanto"):
        quantize.quantization_backend("cpu")  # diffusers' bitsandbytes quantiser needs a GPU


def _train(backbone, run_dir, image):
    from studio.engine.training import TrainRequest, prepare_run, train

    recipe = Recipe(steps=3, lr=1e-2, rank=4, preview_every=0, checkpoint_every=0)
    prepare_run(TrainRequest([image], "flat red poster", "q", recipe), run_dir, "tiny", "flux", 64)
    return train(backbone, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["nf4", "int8", "fp8"])  # quanto runs all three on the CPU
def test_lora_trained_on_a_quantised_base_loads_into_the_plain_pipeline(tier, tiny_backbone, tmp_path):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QTensor

    from studio.engine.backbones import load_backbone
    from studio.engine.generation import GenerateOptions, generate

    image = Image.new("RGB", (64, 64), (210, 50, 40))
    quantised = load_backbone("tiny", tier=tier)
    assert quantised.tier == tier and quantised.quant_backend == "quanto"
    to_q = quantised.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.weight, QTensor)  # the base really is stored in 8 / 4 bits
    result = _train(quantised, tmp_path / "q", image)
    meta = json.loads((result / "template.json").read_text())
    assert meta["memory_tier"] == tier

    plain = _train(tiny_backbone, tmp_path / "plain", image)
    quantised_lora, plain_lora = load_file(result / "lora.safetensors"), load_file(plain / "lora.safetensors")
    assert {k: v.shape for k, v in quantised_lora.items()} == {k: v.shape for k, v in plain_lora.items()}
    assert all(v.abs().sum() > 0 for k, v in quantised_lora.items() if "lora_B" in k)  # it trained

    options = GenerateOptions(prompt="a cat", steps=4, seed=3)
    base = generate(tiny_backbone, options, tmp_path / "base", None)[0]
    styled = generate(tiny_backbone, options, tmp_path / "styled", (result, meta))[0]  # unquantised pipeline
    diff = np.abs(np.asarray(Image.open(base), dtype=float) - np.asarray(Image.open(styled), dtype=float))
    assert diff.mean() > 2.0  # the LoRA changes the picture
    # and the quantised backbone generates with templates too (diffusers' pipeline loader cannot, on quanto)
    assert generate(quantised, options, tmp_path / "on-quantised", (result, meta))[0].exists()


def test_cli_prints_the_tier_and_trains_on_a_4_bit_base(tmp_path, monkeypatch, capsys):
    pytest.importorskip("optimum.quanto")
    from studio.cli import main

    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    Image.new("RGB", (48, 40), (30, 90, 200)).save(tmp_path / "ref.png")
    code = main(["--store", str(tmp_path / "store"), "train", "--images", str(tmp_path / "ref.png"),
                 "--style", "flat blue poster", "--backbone", "tiny", "--tier", "nf4", "--steps", "2",
                 "--preview-every", "0", "--checkpoint-every", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "memory: tier nf4 (quantised base on the CPU), expected peak ~" in err
    template = json.loads(next((tmp_path / "store").glob("*/template.json")).read_text())
    assert template["memory_tier"] == "nf4" and template["recipe"]["tier"] == "nf4"


def test_cli_refuses_a_run_that_does_not_fit_before_loading_anything(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(M, "detect_memory", lambda device=None: (GB // 2, RAM))  # a 0.5 GB "GPU"
    Image.new("RGB", (48, 40), (30, 90, 200)).save(tmp_path / "ref.png")
    code = main(["--store", str(tmp_path / "store"), "train", "--images", str(tmp_path / "ref.png"),
                 "--style", "flat blue poster", "--backbone", "tiny", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "this GPU has 0.5 GB" in err and "nothing fits" in err
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "store").glob("*/template.json"))


def test_the_plan_batches_an_optimiser_step_where_memory_allows():
    """The 4 samples of a step go through the model together when their activations fit (same gradient)."""
    import dataclasses

    from studio.engine.memory_phases import Setting, phase_peaks

    for card, res in ((80, 512), (80, 1024), (40, 512), (24, 512), (16, 1024), (12, 512)):
        plan = M.choose_tier(card * GB, 64 * GB, "flux-dev", res)
        setting = Setting(M.arch_params("flux-dev"), plan.tier, plan.placement, res)
        fits = [b for b in range(1, 5)
                if phase_peaks(dataclasses.replace(setting, micro_batch=b))["train"] <= card * GB * M.USABLE_FRACTION]
        assert plan.micro_batch == max(fits), (card, res, plan.micro_batch, fits)
        assert plan.to_dict()["micro_batch"] == plan.micro_batch
    assert M.choose_tier(80 * GB, 64 * GB, "flux-dev", 512).micro_batch == 4
    assert M.choose_tier(80 * GB, 64 * GB, "flux-dev", 512, grad_accum=2).micro_batch == 2
    assert M.choose_tier(80 * GB, 64 * GB, "flux-dev", 512, mode="generate").micro_batch == 1
