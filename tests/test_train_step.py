"""One optimiser step on the tiny backbone: batched samples, host syncs, precision, what a job frees."""

import gc
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from studio.engine import snr, training
from studio.engine.backbones import clean
from studio.engine.recipe import Recipe
from studio.engine.training import (
    Observer,
    TrainRequest,
    attach_lora,
    detach_lora,
    flow_matching_loss,
    micro_batches,
    prepare_run,
    train,
)


def reference(color, size=(64, 64)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    arr[size[1] // 3: size[1] // 2] = (250, 200, 60)
    return Image.fromarray(arr)


REFS = [reference((220, 60, 40)), reference((40, 90, 200)), reference((30, 160, 70)), reference((240, 240, 240))]
PROMPTS = [f"{what} in red poster style" for what in ("a cat", "a bridge", "a lighthouse", "an apple")]


def step_gradients(backbone, latents, conds, micro_batch: int) -> list[torch.Tensor]:
    """The LoRA gradients of one optimiser step over all samples, ``micro_batch`` per forward pass."""
    params = attach_lora(backbone, Recipe(rank=4, seed=3))
    try:
        with torch.no_grad():  # lora_B starts at zero: move it so lora_A gets gradients too
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
        sampler = snr.sampler_for("style_friendly", "flux")
        generator = torch.Generator().manual_seed(11)
        n = len(latents)
        for chunk in micro_batches(list(range(n)), latents, micro_batch):
            loss, _ = flow_matching_loss(backbone, [latents[i] for i in chunk], [conds[i] for i in chunk],
                                         sampler, generator, offset_noise=0.05)
            (loss * (len(chunk) / n)).backward()
        return [p.grad.detach().clone() for p in params]
    finally:
        detach_lora(backbone)


def test_a_batch_of_four_has_the_gradient_of_four_accumulated_samples(tiny_backbone):
    latents = tiny_backbone.encode_images(REFS)
    conds = tiny_backbone.encode_prompts(PROMPTS)
    accumulated = step_gradients(tiny_backbone, latents, conds, micro_batch=1)
    batched = step_gradients(tiny_backbone, latents, conds, micro_batch=4)
    pairs = step_gradients(tiny_backbone, latents, conds, micro_batch=2)
    assert sum(float(g.abs().sum()) for g in accumulated) > 0
    for a, b, c in zip(accumulated, batched, pairs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-7)


def test_only_neighbours_of_one_shape_share_a_pass(tiny_backbone):
    wide = tiny_backbone.encode_images([reference((90, 90, 90), size=(96, 48))])[0]
    square = tiny_backbone.encode_images([REFS[0]])[0]
    latents = [square, square, wide, square]
    assert micro_batches([0, 1, 2, 3], latents, 4) == [[0, 1], [2], [3]]
    assert micro_batches([0, 1, 2, 3], latents, 1) == [[0], [1], [2], [3]]
    assert micro_batches([3, 0, 1, 2], latents, 2) == [[3, 0], [1], [2]]


def train_run(backbone, tmp_path: Path, name: str, observer=None, **recipe) -> Path:
    run_dir = tmp_path / name
    defaults = dict(steps=2, rank=4, preview_every=0, checkpoint_every=0)
    prepare_run(TrainRequest(REFS[:2], "red poster", "demo", Recipe(**{**defaults, **recipe})), run_dir,
                backbone.backbone_id, backbone.family, backbone.default_resolution)
    return train(backbone, run_dir, observer)


# -- no host-device sync inside the loop -------------------------------------------------------------------

SYNCS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
         torch.Tensor.__float__: "float", torch.Tensor.__int__: "int", torch.Tensor.numpy: "numpy",
         torch.Tensor.cpu: "cpu", torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero"}


class SyncSites(TorchFunctionMode):
    """Records every call that makes the host wait for a GPU result, with the function that made it.

    On a CPU nothing waits, but the same calls would: this is the CUDA-free proxy of
    ``torch.cuda.set_sync_debug_mode``.
    """

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            caller = sys._getframe(1)
            self.sites.append((Path(caller.f_code.co_filename).name, caller.f_code.co_name, SYNCS[func]))
        return func(*args, **(kwargs or {}))


class StepSites(Observer):
    def __init__(self, mode: SyncSites):
        self.mode, self.per_step = mode, []

    def on_step(self, report) -> None:
        self.per_step.append(list(self.mode.sites))
        self.mode.sites.clear()


def test_the_training_loop_waits_for_the_device_once_per_optimiser_step(tiny_backbone, tmp_path):
    mode = SyncSites()
    observer = StepSites(mode)
    with mode:
        train_run(tiny_backbone, tmp_path, "sync", observer, steps=3, grad_accum=4, micro_batch=2)
    assert len(observer.per_step) == 3
    for sites in observer.per_step[1:]:  # the first step also holds the set-up (encoding, LoRA attach)
        # Adam keeps each parameter's step count in a host tensor (capturable=False): reading it waits for nothing
        device_sites = [site for site in sites if site != ("optimizer.py", "_get_value", "item")]
        # the step's loss, read once; t was drawn on the host and never left it
        assert sorted(device_sites) == [("training.py", "_train", "item"), ("training.py", "_train", "tolist"),
                                        ("training.py", "_train", "tolist")], sites


# -- precision -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_trains_with_a_loss_scaler(tmp_path, monkeypatch, tiny_folder):
    from studio.engine.backbones import load_backbone

    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scaled.append(self.is_enabled())
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    half = load_backbone("tiny", precision="fp16")
    assert half.dtype == torch.float16
    result = train_run(half, tmp_path, "fp16", steps=2, grad_accum=2)
    assert (result / "lora.safetensors").exists()
    assert scaled and all(scaled)
    scaled.clear()
    # bf16 / fp32 need no scaler: it is there but off
    train_run(load_backbone("tiny", precision="fp32"), tmp_path, "fp32", steps=1, grad_accum=1)
    assert scaled == [False]


def test_sd3_gets_its_time_step_in_fp32(tmp_path_factory):
    """bf16 would round t*1000 to steps of 4 near 1000 while x_t was made with the exact t."""
    from studio.engine.backbones.sd3 import SD3Backbone
    from studio.engine.backbones.tiny import ensure_tiny_sd3

    sd3 = SD3Backbone.load("tiny-sd3", str(ensure_tiny_sd3()), device=torch.device("cpu"), precision="bf16")
    seen = []
    handle = sd3.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    try:
        latent = torch.randn(1, sd3.pipe.vae.config.latent_channels, 8, 8)
        cond = sd3.encode_prompts(["a cat"])[0]
        with torch.no_grad():
            sd3.predict_velocity(latent, torch.tensor([0.8771]), cond)
    finally:
        handle.remove()
    assert seen[0].dtype == torch.float32
    assert seen[0].item() == pytest.approx(877.1, abs=1e-3)


# -- what a job leaves behind ----------------------------------------------------------------------------------


class FailAt(Observer):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, report) -> None:
        if report.step == self.step:
            raise RuntimeError("a step went wrong")


def test_the_lora_state_is_freed_before_the_text_encoders_come_back(tiny_backbone, tmp_path, monkeypatch):
    """The end-of-job spike: fp32 LoRA weights, gradients and Adam's moments must be gone (not merely
    unreachable from the model) when the encoders return to the device, whether the job ends well or not."""
    lora = []
    real_attach = training.attach_lora

    def attach(backbone, recipe):
        params = real_attach(backbone, recipe)
        lora.extend(weakref.ref(p) for p in params)
        return params

    alive_at_restore = []
    real_restore = tiny_backbone.restore_encoders

    def restore():
        alive_at_restore.append(sum(ref() is not None for ref in lora))
        real_restore()

    monkeypatch.setattr(training, "attach_lora", attach)
    monkeypatch.setattr(tiny_backbone, "restore_encoders", restore)
    train_run(tiny_backbone, tmp_path, "ok", steps=2)
    with pytest.raises(RuntimeError, match="went wrong"):
        train_run(tiny_backbone, tmp_path, "fails", FailAt(2), steps=3)
    assert lora and alive_at_restore == [0, 0]
    gc.collect()


@pytest.mark.slow
def test_compiled_blocks_train_and_are_undone_after_the_job(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_COMPILE_BACKEND", "eager")  # dynamo's graph capture, without a C compiler
    state = clean.capture(tiny_backbone)
    compiled = []
    real_compile = training.compile_blocks

    def spy(transformer):
        real_compile(transformer)
        compiled.extend(b for b in clean.transformer_blocks(transformer) if b._compiled_call_impl is not None)

    monkeypatch.setattr(training, "compile_blocks", spy)
    result = train_run(tiny_backbone, tmp_path, "compiled", steps=2, compile_blocks=True)
    assert (result / "lora.safetensors").exists()
    assert len(compiled) == len(clean.transformer_blocks(tiny_backbone.transformer)) > 0
    assert clean.problems(tiny_backbone, state) == []


def test_precision_follows_what_the_gpu_computes_in(monkeypatch):
    """bf16 needs compute capability 8.0 (Ampere) or newer; older cards get fp16 (with the loss scaler)."""
    from studio.engine.backbones.base import default_dtype
    from studio.errors import InputError

    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # RTX 30xx
    assert default_dtype(gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4, RTX 20xx
    assert default_dtype(gpu) == torch.float16
    assert default_dtype(gpu, "fp32") == torch.float32
    with pytest.raises(InputError, match="no bf16"):
        default_dtype(gpu, "bf16")
    assert default_dtype(torch.device("cpu")) == torch.float32
