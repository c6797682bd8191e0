"""Fusion / style-schedule sampling: blend the base model and the template per denoising step.

ProFusion (seed 002) fuses two predictions during sampling; the style-friendly paper (seed
000) observes that style is decided in the first, high-noise steps. Together: at step ``i`` the
sampler follows

    v = v_base + w_i * (v_template - v_base)

where ``v_template`` is the velocity with the active template LoRA(s) and ``v_base`` the same
call with every LoRA switched off. ``w_i = fusion_weight`` for the first ``style_schedule``
fraction of the steps and 0 afterwards (no schedule: every step). ``w = 1`` everywhere is
the plain template; ``w = 0`` the base model. Steps with ``w`` exactly 0 or 1 cost one
transformer call, blended steps two.

The loop is the pipeline's own: :meth:`Backbone.prepare_sampling` sets up start latents,
time steps (FLUX's resolution-dependent shift included) and the guided velocity exactly as
the diffusers pipeline does, and the scheduler's Euler ``step`` updates the latents, so with
``w = 1`` everywhere the image equals the pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from studio.engine.backbones.base import Backbone, Cond
from studio.errors import CancelledError


@dataclass
class StepTrace:
    """What one denoising step did (recorded only when a trace list is passed)."""

    index: int
    timestep: torch.Tensor  # the scheduler's, 0..1000
    weight: float
    latents: torch.Tensor  # the input of this step, pipeline layout
    velocity: torch.Tensor  # the prediction the step used
    base: torch.Tensor | None  # v_base when it was computed
    template: torch.Tensor | None  # v_template when it was computed


def is_active(fusion_weight: float = 1.0, style_schedule: float | None = None) -> bool:
    """Whether these settings change anything (otherwise the pipeline runs as always)."""
    return style_schedule is not None or fusion_weight != 1.0


def step_weights(steps: int, fusion_weight: float = 1.0, style_schedule: float | None = None) -> list[float]:
    """The template's weight ``w_i`` at each of ``steps`` denoising steps (first = most noise)."""
    if style_schedule is None:
        styled = steps
    else:  # round half up: 0.3 of 28 steps -> 8, of 10 -> 3 (no float surprises from 0.3 * 10)
        styled = min(steps, int(style_schedule * steps + 0.5))
    return [float(fusion_weight) if i < styled else 0.0 for i in range(steps)]


@contextmanager
def lora_off(backbone: Backbone) -> Iterator[None]:
    """Every LoRA layer off for the block (the base model), back on afterwards."""
    backbone.pipe.disable_lora()
    try:
        yield
    finally:
        backbone.pipe.enable_lora()


@torch.no_grad()
def fused_generate(backbone: Backbone, cond: Cond, weights: list[float], *, seed: int,
                   steps: int | None = None, guidance: float | None = None, width: int | None = None,
                   height: int | None = None, negative: Cond | None = None, latents: torch.Tensor | None = None,
                   trace: list[StepTrace] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """One image whose step ``i`` follows ``v_base + weights[i] * (v_template - v_base)``.

    The template LoRAs must already be active (:func:`studio.engine.generation.activate_templates`).
    ``trace``, when given, receives one :class:`StepTrace` per step (tests, ablations); ``should_stop``
    is asked after each step (:class:`studio.errors.CancelledError` when it says yes).
    """
    run = backbone.prepare_sampling(cond, seed=seed, steps=steps, guidance=guidance, width=width,
                                    height=height, negative=negative, latents=latents)
    if len(weights) != len(run.timesteps):
        raise ValueError(f"{len(weights)} weights for {len(run.timesteps)} denoising steps")
    scheduler = backbone.pipe.scheduler
    x = run.latents
    for i, (t, w) in enumerate(zip(run.timesteps, weights, strict=True)):
        v_template = run.velocity(x, t) if w != 0 else None
        v_base = None
        if w != 1:
            with lora_off(backbone):
                v_base = run.velocity(x, t)
        if w == 1:
            v = v_template
        elif w == 0:
            v = v_base
        else:  # blend in fp32, hand the scheduler the model's dtype as the pipeline does
            v = (v_base.float() + w * (v_template.float() - v_base.float())).to(v_base.dtype)
        if trace is not None:
            trace.append(StepTrace(i, t, w, x, v, v_base, v_template))
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if should_stop is not None and should_stop():
            raise CancelledError(f"cancelled after denoising step {i + 1} of {len(weights)}")
    return run.decode(x)
