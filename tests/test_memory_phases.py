"""Every phase of a job, planned and checked without a GPU.

A training job holds different tensors in each phase (load, encode, train, previews, a generation
served between steps, end of job, the next job on the warm model). The full-size FLUX.1-dev and
SD3.5 Large architectures (counted from their configs on the meta device) are walked through every
phase for the cards artists have; the plan ``choose_tier`` returns must fit every phase. A real tiny
training shows the trainer goes through exactly the phases the planner plans.
"""

import pytest
import torch
from PIL import Image

from studio.engine import memory as M
from studio.engine import memory_phases as P
from studio.engine.backbones.base import Backbone
from studio.errors import InsufficientMemoryError

GB = M.GB
CARDS = (12, 16, 24, 32, 40, 80)
HOST_RAM = 32 * GB
# With 32 GB of RAM every card from 12 GB plans both models (12 GB FLUX encodes on the CPU in fp32).
# With 16 GB of RAM (no room for fp32 text encoders) these refuse: (arch, resolution) -> cards.
REFUSED_16GB_RAM = {("flux-dev", 512): [12], ("flux-dev", 1024): [12], ("sd3.5-large", 1024): [12]}


def test_the_default_resolution_is_one_we_walk():
    assert Backbone.default_resolution in (512, 1024)


def test_every_phase_has_an_estimator_and_the_lists_match():
    assert set(P.PHASE_ESTIMATORS) == set(P.TRAINING_PHASES) | set(P.GENERATION_PHASES)
    assert M.TRAINING_PHASES == ("load", "encode", "train", "preview", "generate_between_steps", "end_of_job",
                                 "next_job")
    assert set(P.PLACEMENTS) == set(P.PLACEMENT_ORDER) == set(M.PLACEMENTS)
    from studio.engine.backbones.quantize import ENCODER_PLACEMENTS

    assert set(ENCODER_PLACEMENTS) == set(P.PLACEMENTS)  # what Backbone.load applies is what memory plans


@pytest.mark.parametrize("arch", ["flux-dev", "sd3.5-large"])
@pytest.mark.parametrize("resolution", [512, 1024])
@pytest.mark.parametrize("ram_gb", [32, 16])
def test_every_phase_of_the_chosen_plan_fits_the_card(arch, resolution, ram_gb):
    refused = []
    for card in CARDS:
        try:
            plan = M.choose_tier(card * GB, ram_gb * GB, arch, resolution)
        except InsufficientMemoryError as exc:
            refused.append(card)
            assert f"this GPU has {card:.1f} GB" in str(exc) and "largest phase:" in str(exc)
            continue
        assert tuple(plan.phase_peaks) == M.TRAINING_PHASES
        for phase, peak in plan.phase_peaks.items():
            assert peak <= card * GB * M.USABLE_FRACTION, (arch, card, resolution, phase)
        assert plan.peak_bytes == max(plan.phase_peaks.values())
        setting = P.Setting(M.arch_params(arch), plan.tier, plan.placement, resolution)
        assert P.phase_peaks(setting) == plan.phase_peaks  # the plan is what the estimators say
        assert P.host_bytes(setting) <= ram_gb * GB
        text = plan.describe()
        assert plan.placement.title in text and "GB per phase: load " in text and "next job " in text
        assert plan.to_dict()["phase_peaks"] == plan.phase_peaks
    expected = [] if ram_gb == 32 else REFUSED_16GB_RAM.get((arch, resolution), [])
    assert refused == expected


def test_phases_hold_what_the_job_holds_then():
    flux = M.arch_params("flux-dev")
    for placement in P.PLACEMENTS.values():
        s = P.Setting(flux, M.TIERS["fp8"], placement, 1024)
        lora = P.lora_state_bytes(s)
        # the trainer frees the LoRA state before the text encoders come back
        assert P.end_of_job_phase(s) == P.load_phase(s)
        assert P.train_phase(s) >= P.end_of_job_phase(s) - P.encoders_on_gpu(s, "rest") + lora
        # a generation between steps keeps the training state and encodes its prompt where it computes
        assert P.between_steps_phase(s) >= P.load_phase(s) - P.encoders_on_gpu(s, "rest") + lora + max(
            P.encoders_on_gpu(s, "encoding"), P.inference_bytes(s) + P.decode_bytes(s))
    gpu = P.Setting(flux, M.TIERS["fp8"], P.PLACEMENTS["gpu"], 1024)
    assert P.encoders_on_gpu(gpu, "training") == 0  # offloaded while training ...
    assert P.encoders_on_gpu(gpu, "encoding") == flux.text_encoder_params * 2  # ... and back in bf16 to encode
    q8 = P.Setting(flux, M.TIERS["fp8"], P.PLACEMENTS["gpu-8bit"], 1024)
    assert P.encoders_on_gpu(q8, "training") == P.encoders_on_gpu(q8, "rest") < flux.text_encoder_params * 1.1
    cpu = P.Setting(flux, M.TIERS["fp8"], P.PLACEMENTS["cpu-fp32"], 1024)
    assert max(P.encoders_on_gpu(cpu, w) for w in ("rest", "training", "encoding")) == 0
    assert P.host_bytes(cpu) == P.HOST_BASELINE + flux.text_encoder_params * 4  # fp32 storage counts 4 bytes


def test_no_plan_ever_computes_text_encoders_on_the_cpu_in_bf16():
    for arch in ("flux-dev", "sd3.5-large", "sd3.5-medium"):
        for card in (None, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 80):
            for ram in (8, 16, 32, 64, 256):
                for resolution in (512, 1024):
                    for tier in ("auto", "bf16", "fp8", "int8", "nf4"):
                        try:
                            plan = M.choose_tier(card and card * GB, ram * GB, arch, resolution, tier)
                        except InsufficientMemoryError:
                            continue
                        place = plan.placement
                        assert place.computes_on == "gpu" or place.name == "cpu-fp32", (arch, card, ram, tier)
                        assert plan.on_gpu or place.name == "cpu-fp32"


def test_a_cpu_encode_is_the_last_resort_and_says_how_slow_it_is():
    plan = M.choose_tier(12 * GB, 32 * GB, "flux-dev", 1024)
    assert plan.text_encoder_placement == "cpu-fp32"
    # T5-XXL (512 tokens) + CLIP-L: ~4.8 TFLOP per prompt, ~24 s at the assumed 200 GFLOP/s
    assert 15 < plan.encode_seconds < 40
    assert f"~{plan.encode_seconds:.0f} s per new prompt" in plan.describe()
    assert plan.to_dict()["encode_seconds_estimate"] == plan.encode_seconds
    assert M.choose_tier(24 * GB, 32 * GB, "flux-dev", 1024).encode_seconds is None  # the GPU encodes


# -- the trainer goes through exactly the planned phases --------------------------------------------------


class PhaseRecorder:
    """Names the phase of every model call of a real tiny job, from where the job is and what runs."""

    def __init__(self, backbone):
        self.seen: list[str] = []
        self.stage = "load"  # set by the test: load, job, between, after, next
        self.trained = False
        for encoder in backbone.offload_modules().values():
            encoder.register_forward_hook(lambda *_: self._record("text"))
        backbone.transformer.register_forward_hook(lambda *_: self._record("transformer"))
        backbone.pipe.vae.decoder.register_forward_hook(lambda *_: self._record("decode"))

    def _record(self, what: str) -> None:
        if self.stage == "between":
            phase = "generate_between_steps"
        elif self.stage == "next":
            phase = "next_job"
        elif what == "transformer" and torch.is_grad_enabled():
            phase, self.trained = "train", True
        elif what == "text" and not self.trained:
            phase = "encode"
        else:  # a no-grad sample + decode inside the training: a preview (step 0 comes before any step)
            phase = "preview"
        if not self.seen or self.seen[-1] != phase:
            self.seen.append(phase)


def test_the_trainer_goes_through_exactly_the_planned_phases(tmp_path):
    from studio.engine.backbones import load_backbone
    from studio.engine.generation import GenerateOptions, generate
    from studio.engine.recipe import Recipe
    from studio.engine.training import Observer, TrainRequest, prepare_run, train, training_paused

    backbone = load_backbone("tiny")
    recorder = PhaseRecorder(backbone)
    recorder.seen.append("load")
    options = GenerateOptions(prompt="a new prompt served between steps", steps=2, seed=1, resolution=64)

    class Between(Observer):
        def on_step(self, report):
            if report.step == 1:  # what the worker does with a queued generation
                recorder.stage = "between"
                with training_paused(backbone):
                    generate(backbone, options, tmp_path / "between")
                recorder.stage = "job"

    recipe = Recipe(steps=2, rank=4, preview_every=2, preview_steps=1, checkpoint_every=0)
    prepare_run(TrainRequest([Image.new("RGB", (64, 64), (200, 40, 40))], "flat red poster", "p", recipe),
                tmp_path / "run", "tiny", "flux", 64)
    recorder.stage = "job"
    train(backbone, tmp_path / "run", Between())
    recorder.seen.append("end_of_job")  # train() returned: LoRA state freed, encoders restored
    assert backbone.encoder_homes()[0] == backbone.encoder_device()
    recorder.stage = "next"
    generate(backbone, GenerateOptions(prompt="the next job", steps=2, seed=2, resolution=64), tmp_path / "next")
    assert set(recorder.seen) == set(M.TRAINING_PHASES), recorder.seen
    assert recorder.seen[:3] == ["load", "encode", "preview"]  # step 0's preview of the base model
